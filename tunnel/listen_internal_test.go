package tunnel

import (
	"net"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/sys/unix"
)

// tcpPair returns the server side of a loopback TCP connection (and
// closes both at the end of the test). speak, when set, is written by
// the client, so the server side has received it (unread).
func tcpPair(t *testing.T, ln net.Listener, speak string) *net.TCPConn {
	t.Helper()
	s, c := dialAccept(t, ln)
	if speak != "" {
		if _, err := c.Write([]byte(speak)); err != nil {
			t.Fatal(err)
		}
		// Arrived: the server's receive queue holds it.
		for deadline := time.Now().Add(2 * time.Second); unread(t, s) == 0; time.Sleep(time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatal("the client's bytes never arrived")
			}
		}
	}
	return s
}

// dialAccept connects a client to ln and returns the accepted side and
// the client, both closed when the test ends.
func dialAccept(t testing.TB, ln net.Listener) (server, client *net.TCPConn) {
	t.Helper()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		c.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return s.(*net.TCPConn), c.(*net.TCPConn)
}

// unread is what waits in c's receive queue.
func unread(t *testing.T, c *net.TCPConn) int {
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var n int
	rc.Control(func(fd uintptr) { n, err = unix.IoctlGetInt(int(fd), unix.SIOCINQ) })
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// closed reports whether c was closed by us (reads fail with
// net.ErrClosed at once).
func closed(c *net.TCPConn) bool {
	c.SetReadDeadline(time.Now().Add(time.Millisecond))
	_, err := c.Read(make([]byte, 0))
	return err != nil && !isTimeout(err)
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}

// TestHandshakeEvictionOrder follows handshakes' policy step by step on
// real sockets and a clock of its own: past the pod's limit only its
// silent or stale pending handshakes go, oldest first, as many as it
// takes, and the newcomer is admitted when none qualifies (a herd); past
// the agent's hard cap, the oldest goes regardless; a stale handshake
// that waits on us (its peer's bytes unread, or its ClientHello in and
// not answered) is kept, one that waits on its peer is not; a finished
// handshake is no candidate, and one evicted cannot finish; evictPod
// closes the rest of a pod; the metrics follow.
func TestHandshakeEvictionOrder(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	m := newMetrics(prometheus.NewRegistry())
	t0 := time.Unix(1000, 0)
	clock := t0
	hs := &handshakes{m: m, podMax: 2, total: 4, now: func() time.Time { return clock }}
	a, b := &Serving{}, &Serving{}
	evicted := func(limit string) float64 { return testutil.ToFloat64(m.evicted.WithLabelValues(limit)) }
	want := func(step string, open, shut []*pendingHS, pod, agent, pending float64) {
		t.Helper()
		for _, h := range open {
			if closed(h.c) {
				t.Errorf("%s: a handshake that should be open was closed", step)
			}
		}
		for _, h := range shut {
			if !closed(h.c) {
				t.Errorf("%s: a handshake that should be evicted is open", step)
			}
		}
		if got := evicted("pod"); got != pod {
			t.Errorf("%s: evicted{pod} = %v, want %v", step, got, pod)
		}
		if got := evicted("agent"); got != agent {
			t.Errorf("%s: evicted{agent} = %v, want %v", step, got, agent)
		}
		if got := testutil.ToFloat64(m.pendingHandshakes); got != pending {
			t.Errorf("%s: pending = %v, want %v", step, got, pending)
		}
	}
	// A burst at t0: a's third is past a's limit (2), but nobody is
	// silent or stale yet, so it is admitted (a herd).
	a1 := hs.add(a, tcpPair(t, ln, ""))
	a2 := hs.add(a, tcpPair(t, ln, "\x16"))
	b1 := hs.add(b, tcpPair(t, ln, "\x16"))
	a3 := hs.add(a, tcpPair(t, ln, ""))
	want("burst", []*pendingHS{a1, a2, a3, b1}, nil, 0, 0, 4)

	// 150 ms later a's next arrival cuts a back to its limit: a1 and a3
	// are silent (evicted, oldest first), a2 has spoken (kept).
	clock = t0.Add(150 * time.Millisecond)
	a4 := hs.add(a, tcpPair(t, ln, ""))
	want("pod limit", []*pendingHS{a2, a4, b1}, []*pendingHS{a1, a3}, 2, 0, 3)

	// The agent's hard cap (4): b's third is past b's limit with no
	// candidate in b (b1 spoke, the others are new), and past the
	// agent's with none in the agent either: the oldest goes, a2,
	// though it spoke.
	b2 := hs.add(b, tcpPair(t, ln, "\x16"))
	b3 := hs.add(b, tcpPair(t, ln, ""))
	want("hard cap", []*pendingHS{a4, b1, b2, b3}, []*pendingHS{a2}, 2, 1, 4)

	// An evicted handshake cannot finish; a finished one leaves the
	// lists (and is never a candidate).
	if hs.finish(a1) || !hs.done(a1) {
		t.Error("a1: evicted, but finish succeeded or done said not evicted")
	}
	if !hs.finish(a4) || hs.done(a4) {
		t.Error("a4: finish failed or done said evicted")
	}
	want("finished", []*pendingHS{b1, b2, b3}, nil, 2, 1, 3)

	// Two more of b, at 150 ms: b's peers spoke and we read their
	// bytes; both ClientHellos are complete (crypto/tls called
	// GetCertificate); we answered b6's, not yet b5's. Admitted (nobody
	// qualifies) under a hard cap raised out of the way.
	hs.total = 100
	b5 := hs.add(b, tcpPair(t, ln, "\x16"))
	b6 := hs.add(b, tcpPair(t, ln, "\x16"))
	for _, h := range []*pendingHS{b5, b6} {
		if _, err := h.c.Read(make([]byte, 1)); err != nil {
			t.Fatal(err)
		}
		h.reached(phaseHello)
	}
	if _, err := b6.c.Write([]byte{0x16}); err != nil {
		t.Fatal(err)
	}
	want("admitted", []*pendingHS{b1, b2, b3, b5, b6}, nil, 2, 1, 5)

	// 1.2 s after the start all but the newcomer are stale. Our turn
	// (kept, however old): b1, its byte unread; b5, its ClientHello in
	// and not answered. The peer's turn (evicted): b2, whose byte we
	// read; b6, answered; b3, silent.
	clock = t0.Add(1200 * time.Millisecond)
	if _, err := b2.c.Read(make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	b4 := hs.add(b, tcpPair(t, ln, ""))
	want("stale", []*pendingHS{b1, b4, b5}, []*pendingHS{b2, b3, b6}, 5, 1, 3)
	if b1.recheck.IsZero() || b5.recheck.IsZero() {
		t.Error("b1 and b5, stale and waiting on us: no recheck time set")
	}

	hs.evictPod(b)
	want("evictPod(b)", nil, []*pendingHS{b1, b4, b5}, 5, 1, 0)
	if hs.all.Len() != 0 || a.handshakes.Len() != 0 || b.handshakes.Len() != 0 {
		t.Error("lists not empty at the end")
	}
}

// TestHandshakeTurns: a handshake old enough to be stale goes only when
// its peer has owed us the next step for hsStaleAfter, as hbone reports
// the handshake's reads (reads), and not while the peer's answer waits
// on us, even once read from the socket. A herd on a saturated agent
// (TestHandshakeBurstNotEvicted, 600 clients, a loaded VM) lost
// clients both ways: answers read that crypto/tls got back to up to a
// second later (the socket showed nothing to do: the peer's turn), and
// flights that left a second after accept, leaving their clients no
// time to answer when the turn counted from accept. A peer that answers
// our flight with a byte and stalls still goes a second after our
// flight, and one that never answers it as before.
func TestHandshakeTurns(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	m := newMetrics(prometheus.NewRegistry())
	t0 := time.Unix(1000, 0)
	clock := t0
	at := func(d time.Duration) { clock = t0.Add(d) }
	hs := &handshakes{m: m, podMax: 1, total: 100, now: func() time.Time { return clock }}
	sv := &Serving{}
	// start: a client connects and sends its ClientHello (a byte),
	// which crypto/tls reads at once.
	start := func() *hsPeer {
		t.Helper()
		s, c := dialAccept(t, ln)
		p := &hsPeer{t: t, hs: hs, h: hs.add(sv, s), peer: c}
		p.send()
		p.read()
		return p
	}
	want := func(step string, open, shut []*hsPeer, evicted float64) {
		t.Helper()
		for _, p := range open {
			if closed(p.h.c) {
				t.Errorf("%s: %s should be open, was closed", step, p.name)
			}
		}
		for _, p := range shut {
			if !closed(p.h.c) {
				t.Errorf("%s: %s should be evicted, is open", step, p.name)
			}
		}
		if got := testutil.ToFloat64(m.evicted.WithLabelValues("pod")); got != evicted {
			t.Errorf("%s: evicted{pod} = %v, want %v", step, got, evicted)
		}
	}

	// At t0 four clients' ClientHellos are read.
	held, late, stalled, trickle := start(), start(), start(), start()
	held.name, late.name, stalled.name, trickle.name = "held", "late", "stalled", "trickle"
	// 150 ms: we answer three of them and wait for their answers.
	at(150 * time.Millisecond)
	held.answer()
	stalled.answer()
	trickle.answer()
	// 400 ms: held's client answers; crypto/tls read it and has not got
	// back to it yet (no VerifyPeerCertificate: still phaseHello).
	at(400 * time.Millisecond)
	held.send()
	held.read()
	// 1,000 ms: trickle's client sends a byte of its answer, read, and
	// nothing more (crypto/tls waits for the rest of the record).
	at(time.Second)
	trickle.send()
	trickle.read()
	hs.reads(trickle.h.c, true)
	// 1,100 ms: our flight to late leaves at last (the agent was busy).
	at(1100 * time.Millisecond)
	late.answer()

	// 1,200 ms, a newcomer past the pod's limit: stalled and trickle
	// have owed us their answers since 150 ms, over a second (evicted);
	// held's answer waits on us and late's client has had 100 ms (kept).
	at(1200 * time.Millisecond)
	n1 := start()
	n1.name = "n1"
	want("1.2 s", []*hsPeer{held, late, n1}, []*hsPeer{stalled, trickle}, 2)
	if want := t0.Add(2100 * time.Millisecond); !late.h.recheck.Equal(want) {
		t.Errorf("late: looked at again %v after t0, want 2.1s (a second after our flight)", late.h.recheck.Sub(t0))
	}

	// 2,200 ms: late's client has owed its answer for 1.1 s (evicted);
	// held's answer still waits on us (kept, however long); n1's
	// ClientHello too.
	at(2200 * time.Millisecond)
	n2 := start()
	n2.name = "n2"
	want("2.2 s", []*hsPeer{held, n1, n2}, []*hsPeer{late}, 3)

	// crypto/tls got back to held's answer and wants more of it: the
	// peer's turn, counted from our flight at 150 ms (an answer sent in
	// parts gets no new second per part).
	hs.reads(held.h.c, true)
	at(2300 * time.Millisecond)
	n3 := start()
	n3.name = "n3"
	want("2.3 s", []*hsPeer{n1, n2, n3}, []*hsPeer{held}, 4)
	if got := testutil.ToFloat64(m.pendingHandshakes); got != 3 {
		t.Errorf("pending = %v, want 3", got)
	}
}

// hsPeer is a pending handshake on a real socket, driven by hand as
// crypto/tls (through hbone's reads) and its client would.
type hsPeer struct {
	t    *testing.T
	name string
	hs   *handshakes
	h    *pendingHS
	peer net.Conn // the client's side
}

// send: the client sends a byte; it is in our receive queue on return.
func (p *hsPeer) send() {
	p.t.Helper()
	if _, err := p.peer.Write([]byte{0x16}); err != nil {
		p.t.Fatal(err)
	}
	for deadline := time.Now().Add(2 * time.Second); unread(p.t, p.h.c) == 0; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			p.t.Fatal("the client's byte never arrived")
		}
	}
}

