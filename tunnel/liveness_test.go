package tunnel_test

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/tunnel"
	"github.com/ambit-mesh/ambit/tunnel/hbone"
	"github.com/ambit-mesh/ambit/tunnel/internal/meshtest"
)

// livenessMesh is a mesh whose CONNECT response timeout and keepalive
// are far longer than any test wait: only the liveness probe can end a
// stream put on a dead pooled connection within the test.
func livenessMesh(t *testing.T) *meshtest.Mesh {
	return meshtest.New(t, meshtest.Options{Config: tunnel.Config{
		ConnectTimeout: 2 * time.Second,
		HBONE:          hbone.Config{ResponseTimeout: 5 * time.Minute, PingInterval: 5 * time.Minute},
	}})
}

// TestNewConnsOnDeadIdlePooledConnFailInConnectTimeout: B's node goes
// dark while A's pooled connection to it is idle; new app connections
// from A, put on that connection, are reset within the connect timeout
// and counted connect_timeout, as a dial to the dead node would be, and
// the streams opening together send one PING. Once B is back, the next
// connection works at once (the dead one was forgotten, a fresh one
// dialed). Before the probe, each waited for the CONNECT response (here
// 5 min): the test's 60 s read deadline ran out.
func TestNewConnsOnDeadIdlePooledConnFailInConnectTimeout(t *testing.T) {
	testenv.RequireRoot(t)
	m := livenessMesh(t)
	go copyEcho(m.B.Listen(t, "[::]:8080"))
	dst := netip.AddrPortFrom(m.B.Pod.IP4, 8080)
	c, err := m.A.Dial(dst)
	if err != nil {
		t.Fatal(err)
	}
	if err := echoes(c); err != nil {
		t.Fatal(err)
	}
	c.Close()
	revive := killNode(t, m.B.Pod)
	defer revive()
	time.Sleep(1500 * time.Millisecond) // past the probe's 1 s of silence
	probes := hbone.LivenessProbes()
	silent := m.A.Metric(t, "ambit_tunnel_peers_silent_total", nil)
	const N = 5
	var wg sync.WaitGroup
	for i := 0; i < N; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st := time.Now()
			c, err := m.A.Dial(dst) // captured: A's agent accepts it
			if err != nil {
				t.Error(err)
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(60 * time.Second))
			if _, err = c.Write([]byte("x")); err == nil {
				_, err = c.Read(make([]byte, 1))
			}
			if !errors.Is(err, syscall.ECONNRESET) {
				t.Errorf("connection %d to the dead node after %v: %v, want a reset", i, time.Since(st), err)
				return
			}
			t.Logf("connection %d reset after %v", i, time.Since(st).Round(10*time.Millisecond))
		}()
	}
	wg.Wait()
	if n := hbone.LivenessProbes() - probes; n != 1 {
		t.Errorf("%d probe PINGs for %d connections opened together, want 1", n, N)
	}
	waitMetric(t, m.A, "ambit_tunnel_connections_failed_total", map[string]string{"direction": "outbound", "reason": "connect_timeout"}, N)
	// What an operator sees: one probe, one connection found silent.
	if d := m.A.Metric(t, "ambit_tunnel_liveness_probes_total", nil); d < 1 {
		t.Errorf("ambit_tunnel_liveness_probes_total = %v after a probe", d)
	}
	if d := m.A.Metric(t, "ambit_tunnel_peers_silent_total", nil) - silent; d != 1 {
		t.Errorf("ambit_tunnel_peers_silent_total rose by %v, want 1 (the dead pooled connection)", d)
	}
	revive()
	c, err = m.A.Dial(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := echoes(c); err != nil {
		t.Fatalf("first connection after B is back: %v", err)
	}
}

// TestBusyPooledConnSendsNoProbe: new app connections put on a pooled
// connection that is in use (another stream moving data) open without a
// liveness PING: a live connection pays nothing for the probe.
func TestBusyPooledConnSendsNoProbe(t *testing.T) {
	testenv.RequireRoot(t)
	m := livenessMesh(t)
	go copyEcho(m.B.Listen(t, "[::]:8080"))
	dst := netip.AddrPortFrom(m.B.Pod.IP4, 8080)
	busy, err := m.A.Dial(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	if err := echoes(busy); err != nil {
		t.Fatal(err)
	}
	busy.SetDeadline(time.Time{})
	probes := hbone.LivenessProbes()
	stop := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		b := make([]byte, 1024)
		for {
			select {
			case <-stop:
				done <- nil
				return
			case <-time.After(20 * time.Millisecond):
			}
			if _, err := busy.Write(b); err != nil {
				done <- err
				return
			}
			if _, err := io.ReadFull(busy, b); err != nil {
				done <- err
				return
			}
		}
	}()
	for i := 0; i < 10; i++ {
		time.Sleep(150 * time.Millisecond)
		c, err := m.A.Dial(dst)
		if err != nil {
			t.Fatal(err)
		}
		err = echoes(c)
		c.Close()
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
	}
	close(stop)
	if err := <-done; err != nil && !errors.Is(err, os.ErrDeadlineExceeded) && !errors.Is(err, net.ErrClosed) {
		t.Errorf("busy stream: %v", err)
	}
	if n := hbone.LivenessProbes() - probes; n != 0 {
		t.Errorf("%d probe PINGs on a busy pooled connection, want 0", n)
	}
}

// TestPeerOutageShorterThanKeepaliveSparesOpenConnections: B is cut off
// (every packet dropped) for 4 s while an app connection from A to B is
// open (answered long ago), and a new app connection comes meanwhile:
// the new one is reset in the connect timeout (connect_timeout), the
// open one goes on once B is back (TCP retransmits what was dropped), as
// it did before the liveness probe: a peer's pause, its agent starved or
// stopped, a short partition, is no reason to cut what is open; keepalive
// still is. Before, the probe's verdict on the new connection's stream
// closed the pooled connection and reset the open one with it.
func TestPeerOutageShorterThanKeepaliveSparesOpenConnections(t *testing.T) {
	testenv.RequireRoot(t)
	m := livenessMesh(t)
	go copyEcho(m.B.Listen(t, "[::]:8080"))
	dst := netip.AddrPortFrom(m.B.Pod.IP4, 8080)
	open, err := m.A.Dial(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer open.Close()
	if err := echoes(open); err != nil {
		t.Fatal(err)
	}
	revive := killNode(t, m.B.Pod)
	defer revive()
	time.Sleep(1500 * time.Millisecond) // past the probe's 1 s of silence
	c, err := m.A.Dial(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	if _, err = c.Write([]byte("x")); err == nil {
		_, err = c.Read(make([]byte, 1))
	}
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("new connection during the outage: %v, want a reset", err)
	}
	waitMetric(t, m.A, "ambit_tunnel_connections_failed_total", map[string]string{"direction": "outbound", "reason": "connect_timeout"}, 1)
	time.Sleep(500 * time.Millisecond) // the outage: 4 s in all
	revive()
	open.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := open.Write([]byte("ping")); err != nil {
		t.Fatalf("the open connection after the outage: %v", err)
	}
	if _, err := io.ReadFull(open, make([]byte, 4)); err != nil {
		t.Fatalf("the open connection after the outage: %v", err)
	}
	c2, err := m.A.Dial(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if err := echoes(c2); err != nil {
		t.Fatalf("first connection after B is back: %v", err)
	}
}
