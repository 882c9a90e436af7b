package tunnel

import (
	"net"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// tcpPair returns the server side of a loopback TCP connection (and
// closes both at the end of the test).
func tcpPair(t *testing.T, ln net.Listener) *net.TCPConn {
	t.Helper()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return s.(*net.TCPConn)
}

// closed reports whether c was closed by us (reads fail with
// net.ErrClosed at once).
func closed(c *net.TCPConn) bool {
	c.SetReadDeadline(time.Now().Add(time.Millisecond))
	_, err := c.Read(make([]byte, 1))
	return err != nil && !isTimeout(err)
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}

// TestHandshakeEvictionOrder: past the pod's limit its own oldest pending
// handshake goes; past the agent's, the oldest of any pod; a handshake
// that ended is no longer a candidate; evictPod closes the rest of a pod.
func TestHandshakeEvictionOrder(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	m := newMetrics(prometheus.NewRegistry())
	hs := &handshakes{m: m, podMax: 2, total: 3}
	a, b := &Serving{}, &Serving{}
	a1 := hs.add(a, tcpPair(t, ln))
	b1 := hs.add(b, tcpPair(t, ln))
	a2 := hs.add(a, tcpPair(t, ln))
	if got := testutil.ToFloat64(m.pendingHandshakes); got != 3 {
		t.Fatalf("pending = %v, want 3", got)
	}
	// Agent limit (3) passed: the oldest of all, a1.
	b2 := hs.add(b, tcpPair(t, ln))
	if !closed(a1.c) || closed(b1.c) || closed(a2.c) || closed(b2.c) {
		t.Fatal("agent limit: want only a1 closed")
	}
	if !hs.done(a1) {
		t.Error("done(a1) = not evicted")
	}
	// b1 ends normally: not a candidate any more.
	if hs.done(b1) {
		t.Error("done(b1) = evicted")
	}
	// b's third: b's limit (2) passed, b2 is b's oldest.
	b3 := hs.add(b, tcpPair(t, ln))
	b4 := hs.add(b, tcpPair(t, ln))
	if !closed(b2.c) || closed(b3.c) || closed(b4.c) || closed(a2.c) {
		t.Fatal("pod limit: want b2 closed, b3, b4 and a2 open")
	}
	if got := testutil.ToFloat64(m.evicted.WithLabelValues("pod")); got != 1 {
		t.Errorf("evicted{pod} = %v, want 1", got)
	}
	if got := testutil.ToFloat64(m.evicted.WithLabelValues("agent")); got != 1 {
		t.Errorf("evicted{agent} = %v, want 1", got)
	}
	hs.evictPod(b)
	if !closed(b3.c) || !closed(b4.c) || closed(a2.c) {
		t.Fatal("evictPod(b): want b3 and b4 closed, a2 open")
	}
	if got := testutil.ToFloat64(m.pendingHandshakes); got != 1 {
		t.Errorf("pending = %v, want 1 (a2)", got)
	}
	if hs.done(a2) || hs.all.Len() != 0 || a.handshakes.Len() != 0 || b.handshakes.Len() != 0 {
		t.Error("lists not empty at the end")
	}
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
