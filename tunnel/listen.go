package tunnel

import (
	"container/list"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
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
			defer sv.recoverConn(nil, func() { reset(tc) })
			fn(tc, slots)
		}()
	}
}

// minQueued is the least wait in the accept queue connStart counts: the
// kernel keeps the time in jiffies (1 to 10 ms), so a connection
// accepted at once can read up to one old, and each short connection's
// duration would grow by that noise.
const minQueued = 10 * time.Millisecond

// connStart is when c's client connected, as near as the agent can tell,
// given now, the handler's start: the connection may have waited in the
// listener's accept queue since the kernel completed its handshake (all
// accept slots taken, the agent busy or being replaced: tcp_migrate_req
// hands the old agent's queue to the new one), and its duration starts
// at the client's connect. No accept time stamp exists (SO_TIMESTAMP is
// for received data); but an accepted socket has sent no data yet, and
// TCP_INFO's last_data_sent is the time since it last did or, before,
// since the kernel created it (lsndtime, set as the handshake completes).
// Only before the agent writes to c. now when that cannot be read or is
// under minQueued. One getsockopt per connection.
func connStart(c *net.TCPConn, now time.Time) time.Time {
	rc, err := c.SyscallConn()
	if err != nil {
		return now
	}
	var queued time.Duration
	_ = rc.Control(func(fd uintptr) {
		if ti, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
			queued = time.Duration(ti.Last_data_sent) * time.Millisecond
		}
	})
	if queued < minQueued {
		return now
	}
	return now.Add(-queued)
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
// TLS handshake, oldest first, for all its pods. Before the handshake
// ends nobody is authenticated: anyone who can reach a pod's 15008 can
// open them and send nothing. Each costs a goroutine or two, a
// descriptor and TLS state for up to the handshake timeout. Blocking
// accept at a limit would let such a flood hold the accept queue ahead
// of real clients, so instead new connections make room by closing
// pending ones, but only those that make no progress:
//
//   - past the pod's limit (podMax), the pod's oldest pending handshake
//     that is silent (no byte from its peer hsSilentAfter after accept)
//     or stale (the peer's turn, not ours, for hsStaleAfter: owed): as
//     many as it takes to get back to the limit, and none when none
//     qualifies (the newcomer is admitted anyway);
//   - past the agent's (total, the hard cap), the agent's oldest silent
//     or stale one, else its oldest regardless.
//
// A real client sends its ClientHello right behind its connect and then
// waits on the agent's CPU, not the other way round: a herd of them (a
// popular server pod restarts, hundreds of client pods' agents
// reconnect within milliseconds) queues up far past 256 pending on a
// busy agent, and closing the oldest of those failed real requests
// (TestHandshakeBurstNotEvicted: 327 of 600 failed before). An idle flood is
// silent and is cut back to the limit by the next arrivals; a flood
// that sends a ClientHello and stalls is cut once stale. Either way the
// agent never holds more than total: 4,096 by default, as before, about
// 55 MiB at 13.5 KB an idle pending connection; at the cap the oldest
// goes, a flood's before a real client's, which is pushed out only by
// 4,096 newer arrivals during its own handshake (400,000 a second for a
// 10 ms handshake, where the pod's limit alone took 25,000).
//
// A handshake stops being pending the moment it ends (finish, from
// hbone.Server's verify callback), not when the goroutine that ran it
// gets the CPU back: on a saturated agent that took long enough for the
// connection to serve its first stream meanwhile, and closing it then
// (it looked stale) broke a request in flight.
type handshakes struct {
	m             *metrics
	podMax, total int
	// now is time.Now, replaced in tests.
	now func() time.Time

	mu  sync.Mutex
	all list.List // *pendingHS

	// byConn finds a pending handshake from its socket for reads (hbone
	// calls it without our lock, on the handshake's goroutine).
	byConn sync.Map // *net.TCPConn -> *pendingHS
}

