package tunnel

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/tunnel/internal/panicpoint"
	"github.com/ambit-mesh/ambit/tunnel/internal/podtest"
	"github.com/ambit-mesh/ambit/tunnel/podnet"
)

// splicePanicNet is a pod network whose connections, once armed, panic
// in a Read or Write made from the armed handler (a bug in the data
// path, say): the first such call whose stack names it (panicpoint). It
// has no DialLocal: 15006 and 15008 dial the app through Dial. Calls
// from other goroutines (hbone's read loop, the relay's second copy)
// never panic: there nothing recovers, the test binary would end.
type splicePanicNet struct {
	PodNetwork
	at panicpoint.Point
}

func (n *splicePanicNet) Dial(ctx context.Context, src netip.Addr, dst netip.AddrPort) (net.Conn, error) {
	c, err := n.PodNetwork.Dial(ctx, src, dst)
	if err != nil {
		return nil, err
	}
	return &splicePanicConn{Conn: c, n: n}, nil
}

type splicePanicConn struct {
	net.Conn
	n *splicePanicNet
}

// Read checks after reading: the splice's read is usually already
// waiting when the test arms.
func (c *splicePanicConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.n.at.Check("test: panic inside the splice")
	return n, err
}

func (c *splicePanicConn) Write(b []byte) (int, error) {
	c.n.at.Check("test: panic inside the splice")
	return c.Conn.Write(b)
}

// CloseWrite passes the half-close on: the splices look for it.
func (c *splicePanicConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}

// mapDirectory knows the workloads of a few IPs.
type mapDirectory map[netip.Addr]Workload

func (d mapDirectory) WorkloadByIP(ip netip.Addr) (Workload, bool) { w, ok := d[ip]; return w, ok }
func (mapDirectory) ServiceEndpoints(netip.AddrPort) ([]netip.AddrPort, bool) {
	return nil, false
}

// denySwitch allows everything until deny is set; armed (at), it panics
// once, in a call made from the armed function (a bug in the policy
// engine, say).
type denySwitch struct {
	deny atomic.Bool
	at   panicpoint.Point
}

func (d *denySwitch) Authorize(ConnInfo) Verdict {
	d.at.Check("test: the Authorizer panics")
	if d.deny.Load() {
		return Verdict{Policy: "test", Reason: "the test denies all"}
	}
	return Verdict{Allow: true, Reason: "the test allows all"}
}

