package agent

import (
	"net/netip"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/inventory"
)

// TestReadoptionServesTheRecordsIPs: apps/web was enrolled at ADD with
// its sandbox's IP, 10.89.9.2, while the view named 10.89.9.3 (a
// previous sandbox's); the agent restarts with the view still lagging.
// The re-adopted pod is served as the holder of the record's IP, the one
// its namespace was found by and its host entry names: a client's
// plaintext to web's app on 10.89.9.2:8080, captured to 15006, reaches
// the app. Before, re-adoption gave the tunnel the view's IPs, and it
// reset every such connection as addressed to another pod (ip_mismatch)
// until the pod's next sandbox.
func TestReadoptionServesTheRecordsIPs(t *testing.T) {
	testenv.RequireRoot(t)
	dir := agentDir(t)
	stale := []netip.Addr{netip.MustParseAddr("10.89.9.3")}
	h1 := startAgent(t, dir, invAmbient, func(o *Options) {
		o.View = staleView{Source: o.View.(*inventory.Source), name: "apps/web", ips: stale}
	})
	web, client := newPair(t, "10.89.9.2", "10.89.9.9")
	serveLines(t, web, "10.89.9.2:8080", "app")
	enrollLikePlugin(t, h1, "web", web, "10.89.9.2/24")
	h1.stop()

	reg := prometheus.NewRegistry()
	h := startAgent(t, dir, invAmbient, func(o *Options) {
		serveByRealTunnel(t, o, reg)
		o.View = staleView{Source: o.View.(*inventory.Source), name: "apps/web", ips: stale}
	})
	if p := h.podNow("apps/web"); p == nil || !p.enrolled() {
		t.Fatalf("apps/web not re-adopted: %+v", p)
	}
	c, line, err := dialFrom(t, client, "10.89.9.2:8080")
	if err != nil || line != "app" {
		t.Fatalf("plaintext to web's own IP through its capture after the re-adoption: %q %v", line, err)
	}
	c.Close()
	if n := testenv.Metric(t, reg, "ambit_tunnel_connections_opened_total", map[string]string{"direction": "inbound", "mode": "plaintext"}); n < 1 {
		t.Errorf("inbound plaintext connections opened by the tunnel: %v, want 1 (captured, not bypassed)", n)
	}
}
