package istio

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/tunnel/internal/meshtest"
)

func whoServer(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			line, _ := bufio.NewReader(c).ReadString('\n')
			ap := netip.MustParseAddrPort(c.RemoteAddr().String())
			fmt.Fprintf(c, "%s %s", ap.Addr().Unmap(), line)
		}()
	}
}

// TestIstioDialerToAmbitServer: Istio's Go HBONE dialer (in pod A)
// reaches B's app through Ambit's HBONE server; B's app sees A's IP.
func TestIstioDialerToAmbitServer(t *testing.T) {
	testenv.RequireRoot(t)
	m := meshtest.New(t, meshtest.Options{})
	go whoServer(m.B.Listen(t, "[::]:8080"))
	env := append(writePEM(t, m.CA, m.A.Workload.Identity), "AMBIT_ISTIO_ROLE=dial",
		"PROXY="+netip.AddrPortFrom(m.B.Pod.IP4, 15008).String(),
		"TARGET="+netip.AddrPortFrom(m.B.Pod.IP4, 8080).String(),
		"SEND=hello-from-istio\n")
	cmd, out := helper(t, m.A.Pod, false, env...)
	if err := cmd.Run(); err != nil {
		t.Fatalf("istio dialer: %v\n%s", err, out)
	}
	want := m.A.Pod.IP4.String() + " hello-from-istio\n"
	if out.String() != want {
		t.Fatalf("through Ambit's server the app answered %q, want %q", out.String(), want)
	}
	if n := m.B.Metric(t, "ambit_tunnel_connections_opened_total", map[string]string{"direction": "inbound", "mode": "hbone",
		"src_identity": m.A.Workload.Identity}); n != 1 {
		t.Errorf("Ambit's server counted %v inbound HBONE connections from A, want 1", n)
	}
}

// TestAmbitClientToIstioServer: A's app, captured by Ambit's agent,
// reaches B's app through Istio's Go HBONE server.
func TestAmbitClientToIstioServer(t *testing.T) {
	testenv.RequireRoot(t)
	m := meshtest.New(t, meshtest.Options{NoServeB: true})
	go whoServer(m.B.Listen(t, "[::]:8080"))
	helper(t, m.B.Pod, true, append(writePEM(t, m.CA, m.B.Workload.Identity), "AMBIT_ISTIO_ROLE=server")...)
	c, err := m.A.Dial(netip.AddrPortFrom(m.B.Pod.IP4, 8080))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "hello-from-ambit\n")
	c.(*net.TCPConn).CloseWrite()
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	// Istio's server dials the app from its own pod address.
	if got := string(b); !strings.HasSuffix(got, " hello-from-ambit\n") {
		t.Fatalf("through Istio's server the app answered %q", got)
	}
	if n := m.A.Metric(t, "ambit_tunnel_connections_opened_total", map[string]string{"direction": "outbound", "mode": "hbone"}); n != 1 {
		t.Errorf("Ambit's client counted %v outbound HBONE connections, want 1", n)
	}
}
