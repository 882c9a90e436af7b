package tunnel_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/tunnel"
	"github.com/ambit-mesh/ambit/tunnel/internal/meshtest"
)

// panickyNet is a pod network whose Dial panics (a bug in the dialing
// code, say) once release is closed: the test closes it when the client
// watch has the dial's client in its set.
type panickyNet struct {
	tunnel.PodNetwork
	release chan struct{}
}

func (p *panickyNet) Dial(ctx context.Context, src netip.Addr, dst netip.AddrPort) (net.Conn, error) {
	<-p.release
	panic("test: Dial panics during a watched dial")
}

// TestClientWatchEndsOnPanic: a panic during a watched dial (the
// connection's recover resets the client and the agent goes on) ends
// the watch too. It used to stay in the epoll set's table for good:
// ambit_tunnel_client_watch_active stuck at 1 with no dial running, and
// the watch holding a descriptor number the agent had closed.
func TestClientWatchEndsOnPanic(t *testing.T) {
	testenv.RequireRoot(t)
	m := meshtest.New(t, meshtest.Options{NoServe: true})
	reg := prometheus.NewRegistry()
	release := make(chan struct{})
	serveBeside(t, m, m.A, reg, func(pod *tunnel.Pod) { pod.Net = &panickyNet{PodNetwork: m.A.Net, release: release} })
	active := func() float64 { return testenv.Metric(t, reg, "ambit_tunnel_client_watch_active", nil) }
	if n := active(); n != 0 {
		t.Fatalf("client_watch_active %v before the test's dial, want 0 (a watch left by an earlier test?)", n)
	}

	// Outside the mesh (not in the directory): a passthrough, dialled
	// through pod.Net. The address is never reached: Dial panics.
	c, err := m.A.Dial(netip.MustParseAddrPort("198.51.100.7:80"))
	if err != nil {
		close(release)
		t.Fatal(err)
	}
	defer c.Close()
	// A slow dial: its client is watched 20 ms in (later on a busy
	// machine). Then the panic.
	deadline := time.Now().Add(5 * time.Second)
	for active() != 1 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	n := active()
	close(release)
	if n != 1 {
		t.Fatalf("client_watch_active %v during the slow dial, want 1", n)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadAll(c); !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("client read %v after the panic, want a reset", err)
	}
	if f := testenv.Metric(t, reg, "ambit_tunnel_connections_failed_total", map[string]string{"reason": "internal_error"}); f != 1 {
		t.Errorf("failed_total{reason=internal_error} %v, want 1 (the panic recovered)", f)
	}
	deadline = time.Now().Add(5 * time.Second)
	for active() != 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := active(); n != 0 {
		t.Errorf("client_watch_active %v 5 s after the panicked dial's client was reset, want 0", n)
	}
}
