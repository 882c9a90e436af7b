package agent

import (
	"context"
	"net"
	"sync"
	"time"

	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

// The plugin socket after a newer agent stops.
//
// Opening the socket replaces its path (cniproto.OpenSocket), so during a
// surge the newest agent owns the path and the plugin reaches it alone.
// When that newest agent stops while an older one keeps running — a
// rollback in the middle of a surge (`rollout undo` makes the old pod up
// to date again and the controller deletes the surge pod), or the newer
// agent dying — the path names a socket nobody serves any more, and,
// before this, nobody ever listened again: every ADD of an ambient pod on
// the node failed closed (connection refused) until the older agent
// restarted.
//
// So every agent checks, every socketCheck, whether the path still names
// its own socket; if it does not and the agent is the newest one that is
// not stopping (Options.Newest: instance.Self.Successor finds no live,
// non-stopping newer agent), it opens a fresh socket at the path,
// atomically, and serves it. A newer agent that marked itself stopping
// (SIGTERM) counts as gone at once, although it lives on while it drains:
// it closed its plugin server first thing. While a newer live agent runs
// the older one never takes the path: that would steal the socket
// mid-surge. The one window left: a newer agent registering between the
// older one's Newest check and its rename, then binding before that
// rename. It is closed by the same rule from the other side: the newer
// agent, the newest, finds the path not its own and takes it back within
// socketCheck.
//
// The socket the agent replaces is closed: the path stopped naming it at
// least socketCheck ago (a newer agent took it), so its accept loop has
// already taken what was queued on it.

// socketCheck is how often the agent looks at the plugin socket's path:
// a stat, and only when the path is not its own, a read of the instance
// registry. Also how long an ADD may find nobody after a rollback.
const socketCheck = time.Second

// socketKeeper serves the plugin socket, replacing it when Options.Newest
// says this agent should own a path that no longer names its socket.
type socketKeeper struct {
	a     *Agent
	serve func(*net.UnixListener) // starts an accept loop on a listener

	mu  sync.Mutex
	cur *cniproto.Socket
}

// run checks the path every socketCheck until ctx ends.
func (k *socketKeeper) run(ctx context.Context) {
	t := time.NewTicker(socketCheck)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			k.check(ctx)
		}
	}
}

// check takes the path back if it should (reports whether it did).
func (k *socketKeeper) check(ctx context.Context) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	mine, err := k.cur.Current()
	if err != nil {
		// Not evidence the path was lost (EMFILE, EACCES): look again
		// at the next check rather than replace a socket that may be
		// serving.
		k.a.log.Warn("plugin socket: cannot check its path", "err", err)
		return false
	}
	if mine || ctx.Err() != nil || !k.a.newest() {
		return false
	}
	s, err := cniproto.OpenSocket(k.cur.Path)
	if err != nil {
		k.a.m.socketTakeovers.WithLabelValues("error").Inc()
		k.a.log.Error("plugin socket: no newer agent serves it, and taking it back failed; ADDs on this node fail until this agent can", "socket", k.cur.Path, "err", err)
		return false
	}
	k.serve(s.Listener)
	k.cur.Close()
	k.cur = s
	k.a.live.serving(s.Listener, s)
	k.a.m.socketTakeovers.WithLabelValues("ok").Inc()
	k.a.log.Info("plugin socket taken back: the newer agent that held it stopped or died (a rollback?)", "socket", s.Path)
	return true
}

// newest reports whether this agent may own the plugin socket's path:
// no newer live agent that is not stopping runs on the node.
func (a *Agent) newest() bool { return a.newestFn != nil && a.newestFn() }
