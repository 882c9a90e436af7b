// Package instance tells apart the ambit-agent processes that run at the
// same time on one node.
//
// Normally there is one. During a surge upgrade (DaemonSet maxSurge: 1,
// maxUnavailable: 0) the new agent starts beside the old one, binds its
// listeners next to the old ones (SO_REUSEPORT), re-adopts every pod, and
// only once it is ready does the DaemonSet controller stop the old one,
// whose queued connections then migrate to the new listeners. For that
// overlap to be safe, each agent must know whether a newer one exists:
//
//   - both share the host's health port (:15021, SO_REUSEPORT), so the
//     kubelet's readiness probe of the new pod may reach the old agent.
//     The new pod's exec startup probe (Probe) answers for its own
//     process, and readiness is probed only after it passed, so the new
//     pod cannot be marked ready by its predecessor's answer; each agent
//     answers /readyz for itself (an old agent answering "not ready" for
//     the node made the DaemonSet controller delete its pod mid-surge);
//   - an agent that has a successor stops re-asserting the node's files
//     (plugin binary, conflist entry), so two versions do not overwrite
//     each other's binary until the old one exits;
//   - an agent that has a ready successor (ReadySuccessor: any newer
//     agent that is ready, so a third agent still starting does not
//     count) leaves the host probe rules to it;
//   - the newest agent that is not stopping owns the plugin socket's
//     path: each agent opening the socket replaces the path, and an
//     older agent whose successors all stopped or died takes it back
//     (node-agent/agent/socket.go), a rollback mid-surge leaving nothing
//     newer to listen there.
//
// Each agent registers a file under <stateDir>/instances named by its
// start time (so names sort by age) and holds an exclusive flock on it for
// its whole life: the kernel drops the lock when the process dies, kill -9
// included, so a file whose lock can be taken belongs to a dead agent and
// is removed by whoever notices. Only that is evidence of death: an entry
// that cannot be opened for another reason (EMFILE, the process out of
// descriptors; EACCES) belongs to an agent in an unknown state, which is
// kept and counts as alive (stopping if last seen so), and a registry that
// cannot be read at all answers as at the last look. Readiness is a second file, <name>.ready,
// created when the agent is ready. An agent that begins shutting down
// (SIGTERM) appends a "stopping" line to its entry and removes its ready
// marker: while it drains it is nobody's successor, so an older agent
// still running takes back what it had yielded at once. The files are tiny and the directory is
// read at most once per health probe or installer pass.
package instance
