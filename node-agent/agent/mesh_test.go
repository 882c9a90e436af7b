package agent

import (
	"bufio"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambit-mesh/ambit/internal/testca"
	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/cluster"
	"github.com/ambit-mesh/ambit/tunnel"
)

// newTestCA is a throwaway SPIFFE CA issuing on demand (tunnel.Certificates).
func newTestCA(t testing.TB) *testca.Store {
	ca, err := testca.New("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	return testca.NewStore(ca)
}

// TestMeshThroughRealTunnel: two pods enrolled by this agent, served by
// the real tunnel; the client's request reaches the server's app over
// HBONE (mTLS on 15008), as the tunnel's own metrics show.
func TestMeshThroughRealTunnel(t *testing.T) {
	testenv.RequireRoot(t)
	var proxy *tunnel.Proxy
	reg := prometheus.NewRegistry()
	h := startAgent(t, "", invAmbient, func(o *Options) { proxy = serveByRealTunnel(t, o, reg) })
	pol := h.a.Policy()
	h.inv.SetMeshed(func(p cluster.Pod, ns *cluster.Namespace) bool { return pol.Decide(p, ns).Enroll })
	client, server := newPair(t, "10.90.0.2", "10.90.0.3")
	enrollLikePlugin(t, h, "client", client, "10.90.0.2/24")
	enrollLikePlugin(t, h, "server", server, "10.90.0.3/24")
	if w, ok := h.inv.WorkloadByIP(netip.MustParseAddr("10.90.0.3")); !ok || !w.Meshed {
		t.Fatalf("server not meshed in the directory: %+v %v", w, ok)
	}

	c, line, err := dialFrom(t, client, "10.90.0.3:8080")
	if err != nil || line != "plain" {
		t.Fatalf("client → server app through the mesh: %q %v", line, err)
	}
	secret := "top-secret-payload-7f3a"
	c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(c, "%s\n", secret)
	got, err := bufio.NewReader(c).ReadString('\n')
	c.Close()
	if err != nil || strings.TrimSpace(got) != secret {
		t.Fatalf("echo through the mesh: %q %v", got, err)
	}
	// It went over HBONE: an outbound hbone connection from the client
	// and an inbound one at the server, both as their SPIFFE identities.
	out := countOpened(t, reg, "outbound", "hbone")
	in := countOpened(t, reg, "inbound", "hbone")
	if out < 1 || in < 1 {
		t.Fatalf("tunnel connections opened: outbound hbone %v, inbound hbone %v", out, in)
	}
	_ = proxy
}

func countOpened(t testing.TB, reg *prometheus.Registry, direction, mode string) float64 {
	t.Helper()
	return testenv.Metric(t, reg, "ambit_tunnel_connections_opened_total", map[string]string{"direction": direction, "mode": mode})
}
