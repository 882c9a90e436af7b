package tunnel

import (
	"bytes"
	"io"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
)

// slowVerdict gives its verdict after a pause: B's answer to a CONNECT
// comes once A's handler is splicing, so A hears it on its pooled
// connection's read loop, not on the handler.
type slowVerdict struct{ allow bool }

func (v slowVerdict) Authorize(ConnInfo) Verdict {
	time.Sleep(50 * time.Millisecond)
	return Verdict{Allow: v.allow, Reason: "the test's verdict"}
}

// answerRace is two agents, A serving 15001 for its pod and B 15008 for
// its pod, whose app echoes on 8080 and whose Authorizer is authz; each
// of A's connections to B's app goes through one pooled connection.
// A's first OnResponse on a pooled connection's read loop is held
// (testHookResponse) until release is closed: see resetAsAnswerArrives.
type answerRace struct {
	dial   func() *net.TCPConn // a connection of A's app to B's app
	metric func(name string, match map[string]string) float64
	logsA  *testenv.Buffer

	in, release chan struct{} // the hook holds; the test lets it go
	unhold      func()
	missed      atomic.Int32 // answers heard on the handler, not held
}

func newAnswerRace(t *testing.T, authz Authorizer) *answerRace {
	testenv.RequireRoot(t)
	m := &answerRace{in: make(chan struct{}), release: make(chan struct{})}
	// Set before the agents start and cleared after they stop (cleanups
	// run last first): the read loops read it, and the race detector
	// sees no order through the sockets.
	t.Cleanup(func() { testHookResponse = nil })
	testHookResponse = func(*record, int) {
		buf := make([]byte, 16<<10)
		if !bytes.Contains(buf[:runtime.Stack(buf, false)], []byte("hbone.(*Conn).readLoop")) {
			m.missed.Add(1) // on the handler (Splice): B answered too soon
			return
		}
		select {
		case m.in <- struct{}{}:
			<-m.release
		default:
		}
	}
	a, b, wa, wb, dir := meshedPair(t)
	certs := testPeerCerts(t)
	cfg := Config{Directory: dir, Certificates: certs, Authorizer: authz,
		PoolIdleTimeout: time.Hour, HBONEIdleTimeout: time.Hour}
	pa, regA, logsA := newTestProxy(t, cfg)
	pb, _, _ := newTestProxy(t, cfg)
	servePod(t, pa, a, wa, nil, 15001)
	servePod(t, pb, b, wb, nil, 15008)

	echoApp(t, b, 8080)
	dst := netip.AddrPortFrom(b.IP4, 8080)
	m.dial = func() *net.TCPConn {
		t.Helper()
		var c net.Conn
		a.Do(t, func() (err error) { c, err = net.DialTimeout("tcp", dst.String(), 10*time.Second); return })
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(10 * time.Second))
		return c.(*net.TCPConn)
	}
	m.metric = func(name string, match map[string]string) float64 { return testenv.Metric(t, regA, name, match) }
	m.logsA = logsA
	var once sync.Once
	m.unhold = func() { once.Do(func() { close(m.release) }) }
	t.Cleanup(m.unhold) // before the agents close
	return m
}

// resetAsAnswerArrives resets A's app connection while A's read loop
// is held acting on B's answer to it: its splice, and the handler with
// it, ends meanwhile. It dials again (5 times at most) while B answers
// before A splices. Then it waits for that connection's end in A's
// books (failed+closed 1) and lets the read loop go on.
func (m *answerRace) resetAsAnswerArrives(t *testing.T) {
	t.Helper()
	held := false
	for try := 0; try < 5 && !held; try++ {
		was := m.missed.Load()
		c := m.dial()
		select {
		case <-m.in:
			held = true
			c.SetLinger(0)
			c.Close()
		case <-time.After(5 * time.Second):
			if m.missed.Load() == was {
				t.Fatal("no answer heard within 5 s")
			}
			c.Close()
		}
	}
	if !held {
		t.Fatalf("the answer was heard on the handler each time (%d): B answered before A spliced", m.missed.Load())
	}
	out := map[string]string{"direction": "outbound"}
	if got := pollUntil(1, func() float64 {
		return m.metric("ambit_tunnel_connections_failed_total", out) + m.metric("ambit_tunnel_connections_closed_total", out)
	}); got != 1 {
		t.Fatalf("the reset connection's end: failed+closed %v, want 1", got)
	}
	m.unhold()
}

