// Command ambit-cni is the chained CNI plugin that enrolls pods into
// Ambit's ambient mode. The container runtime runs it last in the node's
// conflist, after the primary plugin has given the pod its addresses.
//
// ADD asks the node agent, over its unix socket and with the pod's netns
// passed as a file descriptor, whether to enroll the pod; the agent opens
// its listeners in the netns and installs the in-pod redirection
// (plugin/redirect) on that fd before it answers enroll, and only then
// does the plugin return prevResult, so the app's first packet is already
// captured. DEL hands the agent the netns (when it still exists) to remove
// the redirection and forget the pod; CHECK has the agent verify the
// rules; GC passes the runtime's valid attachments to the agent; STATUS
// reports whether ADD can be served.
//
// When the agent cannot be reached at all, the enrollment snapshot the
// agent keeps on the node decides: a pod that could be enrolled fails
// closed (kubelet retries), any other pod starts unenrolled. See
// docs/plugin.md for the design and its residual risk.
//
// The binary is exec'd once per pod, for every pod of the node: it links
// only the protocol (plugin/cniproto, plugin/redirectspec) and the CNI
// types — no rule code, no netlink, never client-go or the agent — because
// every package linked costs start-up time on each exec (docs/plugin.md
// §6).
package main
