package tunnel_test

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/tunnel"
	"github.com/ambit-mesh/ambit/tunnel/internal/meshtest"
	"github.com/ambit-mesh/ambit/tunnel/internal/podtest"
)

// copyEcho echoes every connection ln accepts.
func copyEcho(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() { defer c.Close(); io.Copy(c, c) }()
	}
}

// killNode makes pod p a dead node: every packet in or out of it is
// dropped, nothing answered (no RST, no ICMP), as a power-off or a
// partition. revive undoes it.
func killNode(t testing.TB, p *podtest.Pod) (revive func()) {
	t.Helper()
	rules := `table inet dead {
	chain in { type filter hook prerouting priority -400; policy drop; }
	chain out { type filter hook output priority -400; policy drop; }
}`
	cmd := exec.Command("ip", "netns", "exec", p.Name, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft: %v\n%s", err, out)
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			if out, err := exec.Command("ip", "netns", "exec", p.Name, "nft", "delete", "table", "inet", "dead").CombinedOutput(); err != nil {
				t.Errorf("revive: %v\n%s", err, out)
			}
		})
	}
}

// streamUntilError writes and reads on c until one fails; it returns
// when, and the error.
func streamUntilError(c net.Conn) (time.Time, error) {
	errc := make(chan error, 2)
	go func() {
		b := make([]byte, 16<<10)
		for {
			if _, err := c.Write(b); err != nil {
				errc <- err
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	go func() {
		b := make([]byte, 64<<10)
		for {
			if _, err := c.Read(b); err != nil {
				errc <- err
				return
			}
		}
	}()
	err := <-errc
	return time.Now(), err
}

// BenchmarkNodeDeath measures what A's apps see when B's node dies,
// against a direct TCP connection between two other netns in the same
// run. Manual: AMBIT_MEASURE_NODEDEATH=1 (it takes minutes).
func BenchmarkNodeDeath(b *testing.B) {
	if os.Getenv("AMBIT_MEASURE_NODEDEATH") == "" {
		b.Skip("manual measurement; set AMBIT_MEASURE_NODEDEATH=1")
	}
	testenv.RequireRoot(b)
	m := meshtest.New(b, meshtest.Options{})
	go copyEcho(m.B.Listen(b, "[::]:8080"))
	ba, bb := podtest.Pair(b)
	var bln net.Listener
	bb.Do(b, func() (err error) { bln, err = net.Listen("tcp", "[::]:8080"); return })
	defer bln.Close()
	go copyEcho(bln)

	dst := netip.AddrPortFrom(m.B.Pod.IP4, 8080)
	bdst := netip.AddrPortFrom(bb.IP4, 8080)
	baseDial := func() (net.Conn, error) {
		var c net.Conn
		err := ba.NS.Do(func(_ nsNetNSAlias) error {
			var err error
			c, err = net.DialTimeout("tcp", bdst.String(), 150*time.Second)
			return err
		})
		return c, err
	}
	mc, err := m.A.Dial(dst)
	if err != nil {
		b.Fatal(err)
	}
	defer mc.Close()
	if err := echoes(mc); err != nil {
		b.Fatal(err)
	}
	mc.SetDeadline(time.Time{})
	bc, err := baseDial()
	if err != nil {
		b.Fatal(err)
	}
	defer bc.Close()
	if err := echoes(bc); err != nil {
		b.Fatal(err)
	}
	bc.SetDeadline(time.Time{})
	// An idle mesh connection too, and an idle direct one.
	mi, _ := m.A.Dial(dst)
	echoes(mi)
	mi.SetDeadline(time.Time{})
	bi, _ := baseDial()
	echoes(bi)
	bi.SetDeadline(time.Time{})

	type res struct {
		what string
		d    time.Duration
		err  error
	}
	out := make(chan res, 100)
	var wg sync.WaitGroup
	dead := time.Now()
	revive := killNode(b, m.B.Pod)
	brevive := killNode(b, bb)
	defer revive()
	defer brevive()
	dead = time.Now()
	streams := []struct {
		n string
		c net.Conn
	}{{"mesh stream", mc}, {"direct stream", bc}}
	meshOnly := os.Getenv("AMBIT_NODEDEATH_MESHONLY") != ""
	if os.Getenv("AMBIT_NODEDEATH_NOSTREAM") != "" {
		streams = streams[1:] // the direct one only
	}
	if meshOnly {
		streams = streams[:len(streams)-1]
	}
	for _, x := range streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			at, err := streamUntilError(x.c)
			out <- res{x.n, at.Sub(dead), err}
		}()
	}
	for _, x := range []struct {
		n string
		c net.Conn
	}{{"mesh idle", mi}, {"direct idle", bi}}[:map[bool]int{true: 1, false: 2}[meshOnly]] {
		wg.Add(1)
		go func() {
			defer wg.Done()
			x.c.SetReadDeadline(time.Now().Add(100 * time.Second))
			_, err := x.c.Read(make([]byte, 10))
			out <- res{x.n, time.Since(dead), err}
		}()
	}
	// New connections during the outage, one every 3 s for 60 s.
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			time.Sleep(time.Duration(i) * 3 * time.Second)
			st := time.Now()
			c, err := m.A.Dial(dst)
			if err == nil {
				c.SetDeadline(time.Now().Add(100 * time.Second))
				_, err = c.Write([]byte("x"))
				if err == nil {
					_, err = c.Read(make([]byte, 1))
				}
				c.Close()
			}
			out <- res{"mesh new @" + st.Sub(dead).Round(time.Second).String(), time.Since(st), err}
		}()
	}
	for i := 0; i < map[bool]int{true: 0, false: 2}[meshOnly]; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			time.Sleep(time.Duration(i) * 30 * time.Second)
			st := time.Now()
			c, err := baseDial()
			if err == nil {
				c.Close()
			}
			out <- res{"direct new @" + st.Sub(dead).Round(time.Second).String(), time.Since(st), err}
		}()
	}
	go func() {
		for i := 0; i < 80; i++ {
			time.Sleep(time.Second)
			b.Logf("b+%ds pool gauge %v failed %v", i+1,
				m.A.Metric(b, "ambit_tunnel_hbone_pool_connections", nil),
				m.A.Metric(b, "ambit_tunnel_connections_failed_total", map[string]string{"direction": "outbound"}))
		}
	}()
	go func() { wg.Wait(); close(out) }()
	for r := range out {
		b.Logf("%-20s after %8v: %v", r.what, r.d.Round(10*time.Millisecond), r.err)
	}
	revive()
	brevive()
	for i := 0; i < 3; i++ {
		st := time.Now()
		c, err := m.A.Dial(dst)
		if err == nil {
			err = echoes(c)
			c.Close()
		}
		b.Logf("after revive, mesh new %d: %v %v", i, time.Since(st).Round(time.Millisecond), err)
	}
}