// TestOutboundOpenedAfterSpliceEnd: a 15001 HBONE connection is counted
// open by its stream's OnResponse, on the pooled connection's read loop,
// while its handler splices. When the app resets its connection just as
// B's 200 arrives, the splice can end, and the handler decide whether
// the connection was open, while the read loop is still counting it
// open. It is then counted once, either way: failed (never open), or
// open and closed; active_connections ends at 0.
//
// Before: the handler read the record's opened flag, which the read loop
// had not set yet: it counted a failure, and the read loop then counted
// the connection open, with no close ever; active_connections{outbound}
// stayed at 1 for good (opened_total 2, closed_total 1 after a second,
// normal, connection). The window is the read loop's few instructions
// between taking the response and setting the flag, unsynchronised with
// the handler's read; testHookResponse holds it open.
func TestOutboundOpenedAfterSpliceEnd(t *testing.T) {
	m := newAnswerRace(t, slowVerdict{allow: true})
	m.resetAsAnswerArrives(t)

	// A second connection on the same pooled connection: its response
	// is read after the first's opened returned.
	c := m.dial()
	io.WriteString(c, "ping\n")
	got := make([]byte, 5)
	if _, err := io.ReadFull(c, got); err != nil || string(got) != "ping\n" {
		t.Fatalf("echo: %q, %v", got, err)
	}
	if n := m.metric("ambit_tunnel_hbone_pool_connections", nil); n != 1 {
		t.Fatalf("%v pooled connections, want the one both connections used", n)
	}
	c.Close()
	out := map[string]string{"direction": "outbound"}
	if got := pollUntil(2, func() float64 {
		return m.metric("ambit_tunnel_connections_failed_total", out) + m.metric("ambit_tunnel_connections_closed_total", out)
	}); got != 2 {
		t.Fatalf("both connections' ends: failed+closed %v, want 2", got)
	}
	if got := pollUntil(0, func() float64 { return m.metric("ambit_tunnel_active_connections", out) }); got != 0 {
		t.Errorf("active_connections{outbound} %v with nothing open, want 0", got)
	}
	opened, closed := m.metric("ambit_tunnel_connections_opened_total", out), m.metric("ambit_tunnel_connections_closed_total", out)
	if opened != closed {
		t.Errorf("opened_total %v, closed_total %v: a connection counted open was never closed\n%s", opened, closed, m.logsA)
	}
}

// TestOutboundRefusedAsSpliceEnds: B refuses a 15001 HBONE connection
// (401, its policy) just as A's app resets it. The refusal reached A
// before the handler ended (its read loop is acting on it, held by
// testHookResponse), so A counts it denied, as it would without the
// reset.
//
// Before: OnResponse, on the read loop, stored the refusal in variables
// the handler read after its splice, unsynchronised (a data race; an
// interface value could be read torn): the handler, first, read none and
// counted the connection failed with reason hbone_stream.
func TestOutboundRefusedAsSpliceEnds(t *testing.T) {
	m := newAnswerRace(t, slowVerdict{allow: false})
	m.resetAsAnswerArrives(t)
	out := func(reason string) map[string]string {
		return map[string]string{"direction": "outbound", "reason": reason}
	}
	if n := m.metric("ambit_tunnel_connections_failed_total", out("denied")); n != 1 {
		t.Errorf("failed_total{outbound,denied} %v, want 1 (hbone_stream: %v)\n%s", n,
			m.metric("ambit_tunnel_connections_failed_total", out("hbone_stream")), m.logsA)
	}
	if n := m.metric("ambit_tunnel_connections_opened_total", map[string]string{"direction": "outbound"}); n != 0 {
		t.Errorf("opened_total{outbound} %v for a refused connection, want 0", n)
	}
}
