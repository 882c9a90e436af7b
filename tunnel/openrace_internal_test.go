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
	"github.com/ambit-mesh/ambit/tunnel/internal/podtest"
)

// slowAllow allows everything, after a pause: B's answer to a CONNECT
// comes once A's handler is splicing, so A counts the connection open
// on its pooled connection's read loop, not on the handler.
type slowAllow struct{}

func (slowAllow) Authorize(ConnInfo) Verdict {
	time.Sleep(50 * time.Millisecond)
	return Verdict{Allow: true, Reason: "the test allows all"}
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
// the handler's read; testHookOpened holds it open.
func TestOutboundOpenedAfterSpliceEnd(t *testing.T) {
	testenv.RequireRoot(t)
	a, b := podtest.Pair(t)
	podtest.Redirect(t, a)
	podtest.Redirect(t, b)
	certs := testPeerCerts(t)
	wa := Workload{Namespace: "a", Name: "client-pod", IPs: []netip.Addr{a.IP4, a.IP6}, Identity: idClient, Meshed: true}
	wb := Workload{Namespace: "b", Name: "server-pod", IPs: []netip.Addr{b.IP4, b.IP6}, Identity: idServer, Meshed: true}
	dir := mapDirectory{a.IP4: wa, b.IP4: wb}
	// The hook holds the first opened that runs on a read loop. Set
	// before the agents start and cleared after they stop (cleanups run
	// last first).
	t.Cleanup(func() { testHookOpened = nil })
	in, release := make(chan struct{}), make(chan struct{})
	var missed atomic.Int32
	testHookOpened = func(r *record) {
		buf := make([]byte, 16<<10)
		if !bytes.Contains(buf[:runtime.Stack(buf, false)], []byte("hbone.(*Conn).readLoop")) {
			missed.Add(1) // on the handler (Splice): B answered too soon
			return
		}
		select {
		case in <- struct{}{}:
			<-release
		default:
		}
	}

	cfg := Config{Directory: dir, Certificates: certs, Authorizer: slowAllow{},
		PoolIdleTimeout: time.Hour, HBONEIdleTimeout: time.Hour}
	pa, regA, logsA := newTestProxy(t, cfg)
	pb, _, _ := newTestProxy(t, cfg)
	servePod(t, pa, a, wa, nil, 15001)
	servePod(t, pb, b, wb, nil, 15008)

	var ln net.Listener
	b.Do(t, func() (err error) { ln, err = net.Listen("tcp", "[::]:8080"); return })
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	dst := netip.AddrPortFrom(b.IP4, 8080)
	dial := func() *net.TCPConn {
		t.Helper()
		var c net.Conn
		a.Do(t, func() (err error) { c, err = net.DialTimeout("tcp", dst.String(), 10*time.Second); return })
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(10 * time.Second))
		return c.(*net.TCPConn)
	}
	metric := func(name string, match map[string]string) float64 {
		return testenv.Metric(t, regA, name, match)
	}
	out := map[string]string{"direction": "outbound"}

	var once sync.Once
	unhold := func() { once.Do(func() { close(release) }) }
	t.Cleanup(unhold) // before the agents close
	held := false
	for try := 0; try < 5 && !held; try++ {
		was := missed.Load()
		c := dial()
		select {
		case <-in:
			held = true
			// The app resets while the read loop is counting it open:
			// its splice ends, and the handler with it.
			c.SetLinger(0)
			c.Close()
		case <-time.After(5 * time.Second):
			if missed.Load() == was {
				t.Fatal("no opened call within 5 s")
			}
			c.Close()
		}
	}
	if !held {
		t.Fatalf("opened ran on the handler each time (%d): B answered before A spliced", missed.Load())
	}
	if got := pollUntil(1, func() float64 {
		return metric("ambit_tunnel_connections_failed_total", out) + metric("ambit_tunnel_connections_closed_total", out)
	}); got != 1 {
		t.Fatalf("the reset connection's end: failed+closed %v, want 1", got)
	}
	unhold()

	// A second connection on the same pooled connection: its response
	// is read after the first's opened returned.
	c := dial()
	io.WriteString(c, "ping\n")
	got := make([]byte, 5)
	if _, err := io.ReadFull(c, got); err != nil || string(got) != "ping\n" {
		t.Fatalf("echo: %q, %v", got, err)
	}
	if n := metric("ambit_tunnel_hbone_pool_connections", nil); n != 1 {
		t.Fatalf("%v pooled connections, want the one both connections used", n)
	}
	c.Close()
	if got := pollUntil(2, func() float64 {
		return metric("ambit_tunnel_connections_failed_total", out) + metric("ambit_tunnel_connections_closed_total", out)
	}); got != 2 {
		t.Fatalf("both connections' ends: failed+closed %v, want 2", got)
	}
	if got := pollUntil(0, func() float64 { return metric("ambit_tunnel_active_connections", out) }); got != 0 {
		t.Errorf("active_connections{outbound} %v with nothing open, want 0", got)
	}
	opened, closed := metric("ambit_tunnel_connections_opened_total", out), metric("ambit_tunnel_connections_closed_total", out)
	if opened != closed {
		t.Errorf("opened_total %v, closed_total %v: a connection counted open was never closed\n%s", opened, closed, logsA)
	}
}
