// Command ambit-cni is the chained CNI plugin that enrolls pods into
// Ambit's ambient mode. The container runtime runs it last in the node's
// conflist, after the primary plugin has given the pod its addresses.
//
// ADD asks the node agent, over its unix socket and with the pod's netns
// passed as a file descriptor, whether and how to enroll the pod; when the
// agent says enroll, the plugin installs the in-pod redirection
// (plugin/redirect) and only then returns prevResult, so the app's first
// packet is already captured. DEL removes the redirection (when the netns
// still exists) and tells the agent; CHECK verifies the rules; GC passes
// the runtime's valid attachments to the agent; STATUS reports whether
// ADD can be served.
//
// When the agent cannot be reached at all, the enrollment snapshot the
// agent keeps on the node decides: a pod that could be enrolled fails
// closed (kubelet retries), any other pod starts unenrolled. See
// docs/plugin.md for the design and its residual risk.
//
// The binary is exec'd once per pod: it links only the protocol and
// redirection packages, never client-go or the agent.
package main
