package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ambit-mesh/ambit/node-agent/health"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

// Liveness: /healthz fails, and the kubelet restarts the agent, when a
// loop without which the node can no longer enroll or repair pods has
// stopped turning (docs/agent.md "Liveness"). A restart resets every
// connection the node carries, so each bound is several times what the
// loop legitimately takes, and a loop waiting on slow work that a
// restart would not speed up (the API server, iptables behind the
// host-wide xtables lock, the keeper) is bounded by that work's own
// time-outs, which are all far below these bounds.
//
// Variables so tests can shorten them.
var (
	// loopGrace: how long past its due turn the reconcile loop may be.
	// It turns at least every reconcileEvery (its ticker) and, during a
	// pass, after every pod; one pod's step waits at most for the view's
	// lookup (requestTimeout, 8 s), a /proc scan, and a few iptables runs
	// (10 s each): far below two minutes.
	loopGrace = 2 * time.Minute
	// socketCheckEvery: how often the agent connects to its own plugin
	// socket and waits for the accept loop to take the connection
	// (socketCheckTimeout at most); socketGrace: how long past the next
	// due check the last answer may be. 90 s without an answer: a burst
	// of 300 ADDs is answered in ~5 s, and a request gives its server
	// slot back within well under a minute unless its handler is stuck:
	// an ADD or CHECK waits for its pod's lock only until the request's
	// deadline (requestTimeout, 8 s), a DEL or GC still at work then
	// goes on detached from its slot (detachable), and what an ADD does
	// once it holds the lock is bounded by each step's own time-out
	// (lookup 8 s, each iptables run 10 s, keeper 2 s), not by the
	// request's deadline.
	socketCheckEvery   = 10 * time.Second
	socketCheckTimeout = 10 * time.Second
	socketGrace        = 80 * time.Second
	// requestStallAfter: a plugin request still handled after this is
	// stuck (the plugin gave up after 15 s; every step of an ADD, CHECK,
	// DEL or GC is bounded far below this), and with it its pod's lock:
	// that pod, and every later request landing on the same lock stripe,
	// waits for ever, each holding one of the server's slots.
	requestStallAfter = 2 * time.Minute
)

// reconcileEvery is the reconcile loop's tick (the snapshot rewrite).
const reconcileEvery = time.Minute

// Names of the liveness checks (/healthz lines, the metrics' loop label).
const (
	checkReconcile = "reconcile"
	checkRules     = "rule-check"
	checkSocket    = "plugin-socket"
	checkRequests  = "plugin-requests"
)

// liveness holds the heartbeats of the agent's loops and the plugin
// requests in progress.
type liveness struct {
	reconcile *health.Heartbeat
	rules     *health.Heartbeat // nil: ruleCheckInterval 0 (no periodic check)
	socket    *health.Heartbeat

	// plugin is the socket this agent serves the plugin on now;
	// socketMissed: its last self-check got no answer.
	plugin       atomic.Pointer[servedSocket]
	socketMissed atomic.Bool
	// checked: the socket the self-check loop last looked at, and
	// checkFrom: when that loop started (both the loop's alone).
	checked   *servedSocket
	checkFrom time.Time

	mu       sync.Mutex
	nextReq  uint64
	inflight map[uint64]inflightReq
}

type servedSocket struct {
	path string
	// sock tells whether path still names it; nil (RunListener): taken
	// to be so.
	sock *cniproto.Socket
	// since: when this agent started serving it.
	since time.Time
}

type inflightReq struct {
	what  string
	since time.Time
}

func newLiveness(ruleCheckEvery time.Duration) *liveness {
	l := &liveness{
		reconcile: health.NewHeartbeat(checkReconcile, loopGrace),
		socket:    health.NewHeartbeat(checkSocket, socketGrace),
		inflight:  map[uint64]inflightReq{},
	}
	if ruleCheckEvery > 0 {
		// A pass checks pods four at a time, each bounded by the
		// iptables time-out; a long interval gets a grace to match.
		l.rules = health.NewHeartbeat(checkRules, max(loopGrace, 2*ruleCheckEvery))
	}
	return l
}

// registerLiveness adds the checks to h. A stopping agent passes them all: its
// loops end on purpose while it drains.
func (a *Agent) registerLiveness(h *health.Server) {
	unlessStopping := func(fn func() error) func() error {
		return func() error {
			if a.stopping.Load() {
				return nil
			}
			return fn()
		}
	}
	for _, hb := range []*health.Heartbeat{a.live.reconcile, a.live.rules, a.live.socket} {
		if hb == nil {
			continue
		}
		h.AddHeartbeat(hb)
		// Replaces the plain check AddHeartbeat added.
		h.AddLiveness(hb.Name(), unlessStopping(hb.Check))
	}
	h.AddLiveness(checkRequests, unlessStopping(a.live.oldestRequest))
}

// beat is hb.Beat(next) for a heartbeat that may be nil.
func beat(hb *health.Heartbeat, next time.Duration) {
	if hb != nil {
		hb.Beat(next)
	}
}

// reconcileBeat and rulesBeat are the heartbeats (nil for an Agent made
// without New, as some tests do).
func (l *liveness) reconcileBeat() *health.Heartbeat {
	if l == nil {
		return nil
	}
	return l.reconcile
}

