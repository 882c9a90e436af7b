package tunnel

import (
	"container/list"
	"errors"
	"net"
	"sync"
	"time"
)

// This file is what keeps the agent's listeners standing under hostile
// or overwhelming load: one agent serves every pod of its node, so a
// peer flooding one pod's 15008, or an app opening thousands of
// connections to a dead address, must cost a bounded share of the
// agent and leave the other pods served.

// Listener names, for metrics and logs.
const (
	lnOutbound = "outbound" // 15001
	lnInbound  = "inbound"  // 15006
	lnHBONE    = "hbone"    // 15008
)

// Accept back-off after a failure, as Go's http.Server: 5 ms doubling
// to 1 s. The usual cause is the agent out of descriptors (EMFILE,
// ENFILE), which a retry at once cannot cure: without a pause the loop
// spins on the listener (the pending connection keeps it readable) and
// logs at every turn.
const (
	acceptDelayMin = 5 * time.Millisecond
	acceptDelayMax = time.Second
)

// acceptLoop accepts on ln until it closes and hands each connection to
// fn on its own goroutine. slots, when not nil, bounds the connections
// accepted and not yet established (fn releases its slot, see
// record.release): when they are all taken the loop stops accepting, so
// further connections wait in the kernel's accept queue (a few hundred
// bytes each, no goroutine, no descriptor of ours) instead of costing the
// agent a goroutine and two descriptors each.
func (sv *Serving) acceptLoop(ln net.Listener, name string, slots chan struct{}, fn func(*net.TCPConn, chan struct{})) {
	defer sv.loops.Done()
	var delay time.Duration
	var failures int
	var since time.Time
	for {
		if slots != nil && !sv.takeSlot(slots, name) {
			return
		}
		c, err := ln.Accept()
		if err != nil {
			if slots != nil {
				<-slots
			}
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Every failure is counted; only the first of a burst is
			// logged (with EMFILE a line per try was the only thing
			// the agent still did).
			sv.p.m.acceptErrors.WithLabelValues(name).Inc()
			if failures == 0 {
				since = time.Now()
				sv.log.Warn("accept failed; retrying with back-off until it works again", "listener", name, "err", err)
			}
			failures++
			delay = min(max(2*delay, acceptDelayMin), acceptDelayMax)
			sv.pause(delay)
			continue
		}
		if failures > 0 {
			sv.log.Info("accept works again", "listener", name, "failures", failures, "after", time.Since(since).Round(time.Millisecond).String())
			failures, delay = 0, 0
		}
		tc, ok := c.(*net.TCPConn)
		if !ok {
			c.Close()
			if slots != nil {
				<-slots
			}
			continue
		}
		sv.enter()
		go func() {
			defer sv.leave()
			defer sv.recoverConn(func() { reset(tc) })
			fn(tc, slots)
		}()
	}
}

// pause sleeps for d, or until Close begins (Close waits for the loops:
// it must not wait out a back-off).
func (sv *Serving) pause(d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-sv.stop:
	}
}

// takeSlot takes one of slots, waiting while all are taken; false when
// Close began meanwhile.
func (sv *Serving) takeSlot(slots chan struct{}, name string) bool {
	select {
	case slots <- struct{}{}:
		return true
	default:
	}
	sv.p.m.acceptPaused.WithLabelValues(name).Inc()
	if sv.p.pauseLog.allow(time.Now()) {
		sv.log.Warn("too many connections not yet established: accepting no more until some are", "listener", name, "limit", cap(slots))
	}
	select {
	case slots <- struct{}{}:
		return true
	case <-sv.stop:
		return false
	}
}

// release gives back the connection's accept slot (once; nothing when it
// has none). Called when the connection is established (it then costs
// what the app's own connection would) and, deferred, when it fails.
func (r *record) release() {
	if r.slots != nil {
		<-r.slots
		r.slots = nil
	}
}

