package tunnel_test

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/tunnel"
)

// portServer answers every connection with the port it was accepted on,
// so the client learns which endpoint of a Service it reached.
func portServer(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		ap := netip.MustParseAddrPort(c.LocalAddr().String())
		fmt.Fprintf(c, "%d\n", ap.Port())
		c.Close()
	}
}

// TestServiceAffinityAcrossConnections: A's app connects again and again
// to a Service with sessionAffinity ClientIP, through its agent and HBONE
// to B, whose two endpoints (ports 8081, 8082) say which one answered.
// Every connection reaches the same endpoint, where the same Service
// without affinity spreads them over both. When that endpoint stops
// being usable the client moves to the other one and stays there, also
// after the first comes back.
func TestServiceAffinityAcrossConnections(t *testing.T) {
	m := newMesh(t)
	go portServer(m.B.Listen(t, "[::]:8081"))
	go portServer(m.B.Listen(t, "[::]:8082"))
	e1, e2 := netip.AddrPortFrom(m.B.Pod.IP4, 8081), netip.AddrPortFrom(m.B.Pod.IP4, 8082)
	sticky := netip.MustParseAddrPort("10.96.8.10:80")
	plain := netip.MustParseAddrPort("10.96.8.11:80")
	both := []netip.AddrPort{e1, e2}
	sticky1h := &tunnel.Affinity{Timeout: time.Hour, Port: "shop/sticky:http"}
	m.Dir.SetService(sticky, tunnel.Service{Endpoints: both, Affinity: sticky1h})
	m.Dir.SetService(plain, tunnel.Service{Endpoints: both})

	reached := func(vip netip.AddrPort) string {
		t.Helper()
		c, err := m.A.Dial(vip)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		b, err := io.ReadAll(c)
		if err != nil {
			t.Fatalf("via %v: %v", vip, err)
		}
		return strings.TrimSpace(string(b))
	}
	count := func(vip netip.AddrPort, n int) map[string]int {
		seen := map[string]int{}
		for i := 0; i < n; i++ {
			seen[reached(vip)]++
		}
		return seen
	}

	if seen := count(plain, 20); len(seen) != 2 {
		t.Fatalf("without affinity 20 connections reached %v: want both endpoints (random per connection)", seen)
	}
	seen := count(sticky, 20)
	if len(seen) != 1 {
		t.Fatalf("with ClientIP affinity 20 connections from one pod reached %v: want one endpoint", seen)
	}
	var first string
	for p := range seen {
		first = p
	}
	gone, other := e1, e2
	if first == "8082" {
		gone, other = e2, e1
	}
	m.Dir.SetService(sticky, tunnel.Service{Endpoints: []netip.AddrPort{other}, Affinity: sticky1h})
	want := fmt.Sprint(other.Port())
	if seen := count(sticky, 5); len(seen) != 1 || seen[want] != 5 {
		t.Fatalf("endpoint %v removed: connections reached %v, want all on %s", gone, seen, want)
	}
	m.Dir.SetService(sticky, tunnel.Service{Endpoints: both, Affinity: sticky1h})
	if seen := count(sticky, 20); len(seen) != 1 || seen[want] != 20 {
		t.Fatalf("endpoint %v back: connections reached %v, want all kept on %s", gone, seen, want)
	}
	waitMetric(t, m.A, "ambit_tunnel_connections_closed_total", map[string]string{"direction": "outbound", "mode": "hbone"}, 65)
}