func (l *liveness) rulesBeat() *health.Heartbeat {
	if l == nil {
		return nil
	}
	return l.rules
}

// startRequest records a plugin request in progress until the returned
// func is called.
func (l *liveness) startRequest(req *cniproto.Request) func() {
	if l == nil {
		return func() {}
	}
	l.mu.Lock()
	l.nextReq++
	id := l.nextReq
	l.inflight[id] = inflightReq{what: string(req.Op) + " " + req.Pod.Namespace + "/" + req.Pod.Name, since: time.Now()}
	l.mu.Unlock()
	return func() {
		l.mu.Lock()
		delete(l.inflight, id)
		l.mu.Unlock()
	}
}

// oldestRequest fails while a plugin request has been handled for longer
// than requestStallAfter.
func (l *liveness) oldestRequest() error {
	l.mu.Lock()
	var oldest inflightReq
	n := 0
	for _, r := range l.inflight {
		if oldest.since.IsZero() || r.since.Before(oldest.since) {
			oldest = r
		}
		n++
	}
	l.mu.Unlock()
	if n == 0 {
		return nil
	}
	if age := time.Since(oldest.since); age > requestStallAfter {
		return fmt.Errorf("stalled: %s in progress for %s (allowed %s; %d requests in progress)",
			oldest.what, age.Round(time.Millisecond), requestStallAfter, n)
	}
	return nil
}

// serving records the plugin socket this agent now serves (sock nil: a
// listener handed to RunListener).
func (l *liveness) serving(ln *net.UnixListener, sock *cniproto.Socket) {
	if l == nil {
		return
	}
	s := &servedSocket{sock: sock, since: time.Now()}
	if sock != nil {
		s.path = sock.Path
	} else if ln != nil {
		s.path = ln.Addr().String()
	}
	l.plugin.Store(s)
}

// checkSocketLoop connects to the plugin socket every socketCheckEvery
// and beats the socket heartbeat each time the accept loop took the
// connection and closed it (the server's answer to a connection without
// a request, as to the plugin's Probe). A heartbeat kept by the accept
// loop itself would stop whenever no ADD comes, which is no stall; this
// fails only when a connection waits unaccepted: the server's slots all
// held by stuck exchanges, or its loop gone.
func (a *Agent) checkSocketLoop(ctx context.Context) {
	a.live.checkFrom = time.Now()
	t := time.NewTicker(socketCheckEvery)
	defer t.Stop()
	for {
		a.checkSocketOnce(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (a *Agent) checkSocketOnce(ctx context.Context) {
	s := a.live.plugin.Load()
	if s == nil || s.path == "" {
		return
	}
	if s != a.live.checked {
		// A socket this agent serves from now on (the first, or one
		// taken back from a newer agent that stopped): its first
		// answer is due socketCheckEvery after it was opened, or
		// after this loop started (nothing is due before the agent
		// is ready), not at its first answer, which an accept loop
		// broken from the start never gives. The path then owned by
		// a newer agent rests it again just below.
		a.live.checked = s
		from := s.since
		if from.Before(a.live.checkFrom) {
			from = a.live.checkFrom
		}
		a.live.socket.Expect(socketCheckEvery - time.Since(from))
	}
	if s.sock != nil {
		if mine, err := s.sock.Current(); err == nil && !mine {
			// A newer agent (a surge upgrade) took the path: the
			// plugin reaches that one, and this one's accept loop
			// serves nobody. Not a stall of this agent; due again
			// once the path is taken back (a new socket, above).
			a.live.socket.Rest()
			return
		}
	}
	if err := socketAnswers(ctx, s.path, socketCheckTimeout); err != nil {
		// The first miss after an answer is a warning; while misses
		// last, /healthz and its log say the rest.
		if ctx.Err() == nil && a.live.socketMissed.CompareAndSwap(false, true) {
			a.log.Warn("plugin socket self-check: no answer", "socket", s.path, "err", err,
				"lastAnswer", a.live.socket.LastTurn().UTC().Format(time.RFC3339))
		}
		return
	}
	if a.live.socketMissed.CompareAndSwap(true, false) {
		a.log.Info("plugin socket self-check answered again", "socket", s.path)
	}
	a.live.socket.Beat(socketCheckEvery)
}

// socketAnswers connects to the plugin socket at path, says it sends
// nothing (shutdown for writing) and waits for the server to accept the
// connection and close it.
func socketAnswers(ctx context.Context, path string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "unixpacket", path)
	if err != nil {
		// EAGAIN: the accept queue is full.
		return err
	}
	defer c.Close()
	uc := c.(*net.UnixConn)
	dl, _ := ctx.Deadline()
	uc.SetDeadline(dl)
	if err := uc.CloseWrite(); err != nil {
		return err
	}
	var b [1]byte
	n, err := uc.Read(b[:])
	switch {
	case errors.Is(err, io.EOF):
		return nil
	case err != nil:
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return fmt.Errorf("connection not taken by the accept loop within %s", timeout)
		}
		return err
	case n > 0:
		// It answered something: it accepts.
		return nil
	}
	return nil
}
