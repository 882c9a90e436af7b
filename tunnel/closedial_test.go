package tunnel_test

import (
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/tunnel/internal/meshtest"
)

// TestCloseCutsPendingDials: the pod is removed (CNI DEL, unenroll, the
// pod deleted: Serving.Close) while its agent is still dialling for
// connections it accepted, towards destinations whose SYNs are dropped
// (connect timeout 30 s). The clients are still there, having sent their
// request, so nothing but Close ends those dials. Past Close's deadline
// its cut must end them as it ends the pod's relaying connections: Close
// returns within closeSlack of its deadline, the dials' SYN-SENT sockets
// are gone when it returns, each client's connection is reset and each
// dial is counted a failure. Before session 12's fix the passthrough
// (15001 to outside the mesh) and 15006 dials were not cut: Close waited
// for the connect timeout, and the test's 10 s bound failed. (15001's
// HBONE dial was cut with the pod's pool already, and an inbound
// stream's app dial with its HBONE connection.)
func TestCloseCutsPendingDials(t *testing.T) {
	const clients = 5
	type dialCase struct {
		node    *meshtest.Node // whose Serving is closed
		dial    func() (net.Conn, error)
		synSent func() int
		dials   int    // SYN-SENT sockets for the clients
		dir     string // failed_total's direction
		reason  string // and reason, for the cut dials
	}
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T, m *meshtest.Mesh) dialCase
	}{
		{"15001 passthrough", func(t *testing.T, m *meshtest.Mesh) dialCase {
			_, cIP := outsideServer(t, m.A.Pod)
			blackHole(t, m.A.Pod, "ip daddr "+cIP.String())
			dst := netip.AddrPortFrom(cIP, 8080)
			return dialCase{node: m.A, dials: clients, dir: "outbound", reason: "upstream_unreachable",
				dial:    func() (net.Conn, error) { return m.A.Dial(dst) },
				synSent: func() int { return synSent(t, m.A.Pod, "dst", cIP.String()) }}
		}},
		{"15001 HBONE", func(t *testing.T, m *meshtest.Mesh) dialCase {
			blackHole(t, m.A.Pod, "tcp dport 15008")
			dst := netip.AddrPortFrom(m.B.Pod.IP4, 8080)
			return dialCase{node: m.A, dials: 1, dir: "outbound", reason: "hbone_connect",
				dial:    func() (net.Conn, error) { return m.A.Dial(dst) },
				synSent: func() int { return synSent(t, m.A.Pod, "dport", "= :15008") }}
		}},
		{"15006", func(t *testing.T, m *meshtest.Mesh) dialCase {
			dst, dials, _ := blackHoledApp(t, m.B)
			return dialCase{node: m.B, dials: clients, dir: "inbound", reason: "upstream_unreachable",
				// From A's netns through A's agent's own (uncaptured)
				// network: plaintext to B's 15006.
				dial:    func() (net.Conn, error) { return m.A.Net.Dial(t.Context(), netip.Addr{}, dst) },
				synSent: dials}
		}},
		{"15008 stream", func(t *testing.T, m *meshtest.Mesh) dialCase {
			dst, dials, _ := blackHoledApp(t, m.B)
			// B's agent dials its app for A's streams; the cut of
			// their HBONE connection ends them.
			return dialCase{node: m.B, dials: clients, dir: "inbound", reason: "hbone_stream",
				dial:    func() (net.Conn, error) { return m.A.Dial(dst) },
				synSent: dials}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := goneMesh(t)
			dc := tc.setup(t, m)
			sv := dc.node.Serving
			state := func() string {
				return fmt.Sprintf("%d SYN-SENT, pod holds %d connections", dc.synSent(), sv.Connections())
			}
			cs := dialN(t, clients, dc.dial)
			for _, c := range cs {
				// A request sent: a client waiting for its answer,
				// not one that left (the client watch lets its dial
				// go on).
				if _, err := fmt.Fprintf(c, "who\n"); err != nil {
					t.Fatal(err)
				}
			}
			waitFor(t, fmt.Sprintf("the agent dialling for its %d clients", clients), goneBound,
				func() bool { return dc.synSent() == dc.dials && sv.Connections() == clients }, state)
			failed := metricOf(t, dc.node, dc.dir)
			before := failed(dc.reason)

			closeWithin(t, sv, "the agent is still dialling for its clients")
			if n := dc.synSent(); n != 0 {
				t.Errorf("after Close, %d SYN-SENT sockets of the pod's dials are left, want 0", n)
			}
			if n := sv.Connections(); n != 0 {
				t.Errorf("after Close, the pod holds %d connections, want 0", n)
			}
			if got := failed(dc.reason) - before; got != clients {
				t.Errorf("failed_total{%s, %s} rose by %v, want %d (one per cut dial)", dc.dir, dc.reason, got, clients)
			}
			for i, c := range cs {
				c.SetReadDeadline(time.Now().Add(goneBound))
				if _, err := c.Read(make([]byte, 1)); err == nil || isTimeout(err) {
					t.Errorf("client %d after Close: read %v, want its connection ended", i, err)
				}
			}
		})
	}
}
