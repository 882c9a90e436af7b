// Package readytaint takes the agent's startup taint off its own Node once
// the agent can enroll pods.
//
// A node that joins the cluster runs pods as soon as the scheduler sends
// them, and until this node's agent has written ambit-cni's entry into the
// CNI config, a pod's sandbox is set up without ambit-cni: an ambient pod
// starts outside the mesh, and the agent enrolls it live later (its first
// connections in plaintext). A platform engineer closes that window as with
// Cilium (node.cilium.io/agent-not-ready) or istio-cni's taint controller:
// nodes register with a NoSchedule taint (kubelet
// --register-with-taints=ambit.dev/agent-not-ready=:NoSchedule, or the node
// pool's taints), the agent's DaemonSet tolerates it, and the agent removes
// it once its CNI entry is in place and its socket serves. Nodes registered
// without the taint see nothing: the agent only reads its Node then.
//
// Run, after the Ready signal:
//
//   - watches this node's Node alone (an informer with the field selector
//     metadata.name=<node>, trimmed to name, resourceVersion and taints),
//     and also looks once at the start, so a list the agent may not do
//     does not keep it from trying;
//   - whenever the Node carries a taint with the key (any effect, any
//     value), reads the Node from the API server and sends a JSON merge
//     patch of spec.taints without those taints, carrying the
//     resourceVersion it read: the API server refuses it (409 Conflict)
//     if anyone changed the Node in between, so another controller's
//     taint added meanwhile is never dropped; a conflict is retried with a
//     fresh read;
//   - removes it again each time someone (a node pool reconciler, a
//     person) puts it back while the agent runs: the taint says "the
//     agent is not ready", which is false then;
//   - logs each removal ("removed the startup taint") and counts it
//     (ambit_agent_ready_taint_removals_total); any other failure
//     (forbidden: the ClusterRole lacks patch on nodes; policy: the
//     admission policy that keeps the agent to its own Node refused; the API server
//     unreachable) is logged with what to do, counted
//     (ambit_agent_ready_taint_errors_total{reason}) and retried with
//     exponential back-off (1 s to 2 min). Nothing here is fatal: the mesh
//     works without this feature, only the node stays unschedulable for
//     pods that do not tolerate the taint.
//
// The agent never puts the taint back (when it stops, restarts or is
// upgraded): enrolled pods keep running, the CNI entry stays, and the next
// agent serves the pods that start meanwhile or ambit-cni's fail-closed
// policy holds them. An empty key disables everything here, no API call.
package readytaint