// handshakes are an agent's inbound HBONE connections still in their
// TLS handshake (and HTTP/2 preface), oldest first, for all its pods.
// Before the handshake ends nobody is authenticated: anyone who can
// reach a pod's 15008 can open them and send nothing. Each costs a
// goroutine or two, a descriptor and TLS state for up to the handshake
// timeout. Blocking accept at a limit would let such a flood hold the
// accept queue ahead of real clients, so instead a connection past the
// limit (the pod's, else the agent's) closes the oldest pending one:
// a real client's handshake takes milliseconds, a flood's connections
// are the ones that linger, and a flood must open connections faster
// than limit / handshake time to push a real client out.
type handshakes struct {
	m             *metrics
	podMax, total int

	mu  sync.Mutex
	all list.List // *pendingHS
}

type pendingHS struct {
	c        *net.TCPConn
	sv       *Serving
	all, pod *list.Element
	evicted  bool
}

// add registers c, the pod's newest pending handshake, and evicts the
// oldest one of the pod or of the agent if a limit is passed.
func (hs *handshakes) add(sv *Serving, c *net.TCPConn) *pendingHS {
	h := &pendingHS{c: c, sv: sv}
	var victim *pendingHS
	var which string
	hs.mu.Lock()
	h.all = hs.all.PushBack(h)
	h.pod = sv.handshakes.PushBack(h)
	switch {
	case sv.handshakes.Len() > hs.podMax:
		victim, which = sv.handshakes.Front().Value.(*pendingHS), "pod"
	case hs.all.Len() > hs.total:
		victim, which = hs.all.Front().Value.(*pendingHS), "agent"
	}
	if victim != nil {
		hs.removeLocked(victim)
		victim.evicted = true
	}
	hs.mu.Unlock()
	// Counted up and down rather than set: Proxies sharing a registry
	// share the gauge.
	hs.m.pendingHandshakes.Inc()
	if victim != nil {
		hs.m.pendingHandshakes.Dec()
		hs.m.evicted.WithLabelValues(which).Inc()
		// Closing the socket ends its handshake's read at once.
		reset(victim.c)
	}
	return h
}

func (hs *handshakes) removeLocked(h *pendingHS) {
	hs.all.Remove(h.all)
	h.sv.handshakes.Remove(h.pod)
}

// done unregisters h once its handshake ended; it says whether h was
// evicted (its error is then the eviction's).
func (hs *handshakes) done(h *pendingHS) (evicted bool) {
	hs.mu.Lock()
	evicted = h.evicted
	if !evicted {
		hs.removeLocked(h)
	}
	hs.mu.Unlock()
	if !evicted {
		hs.m.pendingHandshakes.Dec()
	}
	return evicted
}

// evictPod closes every pending handshake of sv (Close's cut: a
// handshake that has not ended by the deadline never will be waited for).
func (hs *handshakes) evictPod(sv *Serving) {
	var victims []*pendingHS
	hs.mu.Lock()
	for e := sv.handshakes.Front(); e != nil; e = e.Next() {
		victims = append(victims, e.Value.(*pendingHS))
	}
	for _, h := range victims {
		hs.removeLocked(h)
		h.evicted = true
	}
	hs.mu.Unlock()
	hs.m.pendingHandshakes.Sub(float64(len(victims)))
	for _, h := range victims {
		reset(h.c)
	}
}

// logLimiter lets through a few lines a second of a kind that anyone on
// the network can cause at will (a failed handshake needs no
// certificate): every event is counted in the metrics, but formatting
// and writing a line for each let a peer turn its handshakes into the
// agent's CPU and the node's log volume.
type logLimiter struct {
	perSecond int

	mu         sync.Mutex
	window     time.Time
	left       int
	suppressed int
}

// allow says whether to log now; suppressed is how many lines were left
// out since the last one logged (to say so in it).
func (l *logLimiter) allow(now time.Time) bool {
	ok, _ := l.take(now)
	return ok
}

func (l *logLimiter) take(now time.Time) (ok bool, suppressed int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if now.Sub(l.window) >= time.Second {
		l.window, l.left = now, l.perSecond
	}
	if l.left == 0 {
		l.suppressed++
		return false, 0
	}
	l.left--
	suppressed, l.suppressed = l.suppressed, 0
	return true, suppressed
}
