package agent

import (
	"time"
)

// Serving on through a stop that no other agent takes over.
//
// A stop with an agent serving beside (the end of a surge upgrade, a
// rollback) closes the pods' listeners at once: their queue and every new
// connection go to that agent. With none (the kubelet restarting the
// container after a failed liveness probe, `crictl stop`), closing them
// at once sends every new connection to the keeper's copies (stopKeeper)
// or, without a keeper, refuses it, until the restarted agent re-adopts;
// and the agent exits only once the established connections are drained,
// up to drainTimeout. An HTTP client's idle keep-alive connection (Go's
// pool keeps one for 90 s), a database pool or a gRPC channel in any pod
// of the node keeps that drain going for all of drainTimeout (30 s), so
// on most nodes every new connection of every enrolled pod waited ~30 s
// plus the restart: its handshake done by the kernel, its data unread,
// most clients' request time-outs shorter than that.
//
// So with no agent beside, the agent goes on accepting while it drains
// (serveOn): the pods' listeners stay open, new connections are served
// at once, and HBONE peers keep their connections (no GOAWAY yet). It
// stops accepting when the node's pods hold no connection (nothing left
// to drain: the restart comes as soon as before) or, at the latest,
// drainTail before drainTimeout ends; then the listeners close and the
// connections still open get the tail to finish, as before. The stop
// takes no longer than drainTimeout, as before.
//
// The trade-off, and why it is taken:
//   - A connection accepted while serving on and still open at the end
//     is cut (reset), as every connection still open at the end of the
//     drain always was; left waiting in the queue it would have been
//     served whole by the restarted agent, but only after ~30 s, which
//     a request/response client does not wait out.
//   - The drain used to end once the connections open at the stop were
//     done; serving on, it ends once no connection is open at all. On
//     a node that is busy with short connections only (no keep-alive,
//     no pool), the restart (and with it the plugin server: ADDs of the
//     node wait and are retried) now comes up to drainTimeout-drainTail
//     later. With any long-lived connection, as on most nodes, the drain
//     took all of drainTimeout before too.
//   - Nothing else is served meanwhile: the plugin server, reconcile
//     loop and rule checks stopped with the context, as before.
//
// An agent that comes to serve beside this one while it serves on (with
// maxSurge 1 the DaemonSet controller creates the replacement pod at
// once when the agent's pod is deleted, `kubectl delete pod`; during a
// surge it deletes an old pod that turned unready while the new one
// still starts; a liveness restart while a newer agent starts) makes the
// stop a hand-over from then on:
// serving on ends, the keeper lets the copies go (stopKeeper), and the
// listeners close, so every new connection goes to that agent. Served on
// to the end instead, this agent would take about half of the new
// connections (SO_REUSEPORT) and cut those still open when its drain
// ends, though an agent is there to serve them for good
// (TestServeOnEndsWhenNewerAgentReady). Asked at every poll: a look at
// the instance registry, a few system calls per agent of the node.
//
// A tunnel whose Serving cannot say how many connections it holds (the
// tests' echo tunnel) is not served on: its listeners close at once.

// serveOnPoll is how often serveOn looks at the pods' connections.
const serveOnPoll = 100 * time.Millisecond

// connCounter is a Serving that says how many connections it holds now
// (*tunnel.Serving).
type connCounter interface{ Connections() int }

// drainTail is how much of drainTimeout the connections still open when
// the listeners close get: 5 s, or half of a shorter drainTimeout.
func drainTail(drain time.Duration) time.Duration { return min(5*time.Second, drain/2) }

// serveOn keeps pods served (their listeners open) while any of them
// holds a connection, for limit at most, and while no other agent serves
// beside this one; it reports whether one has come to (beside).
func (a *Agent) serveOn(pods []*pod, limit time.Duration) (beside bool) {
	var counted []connCounter
	for _, p := range pods {
		// Not p's lock: it serves on, and is only read.
		if c, ok := a.servingOf(p).(connCounter); ok {
			counted = append(counted, c)
		}
	}
	if len(counted) == 0 || limit <= 0 {
		return false
	}
	open := func() int {
		n := 0
		for _, c := range counted {
			n += c.Connections()
		}
		return n
	}
	n := open()
	if n == 0 {
		return false
	}
	start := time.Now()
	a.log.Info("no other agent serves the node: serving new connections while established ones drain", "connections", n, "atMost", limit)
	t := time.NewTicker(serveOnPoll)
	defer t.Stop()
	for range t.C {
		if a.beside != nil && a.beside() {
			a.log.Info("another agent serves the node now: closing the pods' listeners for it", "connections", open(), "servedOn", time.Since(start).Round(time.Millisecond))
			return true
		}
		if n = open(); n == 0 || time.Since(start) >= limit {
			break
		}
	}
	a.log.Info("closing the pods' listeners", "connections", n, "servedOn", time.Since(start).Round(time.Millisecond))
	return false
}