type nsNetNSAlias = ns.NetNS

// BenchmarkNodeRevival: B's node is dark for AMBIT_NODEDEATH_OUTAGE
// (a duration), then back; how long A's first new connections take.
// Manual.
func BenchmarkNodeRevival(b *testing.B) {
	outage, err := time.ParseDuration(os.Getenv("AMBIT_NODEDEATH_OUTAGE"))
	if err != nil {
		b.Skip("manual measurement; set AMBIT_NODEDEATH_OUTAGE=45s")
	}
	testenv.RequireRoot(b)
	m := meshtest.New(b, meshtest.Options{})
	go copyEcho(m.B.Listen(b, "[::]:8080"))
	dst := netip.AddrPortFrom(m.B.Pod.IP4, 8080)
	c, err := m.A.Dial(dst)
	if err != nil {
		b.Fatal(err)
	}
	if err := echoes(c); err != nil {
		b.Fatal(err)
	}
	c.Close()
	revive := killNode(b, m.B.Pod)
	time.Sleep(outage)
	revive()
	for i := 0; i < 3; i++ {
		st := time.Now()
		c, err := m.A.Dial(dst)
		if err == nil {
			err = echoes(c)
			c.Close()
		}
		b.Logf("after a %v outage, new connection %d: %v, %v", outage, i, time.Since(st).Round(time.Millisecond), err)
	}
}

// TestDeadNodeDialsCountAsConnectTimeout: every new connection to a
// node that went dark fails as connect_timeout. Before, podnet's dial
// ended now with the socket's "i/o timeout", now with the context's
// deadline, and the former were counted as connect (the test failed: 9
// of 10 counted as connect_timeout).
func TestDeadNodeDialsCountAsConnectTimeout(t *testing.T) {
	testenv.RequireRoot(t)
	m := meshtest.New(t, meshtest.Options{Config: tunnel.Config{ConnectTimeout: 300 * time.Millisecond}})
	revive := killNode(t, m.B.Pod)
	defer revive()
	dst := netip.AddrPortFrom(m.B.Pod.IP4, 8080)
	const N = 10
	for i := 0; i < N; i++ {
		c, err := m.A.Dial(dst)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		_, err = c.Read(make([]byte, 1))
		c.Close()
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("connection %d to the dead node: %v, want a reset", i, err)
		}
	}
	waitMetric(t, m.A, "ambit_tunnel_connections_failed_total", map[string]string{"direction": "outbound", "reason": "connect_timeout"}, N)
}