// read: crypto/tls takes the byte off the socket (hbone reports the
// read before it makes it).
func (p *hsPeer) read() {
	p.t.Helper()
	p.hs.reads(p.h.c, false)
	if _, err := p.h.c.Read(make([]byte, 1)); err != nil {
		p.t.Fatal(err)
	}
}

// answer: the ClientHello was whole (GetCertificate), our flight leaves
// and crypto/tls waits for the client's answer from now.
func (p *hsPeer) answer() {
	p.t.Helper()
	p.h.reached(phaseHello)
	if _, err := p.h.c.Write([]byte{0x16}); err != nil {
		p.t.Fatal(err)
	}
	p.hs.reads(p.h.c, true)
}

// TestLogLimiter: perSecond lines a second, the next allowed line says
// how many were left out.
func TestLogLimiter(t *testing.T) {
	l := logLimiter{perSecond: 2}
	t0 := time.Unix(1000, 0)
	for i, want := range []bool{true, true, false, false, false} {
		if ok, _ := l.take(t0.Add(time.Duration(i) * time.Millisecond)); ok != want {
			t.Fatalf("line %d: %v, want %v", i, ok, want)
		}
	}
	ok, n := l.take(t0.Add(time.Second))
	if !ok || n != 3 {
		t.Fatalf("after a second: ok %v, suppressed %d; want true, 3", ok, n)
	}
}