// TestSplicePanicCleansUp: a panic inside an established connection's
// splice (recovered per connection by recoverConn: the agent goes on)
// leaves the agent's books as they were before that connection: the
// pod's closers, the Proxy's live connections (a policy change
// afterwards revokes nothing), active_connections; the connection is
// counted closed, with one access-log line of reason internal_error. So
// does a panic in the policy re-check (stillAllowed), which runs once
// the connection is registered for Reauthorize and before its splice;
// the app's connection, dialled by then, is closed too. A panic in the
// write to A's pooled HBONE connection leaves that connection closed,
// not wedged: the next connection reaches B.
//
// Before: session 12's untrack and removeLive after each splice were
// plain calls the panic skipped (closers and live entries stayed until
// the process exited, and each later Reauthorize that refused them
// counted a policy_revoked; session 13 fixed those); active_connections
// stayed one too high for good, with no close counted and no access-log
// line; a panic in the re-check left its live entry behind and the
// app's connection open; and hbone's write lock stayed held by the
// panicked write, so every later stream on A's pooled connection hung.
// Real pods (root): A's app calls B's app, A and B redirected and
// served by agents of their own; B's IPv4 is meshed (HBONE), its IPv6
// is not (A's passthrough, plaintext into B's 15006).
func TestSplicePanicCleansUp(t *testing.T) {
	testenv.RequireRoot(t)
	a, b, wa, wb, dir := meshedPair(t)
	certs := testPeerCerts(t)
	auth := &denySwitch{}

	type node struct {
		p    *Proxy
		sv   *Serving
		reg  *prometheus.Registry
		logs *testenv.Buffer
		net  *splicePanicNet
	}
	serve := func(pp *podtest.Pod, w Workload, ports ...uint16) *node {
		t.Helper()
		n := &node{}
		// Idle timeouts out of the way: the pooled connection (and
		// B's closer for it) must last the whole test.
		n.p, n.reg, n.logs = newTestProxy(t, Config{Directory: dir, Certificates: certs, Authorizer: auth,
			PoolIdleTimeout: time.Hour, HBONEIdleTimeout: time.Hour})
		n.sv = servePod(t, n.p, pp, w, func(pn *podnet.Net) PodNetwork {
			n.net = &splicePanicNet{PodNetwork: pn}
			return n.net
		}, ports...)
		return n
	}
	na := serve(a, wa, 15001)
	nb := serve(b, wb, 15006, 15008)

	// B's app echoes; appConns counts its connections open.
	appConns := echoApp(t, b, 8080)

	closers := func(n *node) int {
		n.sv.mu.Lock()
		defer n.sv.mu.Unlock()
		return len(n.sv.closers)
	}
	live := func(n *node) int {
		n.p.mu.Lock()
		defer n.p.mu.Unlock()
		return len(n.p.live)
	}
	metric := func(n *node, name string, match map[string]string) float64 {
		return testenv.Metric(t, n.reg, name, match)
	}
	waitMetric := func(n *node, name string, match map[string]string, want float64) {
		t.Helper()
		if got := pollUntil(want, func() float64 { return metric(n, name, match) }); got != want {
			t.Fatalf("%s%v = %v, want %v", name, match, got, want)
		}
	}
	// panicked counts n's access-log lines of connections a panic ended.
	panicked := func(n *node) int {
		k := 0
		for _, l := range strings.Split(n.logs.String(), "\n") {
			if strings.Contains(l, `msg="connection complete"`) && strings.Contains(l, "reason=internal_error") {
				k++
			}
		}
		return k
	}
	// dial connects from A's app and checks one echo: the connection
	// is established, its splice running.
	dial := func(dst netip.AddrPort) net.Conn {
		t.Helper()
		var c net.Conn
		a.Do(t, func() (err error) { c, err = net.DialTimeout("tcp", dst.String(), 10*time.Second); return })
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, "ping\n")
		got := make([]byte, 5)
		if _, err := io.ReadFull(c, got); err != nil || string(got) != "ping\n" {
			t.Fatalf("echo through %v: %q, %v", dst, got, err)
		}
		return c
	}
	meshed := netip.AddrPortFrom(b.IP4, 8080)
	plain := netip.AddrPortFrom(b.IP6, 8080)

	// A connection that ends normally pools A's HBONE connection to B
	// (B tracks it as a closer of its own): the baseline is taken with
	// it up and that connection's own cleanup done.
	c := dial(meshed)
	c.Close()
	waitMetric(na, "ambit_tunnel_connections_closed_total", map[string]string{"direction": "outbound"}, 1)
	waitMetric(nb, "ambit_tunnel_connections_closed_total", map[string]string{"direction": "inbound"}, 1)
	beforeA, beforeB, liveB := closers(na), closers(nb), live(nb)
	if liveB != 0 {
		t.Fatalf("%d live connections on B with none open", liveB)
	}

	panics := map[*node]float64{}
	for _, tc := range []struct {
		name string
		n    *node // whose agent panics
		dir  string
		// Where: a Read or Write of the armed handler's inside the
		// splice (the node's network), else a call of the Authorizer's
		// from recheck.
		where, recheck string
		dst            netip.AddrPort
	}{
		// B's 15008 stream handler, reading B's app (genericSplice:
		// the app's connection is not a *net.TCPConn here).
		{name: "inbound HBONE", n: nb, dir: "inbound", where: "tunnel.(*Serving).inboundStream(", dst: meshed},
		// B's 15006 handler, writing to B's app (relay).
		{name: "inbound plaintext", n: nb, dir: "inbound", where: "tunnel.(*Serving).inboundPlain(", dst: plain},
		// The re-check after B's app dial, 15008 and 15006: the
		// connection is registered for Reauthorize, not yet open.
		{name: "inbound HBONE re-check", n: nb, dir: "inbound", recheck: "tunnel.(*Serving).stillAllowed(", dst: meshed},
		{name: "inbound plaintext re-check", n: nb, dir: "inbound", recheck: "tunnel.(*Serving).stillAllowed(", dst: plain},
		// A's 15001 handler, writing the app's bytes to B (Splice's
		// pump, into the pooled connection's socket, under hbone's
		// write lock). Last: that pooled connection is closed.
		{name: "outbound HBONE", n: na, dir: "outbound", where: "tunnel.(*Serving).outbound(", dst: meshed},
	} {
		// Nothing open on either side: the last case's connections are
		// counted closed (the count goes up before the gauge down).
		for _, n := range []*node{na, nb} {
			if got := pollUntil(0, func() float64 { return metric(n, "ambit_tunnel_active_connections", nil) }); got != 0 {
				t.Fatalf("before %s: active_connections %v with nothing open, want 0", tc.name, got)
			}
		}
		dirs := map[string]string{"direction": tc.dir}
		closed := metric(tc.n, "ambit_tunnel_connections_closed_total", dirs)
		lines := panicked(tc.n)
		if tc.recheck != "" {
			// The re-check comes before the connection is open: no
			// echo. The panic's reset can come before the app's
			// connect(2) has returned.
			auth.at.Arm(tc.recheck)
			var c net.Conn
			var err error
			a.Do(t, func() error { c, err = net.DialTimeout("tcp", tc.dst.String(), 10*time.Second); return nil })
			if err == nil {
				c.SetDeadline(time.Now().Add(10 * time.Second))
				io.WriteString(c, "boom\n")
				_, _ = io.ReadAll(c) // ends with the panic's reset
				c.Close()
			} else if !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("%s: %v", tc.name, err)
			}
		} else {
			c := dial(tc.dst)
			tc.n.net.at.Arm(tc.where)
			io.WriteString(c, "boom\n")
			_, _ = io.ReadAll(c) // ends with the panic's reset
		}
		panics[tc.n]++
		waitMetric(tc.n, "ambit_tunnel_connections_failed_total", map[string]string{"reason": "internal_error"}, panics[tc.n])
		if tc.n.net.at.Armed() || auth.at.Armed() {
			t.Fatalf("%s: the connection did not reach the armed call", tc.name)
		}
		// Open before the panic (the splices): one close counted, with
		// its line.
		wantClosed, wantLines := closed+1, lines+1
		if tc.recheck != "" {
			wantClosed, wantLines = closed, lines
		}
		if got := pollUntil(0, func() float64 { return metric(tc.n, "ambit_tunnel_active_connections", dirs) }); got != 0 {
			t.Errorf("%s: active_connections{direction=%s} %v after the panicked connection, want 0 as before it", tc.name, tc.dir, got)
		}
		if got := pollUntil(wantClosed, func() float64 { return metric(tc.n, "ambit_tunnel_connections_closed_total", dirs) }); got != wantClosed {
			t.Errorf("%s: connections_closed_total{direction=%s} %v, want %v", tc.name, tc.dir, got, wantClosed)
		}
		// Polled, as what follows: the failure is counted first, the
		// rest settled after it (recoverConn), the line last.
		if got := pollUntil(wantLines, func() int { return panicked(tc.n) }); got != wantLines {
			t.Errorf("%s: %d access-log lines with reason=internal_error, want %d:\n%s", tc.name, got, wantLines, tc.n.logs)
		}
		if tc.n == na {
			if n := pollUntil(beforeA, func() int { return closers(na) }); n != beforeA {
				t.Errorf("%s: A tracks %d closers after the panicked splice, want %d as before it", tc.name, n, beforeA)
			}
			continue
		}
		if n := pollUntil(beforeB, func() int { return closers(nb) }); n != beforeB {
			t.Errorf("%s: B tracks %d closers after the panicked connection, want %d as before it", tc.name, n, beforeB)
		}
		if n := pollUntil(liveB, func() int { return live(nb) }); n != liveB {
			t.Errorf("%s: %d live connections on B after the panicked connection, want %d", tc.name, n, liveB)
		}
		// B's app sees its connection end: the agent closed its side.
		if n := pollUntil(0, appConns); n != 0 {
			t.Errorf("%s: B's app still has %d connections open after the panicked one", tc.name, n)
		}
		// Nothing of B's is open: a policy that now refuses everything
		// has nothing to revoke.
		auth.deny.Store(true)
		nb.p.Reauthorize()
		auth.deny.Store(false)
		if n := metric(nb, "ambit_tunnel_connections_failed_total", map[string]string{"reason": "policy_revoked"}); n != 0 {
			t.Errorf("%s: policy_revoked_total %v on B after a policy change with nothing open, want 0", tc.name, n)
		}
	}
	// A's pooled connection, whose write panicked, is closed rather than
	// wedged: the next connection gets a new one and reaches B.
	dial(meshed).Close()
	waitMetric(na, "ambit_tunnel_hbone_pool_connections", nil, 1)
}
