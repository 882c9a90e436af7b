// Package keeper holds duplicates of the agent's listening sockets in a
// second process, so that a crash of the agent (kill -9, an OOM kill, a
// panic) does not close them.
//
// Without it, the in-pod listeners (15001, 15006, 15008) close with the
// agent process, and until the kubelet has restarted the agent container
// (about a second) every new connection of every enrolled pod on the node
// is refused — fail closed, never plaintext, but an outage. With it, the
// sockets stay in LISTEN: the kernel keeps completing handshakes into
// their accept queues, and the connections wait instead. The restarted
// agent opens its own listeners beside them (SO_REUSEPORT) and hands each
// pod's new sockets to the keeper, which then closes the old ones; the
// kernel moves what was queued on them to the new listeners
// (net.ipv4.tcp_migrate_req, set in every enrolled pod, Linux ≥ 5.14).
// Connections the dead agent had already accepted are lost either way.
//
// The keeper runs as `ambit-agent keeper`, in its own container of the
// agent's pod (a process of the agent's container would die with it), and
// talks over a unix SOCK_SEQPACKET socket in a volume the two containers
// share: one JSON datagram per request, the sockets attached with
// SCM_RIGHTS, one JSON answer. Only a peer of the keeper's own user is
// served. Entries are keyed by the pod's sandbox (container ID) and carry
// the generation of the agent that put them: Put replaces a key's sockets
// (closing the old ones), Drop closes them, Prune closes every entry of an
// older generation (after a restarted agent has re-adopted its pods, what
// is left belongs to pods that are gone, and keeping it would keep their
// network namespaces alive), or all of them when the agent stops while
// another agent serves the node beside it (a surge upgrade's hand-over,
// which the kept copies would otherwise hold up). A stop with no such
// agent (the kubelet restarting the container after a failed liveness
// probe) keeps them, as a crash does.
//
// An error from the keeper's own accept (EMFILE under fd exhaustion, say)
// is waited out with a backoff, as net/http does, and logged once: the
// kept sockets need nothing of the accept loop to stay in LISTEN, and
// giving up would close them all. Only shutdown stops it.
//
// The agent treats the keeper as best effort: if it is not there, or
// fails, the agent serves as before and logs it.
package keeper
