package tunnel_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambit-mesh/ambit/tunnel"
	"github.com/ambit-mesh/ambit/tunnel/internal/meshtest"
)

// serveAgain starts a second agent for the mesh's pod B, as a new agent
// does during an upgrade: its own proxy and its own listeners beside the
// old ones (SO_REUSEPORT). wrap, if set, wraps its inbound (15006)
// listener.
func serveAgain(t *testing.T, m *meshtest.Mesh, wrap func(net.Listener) net.Listener) *tunnel.Serving {
	t.Helper()
	return serveBeside(t, m, m.B, prometheus.NewRegistry(), func(pod *tunnel.Pod) {
		if wrap != nil {
			pod.Inbound = wrap(pod.Inbound)
		}
	})
}

// serveBeside serves the mesh's pod n with an agent of the test's own
// (the mesh's directory, certificates and policy, metrics into reg),
// beside n's (SO_REUSEPORT): listeners of its own in the pod, which
// adjust may change before Serve (a wrapped listener, another pod
// network). The serving closes with the test, within 2 s.
func serveBeside(t *testing.T, m *meshtest.Mesh, n *meshtest.Node, reg prometheus.Registerer, adjust func(*tunnel.Pod)) *tunnel.Serving {
	t.Helper()
	px, err := tunnel.New(tunnel.Config{Directory: m.Dir, Certificates: m.Certs, Authorizer: m.Auth, Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	pod, err := meshtest.PodListeners(n.Workload, n.Net)
	if err != nil {
		t.Fatal(err)
	}
	adjust(&pod)
	return tunnel.ServeForTest(t, px, pod)
}

// TestHandOverServesEveryStream is the destination side of a rolling
// update under load: A's app keeps opening connections to B (eight at a
// time, each a stream on A's pooled HBONE connection) while B's agent is
// replaced five times — the new one serving beside the old, then the old
// one closed. The old one's HBONE connections go away in two steps, so a
// stream A sent before it saw the first GOAWAY must be served, not
// refused, and A's next streams go over a new connection to the new
// agent. Not one exchange may fail. (A draining Serving used to answer
// such streams 503: 4–12 failures per run of this test, and a reset in
// some of e2e/kube's rolling updates.) The pod has tcp_migrate_req set
// as the agent sets it; TestKill9WithKeeper (node-agent/agent) is the
// test of what it does.
func TestHandOverServesEveryStream(t *testing.T) {
	m := newMesh(t)
	m.B.Pod.Run(t, "sysctl", "-qw", "net.ipv4.tcp_migrate_req=1")
	dst := netip.AddrPortFrom(m.B.Pod.IP4, 8080)
	var ok, failed atomic.Int64
	var mu sync.Mutex
	var firstErr error
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				err := func() error {
					c, err := m.A.Dial(dst)
					if err != nil {
						return err
					}
					defer c.Close()
					c.SetDeadline(time.Now().Add(10 * time.Second))
					if _, err := fmt.Fprintf(c, "who\n"); err != nil {
						return err
					}
					c.(*net.TCPConn).CloseWrite()
					b, err := io.ReadAll(c)
					if err != nil {
						return err
					}
					if got := strings.TrimSpace(string(b)); got != m.A.Pod.IP4.String() {
						return fmt.Errorf("app answered %q", got)
					}
					return nil
				}()
				if err != nil {
					failed.Add(1)
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					continue
				}
				ok.Add(1)
			}
		}()
	}
	old := m.B.Serving
	for round := range 5 {
		time.Sleep(150 * time.Millisecond)
		next := serveAgain(t, m, nil)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		if err := old.Close(ctx); err != nil {
			t.Errorf("round %d: the old agent's drain: %v", round, err)
		}
		cancel()
		old = next
	}
	time.Sleep(150 * time.Millisecond)
	close(stop)
	wg.Wait()
	if failed.Load() > 0 || ok.Load() == 0 {
		t.Fatalf("%d exchanges failed across five hand-overs (%d ok); first: %v", failed.Load(), ok.Load(), firstErr)
	}
	t.Logf("%d exchanges across five hand-overs, none failed", ok.Load())
}
