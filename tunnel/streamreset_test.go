package tunnel_test

import (
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/tunnel"
	"github.com/ambit-mesh/ambit/tunnel/internal/meshtest"
)

// TestResetStreamAbandonsAppDial: B's app port 8097 is black-holed (its
// SYNs dropped in B), so B's agent's dial of the app hangs until the
// connect timeout (30 s here). A's app opens 20 connections to it and
// resets them once B's agent is dialling for all 20: A's agent resets
// the streams (RST_STREAM), and B's agent abandons the dials: the
// SYN-SENT sockets in B are gone and the pod's connection count is back
// to zero, long before the timeout. Before session 11 the dials went on
// to the timeout (20 SYN-SENT sockets, 20 connections counted, for 30 s).
func TestResetStreamAbandonsAppDial(t *testing.T) {
	testenv.RequireRoot(t)
	m := meshtest.New(t, meshtest.Options{Config: tunnel.Config{ConnectTimeout: 30 * time.Second}})
	cmd := "add table inet bh; add chain inet bh out { type filter hook output priority 0; policy accept; }; add rule inet bh out tcp dport 8097 drop"
	m.B.Pod.Run(t, "nft", cmd)
	synSent := func() int {
		out := m.B.Pod.Run(t, "ss", "-Htn", "state", "syn-sent", "dport", "= :8097")
		return strings.Count(out, "\n")
	}
	const N = 20
	var conns []net.Conn
	for i := 0; i < N; i++ {
		c, err := m.A.Dial(netip.AddrPortFrom(m.B.Pod.IP4, 8097))
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte("hello"))
		conns = append(conns, c)
	}
	// Each dial in flight is a SYN-SENT socket in B and a connection of
	// the pod (counted from the stream's arrival).
	wait := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(15 * time.Second) // half the connect timeout
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("%s: still not so after 15 s (SYN-SENT %d, B's pod holds %d)", what, synSent(), m.B.Serving.Connections())
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	wait("B's agent dialling for all 20", func() bool { return synSent() == N && m.B.Serving.Connections() == N })
	for _, c := range conns {
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
	}
	wait("the dials abandoned after the resets", func() bool { return synSent() == 0 && m.B.Serving.Connections() == 0 })
	if got := m.B.Metric(t, "ambit_tunnel_connections_failed_total", map[string]string{"direction": "inbound", "reason": "hbone_stream"}); got != N {
		t.Errorf("B's agent: failed_total{inbound, hbone_stream} = %v, want %d", got, N)
	}
}