// A pending handshake is a candidate for eviction once it is silent (no
// byte from the peer hsSilentAfter after accept) or stale (waiting on
// its peer, not on us, for hsStaleAfter).
//
// hsSilentAfter: a real client's ClientHello leaves right behind its
// connect (Go's client: one key generation, about 0.1 ms) and arrives
// one packet behind the handshake's last ACK, from any distance; 100 ms
// leaves room for a client agent descheduled on a busy node, and an
// idle flood holds at most the limit plus its last 100 ms of arrivals.
//
// hsStaleAfter: a real client answers our flight within a round trip
// and its own CPU time, milliseconds, and sends its ClientHello whole
// right behind its connect. A peer that owes us the next step for 1 s
// while new connections keep coming is a flood that sends a ClientHello
// and stalls (each costs us a full handshake) or a slow trickle. The
// second counts from the start of the peer's turn (accept, or our first
// wait for its answer after our flight), not from accept: on a
// saturated agent a handshake waits on us for seconds before our flight
// leaves, and counted from accept its client then had no time at all to
// answer. Time it waits on us never counts, however long: a herd larger
// than the agent's CPU gets through at the agent's pace.
// TestHandshakeBurstNotEvicted's evictions on the way: 2,000 clients, 53
// when age alone made a handshake stale; 1,200: 6 when only unread
// bytes counted as our turn (ClientHellos read, not yet answered); 600
// on a loaded VM, 294 in 12 of 40 runs when the turn counted from accept
// and bytes read off the socket were the peer's: 211 answers crypto/tls
// had not got back to (88 ms to 1.5 s after they came), 28 flights sent
// 0.4-1 s before, 3 ClientHellos not yet at GetCertificate, 52 clients
// of the test's own starved process slow to answer (herd_test.go).
const (
	hsSilentAfter = 100 * time.Millisecond
	hsStaleAfter  = time.Second
)

// A pendingHS's state moves once, from pending to finished (its
// handshake ended: finish or done) or evicted (add, evictPod): a CAS, so
// a handshake that ends while it is being evicted is either evicted
// before it is used or not evicted at all.
const (
	hsPending int32 = iota
	hsFinished
	hsEvicted
)

type pendingHS struct {
	c        *net.TCPConn
	sv       *Serving
	all, pod *list.Element
	start    time.Time
	state    atomic.Int32
	phase    atomic.Int32 // phaseStart, phaseHello, phaseFlight
	// spoke: the peer was seen to have sent something (set once, when
	// first looked at as a candidate, so each connection costs at most
	// one getsockopt); recheck: stale but waiting on us, not to be
	// looked at before then. Guarded by handshakes.mu.
	spoke   bool
	recheck time.Time
	// reading is where the handshake's reads stand (reads):
	// readUnknown before the first, readBusy from the start of each
	// read (bytes it finds are ours to work on, however long that
	// takes), readWaiting once one found nothing (the peer's turn).
	// owedSince (monoNanos of handshakes.now) is when the peer's turn
	// began: accept, then our first wait after each step crypto/tls
	// reports (reached); 0 while we have not waited since.
	reading   atomic.Int32
	owedSince atomic.Int64
}

const (
	readUnknown int32 = iota
	readWaiting
	readBusy
)

// add registers c, the pod's newest pending handshake, and evicts
// pending handshakes as the policy above says when a limit is passed.
func (hs *handshakes) add(sv *Serving, c *net.TCPConn) *pendingHS {
	h := &pendingHS{c: c, sv: sv}
	var victims []*pendingHS
	hs.m.pendingHandshakes.Inc()
	hs.mu.Lock()
	// Under the lock: the lists stay in start order (candidateLocked
	// stops at the first one too young).
	now := hs.now()
	h.start = now
	h.owedSince.Store(monoNanos(now))
	h.all = hs.all.PushBack(h)
	h.pod = sv.handshakes.PushBack(h)
	hs.byConn.Store(c, h)
	for sv.handshakes.Len() > hs.podMax {
		v := hs.candidateLocked(&sv.handshakes, now)
		if v == nil {
			break
		}
		victims = append(victims, v)
	}
	nPod := len(victims)
	for hs.all.Len() > hs.total {
		v := hs.candidateLocked(&hs.all, now)
		if v == nil {
			v = hs.oldestLocked()
		}
		if v == nil {
			break
		}
		victims = append(victims, v)
	}
	hs.mu.Unlock()
	if len(victims) > 0 {
		// Counted up and down rather than set: Proxies sharing a
		// registry share the gauge.
		hs.m.pendingHandshakes.Sub(float64(len(victims)))
		if nPod > 0 {
			hs.m.evicted.WithLabelValues("pod").Add(float64(nPod))
		}
		if n := len(victims) - nPod; n > 0 {
			hs.m.evicted.WithLabelValues("agent").Add(float64(n))
		}
		for _, v := range victims {
			// Closing the socket ends its handshake's read at once.
			reset(v.c)
		}
	}
	return h
}

