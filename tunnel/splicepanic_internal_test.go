package tunnel

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/tunnel/internal/podtest"
	"github.com/ambit-mesh/ambit/tunnel/podnet"
)

// splicePanicNet is a pod network whose connections, once armed, panic
// in a Read or Write made from the armed handler (a bug in the data
// path, say): the first such call whose stack names it. It has no
// DialLocal: 15006 and 15008 dial the app through Dial. Calls from other
// goroutines (hbone's read loop, the relay's second copy) never panic:
// there nothing recovers, the test binary would end.
type splicePanicNet struct {
	PodNetwork
	where atomic.Pointer[string]
}

func (n *splicePanicNet) arm(where string) { n.where.Store(&where) }

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

func (c *splicePanicConn) maybePanic() {
	w := c.n.where.Load()
	if w == nil {
		return
	}
	buf := make([]byte, 64<<10)
	buf = buf[:runtime.Stack(buf, false)]
	if bytes.Contains(buf, []byte(*w)) && c.n.where.CompareAndSwap(w, nil) {
		panic("test: panic inside the splice")
	}
}

// Read checks after reading: the splice's read is usually already
// waiting when the test arms.
func (c *splicePanicConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.maybePanic()
	return n, err
}

func (c *splicePanicConn) Write(b []byte) (int, error) {
	c.maybePanic()
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

// denySwitch allows everything until deny is set.
type denySwitch struct{ deny atomic.Bool }

func (d *denySwitch) Authorize(ConnInfo) Verdict {
	if d.deny.Load() {
		return Verdict{Policy: "test", Reason: "the test denies all"}
	}
	return Verdict{Allow: true, Reason: "the test allows all"}
}

// TestSplicePanicCleansUp: a panic inside an established connection's
// splice (recovered per connection by recoverConn: the agent goes on)
// leaves the pod's closers, and the Proxy's live connections, as they
// were before that connection, and a policy change afterwards revokes
// nothing. The untrack after the outbound HBONE splice, the untrack and
// removeLive after the inbound HBONE splice, and the removeLive after
// 15006's relay were plain calls the panic skipped: the closer stayed
// tracked and the live entry stayed in p.live until the process exited,
// and every later Reauthorize that refused it counted a policy_revoked.
// Real pods (root): A's app calls B's app, A and B redirected and
// served by agents of their own; B's IPv4 is meshed (HBONE), its IPv6
// is not (A's passthrough, plaintext into B's 15006).
func TestSplicePanicCleansUp(t *testing.T) {
	testenv.RequireRoot(t)
	a, b := podtest.Pair(t)
	podtest.Redirect(t, a)
	podtest.Redirect(t, b)
	root := mint(t, caTmpl("root"), nil)
	certs := newTestCerts(root.cert)
	certs.set(idServer, chain(mint(t, leafTmpl(t, idServer), root)))
	certs.set(idClient, chain(mint(t, leafTmpl(t, idClient), root)))
	wa := Workload{Namespace: "a", Name: "client-pod", IPs: []netip.Addr{a.IP4, a.IP6}, Identity: idClient, Meshed: true}
	wb := Workload{Namespace: "b", Name: "server-pod", IPs: []netip.Addr{b.IP4, b.IP6}, Identity: idServer, Meshed: true}
	dir := mapDirectory{a.IP4: wa, b.IP4: wb}
	auth := &denySwitch{}

	type node struct {
		p   *Proxy
		sv  *Serving
		reg *prometheus.Registry
		net *splicePanicNet
	}
	serve := func(pp *podtest.Pod, w Workload, ports ...uint16) *node {
		t.Helper()
		pn, err := podnet.Open(pp.File(t))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { pn.Close() })
		n := &node{reg: prometheus.NewRegistry(), net: &splicePanicNet{PodNetwork: pn}}
		// Idle timeouts out of the way: the pooled connection (and
		// B's closer for it) must last the whole test.
		n.p, err = New(Config{Directory: dir, Certificates: certs, Authorizer: auth, Registerer: n.reg,
			PoolIdleTimeout: time.Hour, HBONEIdleTimeout: time.Hour,
			Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
		if err != nil {
			t.Fatal(err)
		}
		pod := Pod{Workload: w, Net: n.net}
		for _, port := range ports {
			ln, err := pn.Listen(port, podnet.ListenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			switch port {
			case 15001:
				pod.Outbound = ln
			case 15006:
				pod.Inbound = ln
			case 15008:
				pod.HBONE = ln
			}
		}
		if n.sv, err = n.p.Serve(pod); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			n.sv.Close(ctx)
		})
		return n
	}
	na := serve(a, wa, 15001)
	nb := serve(b, wb, 15006, 15008)

	// B's app echoes.
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
		deadline := time.Now().Add(10 * time.Second)
		for metric(n, name, match) != want && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if got := metric(n, name, match); got != want {
			t.Fatalf("%s%v = %v, want %v", name, match, got, want)
		}
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
		name  string
		n     *node // whose agent panics
		where string
		dst   netip.AddrPort
	}{
		// B's 15008 stream handler, reading B's app (genericSplice:
		// the app's connection is not a *net.TCPConn here).
		{"inbound HBONE", nb, "tunnel.(*Serving).inboundStream(", meshed},
		// B's 15006 handler, writing to B's app (relay).
		{"inbound plaintext", nb, "tunnel.(*Serving).inboundPlain(", plain},
		// A's 15001 handler, writing the app's bytes to B (Splice's
		// pump, into the pooled connection's socket). Last: hbone's
		// write lock stays held by the panicked write, so that pooled
		// connection is of no further use.
		{"outbound HBONE", na, "tunnel.(*Serving).outbound(", meshed},
	} {
		c := dial(tc.dst)
		tc.n.net.arm(tc.where)
		io.WriteString(c, "boom\n")
		_, _ = io.ReadAll(c) // ends with the panic's reset
		panics[tc.n]++
		waitMetric(tc.n, "ambit_tunnel_connections_failed_total", map[string]string{"reason": "internal_error"}, panics[tc.n])
		if tc.n.net.where.Load() != nil {
			t.Fatalf("%s: the splice did not reach the armed call", tc.name)
		}
		if tc.n == na {
			if n := closers(na); n != beforeA {
				t.Errorf("%s: A tracks %d closers after the panicked splice, want %d as before it", tc.name, n, beforeA)
			}
			continue
		}
		if n := closers(nb); n != beforeB {
			t.Errorf("%s: B tracks %d closers after the panicked splice, want %d as before it", tc.name, n, beforeB)
		}
		if n := live(nb); n != liveB {
			t.Errorf("%s: %d live connections on B after the panicked splice, want %d", tc.name, n, liveB)
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
}