// candidateLocked evicts (marks and unlists) and returns the oldest
// pending handshake of l (the agent's list or a pod's) that is silent or
// stale at now, or returns nil. The list is in start order: the walk
// ends at the first one too young to be either. Those it passes have
// spoken and are not stale: a herd's (hundreds, a few ns each), a
// getsockopt once per connection, an ioctl and a getsockopt per one
// pending over hsStaleAfter, again every hsSilentAfter while it waits on
// us or when its peer's turn reaches hsStaleAfter. Finished ones still
// listed (their goroutine has yet to take the lock) are unlisted on the
// way.
func (hs *handshakes) candidateLocked(l *list.List, now time.Time) *pendingHS {
	for e := l.Front(); e != nil; {
		h := e.Value.(*pendingHS)
		e = e.Next()
		if h.state.Load() != hsPending {
			hs.removeLocked(h)
			continue
		}
		age := now.Sub(h.start)
		switch {
		case age < hsSilentAfter:
			return nil
		case age < hsStaleAfter:
			if h.spoke {
				continue
			}
			if !peerSilent(h.c) {
				h.spoke = true
				continue
			}
		case now.Before(h.recheck):
			continue
		default:
			owes, since := h.owed(now)
			if !owes {
				// Old, but it is our turn: it waits on our CPU (a
				// herd on a saturated agent), and closing it would
				// fail a client that did nothing wrong. Looked at
				// again in hsSilentAfter, not at every arrival.
				h.recheck = now.Add(hsSilentAfter)
				continue
			}
			if stale := since.Add(hsStaleAfter); now.Before(stale) {
				// The peer's turn, but not for long (our flight left
				// late: we were the slow one).
				h.recheck = stale
				continue
			}
		}
		if hs.evictLocked(h) {
			return h
		}
	}
	return nil
}

// oldestLocked evicts and returns the agent's oldest pending handshake,
// nil when there is none.
func (hs *handshakes) oldestLocked() *pendingHS {
	for e := hs.all.Front(); e != nil; {
		h := e.Value.(*pendingHS)
		e = e.Next()
		if hs.evictLocked(h) {
			return h
		}
	}
	return nil
}

// evictLocked unlists h and says whether it was evicted (false: its
// handshake had just ended).
func (hs *handshakes) evictLocked(h *pendingHS) bool {
	hs.removeLocked(h)
	return h.state.CompareAndSwap(hsPending, hsEvicted)
}

// peerSilent reports whether c's peer has sent no byte at all
// (tcpi_bytes_received, Linux 4.1 and later). A socket it cannot ask
// (closed meanwhile: its handshake is ending) is not silent: it is
// about to leave the list anyway.
func peerSilent(c *net.TCPConn) bool {
	rc, err := c.SyscallConn()
	if err != nil {
		return false
	}
	silent := false
	_ = rc.Control(func(fd uintptr) {
		ti, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
		silent = err == nil && ti.Bytes_received == 0
	})
	return silent
}

// Where a pending handshake stands, as crypto/tls tells it (the
// server's GetCertificate and VerifyPeerCertificate, wrapped by
// inboundHBONE): the socket alone cannot tell a ClientHello read whole
// and being answered from one read in part and waiting for the rest.
const (
	phaseStart  int32 = iota
	phaseHello        // the whole ClientHello is in: our flight next
	phaseFlight       // the client's certificate is in: ours to check, then its CertificateVerify
)

// owed reports whether h's handshake waits on its peer and, if so,
// since when. Ours: bytes of the peer wait unread (SIOCINQ); its last
// read has not found the socket empty (reads: what it took is
// crypto/tls's to work on, and a saturated agent takes its time to get
// back to it while the socket shows nothing). Once we have its
// certificate (phaseFlight) the peer owes the rest of its flight from
// our next wait. Before any read is reported (hbone has not started,
// or a Server without the hook), from the socket alone: bytes unread,
// its certificate in, or its whole
// ClientHello in and our flight not sent yet (tcpi_bytes_sent, Linux
// 4.19; an older kernel reports 0, so such a handshake is never stale
// past its ClientHello: the hard cap still holds). The peer's turn
// runs from owedSince, accept when it is unknown.
func (h *pendingHS) owed(now time.Time) (owes bool, since time.Time) {
	phase, reading := h.phase.Load(), h.reading.Load()
	// The certificate is ours to check only until the handshake next
	// waits: VerifyPeerCertificate runs before the CertificateVerify is
	// read, and the certificate is no secret (every 15008 shows its
	// own), so a peer that stalls there owes us the rest like any
	// other (TestHandshakeCertStallFloodBounded). Without reads
	// reported, the socket cannot tell: ours, as before.
	if reading == readBusy || phase == phaseFlight && reading == readUnknown {
		return false, time.Time{}
	}
	rc, err := h.c.SyscallConn()
	if err != nil {
		return false, time.Time{}
	}
	ours := false
	_ = rc.Control(func(fd uintptr) {
		if n, err := unix.IoctlGetInt(int(fd), unix.SIOCINQ); err == nil && n > 0 {
			ours = true
			return
		}
		if reading == readUnknown && phase == phaseHello {
			ti, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
			ours = err == nil && ti.Bytes_sent == 0
		}
	})
	if ours {
		return false, time.Time{}
	}
	switch at := h.owedSince.Load(); {
	case at != 0:
		return true, monoTime(at)
	case reading == readUnknown:
		return true, h.start
	default:
		return true, now
	}
}

// reached records that h's handshake got to phase (phaseHello,
// phaseFlight), from crypto/tls's callbacks: the peer's next turn
// starts at our next wait for it (reads), after our answer.
func (h *pendingHS) reached(phase int32) {
	h.phase.Store(phase)
	h.owedSince.Store(0)
}

// removeLocked unlists h (again is a no-op: list.Remove checks).
func (hs *handshakes) removeLocked(h *pendingHS) {
	hs.all.Remove(h.all)
	h.sv.handshakes.Remove(h.pod)
	hs.byConn.Delete(h.c)
}

// reads is hbone's Config.HandshakeReads: a pending handshake's read of
// raw begins (busy) or found nothing (waiting: the peer's turn begins
// now, unless it began already).
func (hs *handshakes) reads(raw net.Conn, waiting bool) {
	tc, ok := raw.(*net.TCPConn)
	if !ok {
		return
	}
	v, ok := hs.byConn.Load(tc)
	if !ok {
		return
	}
	h := v.(*pendingHS)
	if !waiting {
		h.reading.Store(readBusy)
		return
	}
	if h.owedSince.Load() == 0 {
		// Before reading is set: whoever sees readWaiting sees it.
		h.owedSince.Store(monoNanos(hs.now()))
	}
	h.reading.Store(readWaiting)
}

// finish ends h's pending state as its handshake succeeds; false means
// it was evicted first (the caller must not use the connection).
func (hs *handshakes) finish(h *pendingHS) bool {
	if !h.state.CompareAndSwap(hsPending, hsFinished) {
		return false
	}
	hs.m.pendingHandshakes.Dec()
	hs.mu.Lock()
	hs.removeLocked(h)
	hs.mu.Unlock()
	return true
}

// done is called once h's connection is through hbone.Server, whatever
// the outcome: it ends the pending state of a handshake that failed
// (finish was not called) and says whether h was evicted (its error is
// then the eviction's).
func (hs *handshakes) done(h *pendingHS) (evicted bool) {
	if hs.finish(h) {
		return false
	}
	return h.state.Load() == hsEvicted
}

// evictPod closes every pending handshake of sv (Close's cut: a
// handshake that has not ended by the deadline never will be waited for).
func (hs *handshakes) evictPod(sv *Serving) {
	var victims []*pendingHS
	hs.mu.Lock()
	for e := sv.handshakes.Front(); e != nil; {
		h := e.Value.(*pendingHS)
		e = e.Next()
		if hs.evictLocked(h) {
			victims = append(victims, h)
		}
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
