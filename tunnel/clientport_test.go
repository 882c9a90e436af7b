package tunnel_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/tunnel/internal/meshtest"
)

// TestPlaintextClientsNeverMeetTheAgentsPorts: plaintext clients of a
// pod (outside the mesh, permissive mode) hold many connections, each
// from a port of their own ephemeral range. The agent reaches the app
// from the client's address (the app sees its real peer), and inside the
// pod's conntrack that dial must never have the tuple of a client's
// connection: the same tuple is the same connection to conntrack, and
// whichever came second hangs (the agent's dial until its 10 s timeout,
// or the client's SYN for as long as the agent's connection lives).
//
// Both pods get the same narrow ephemeral range, as if the clients' and
// the pod's kernels drew from one: before, the agent's dials took their
// ports from the pod's range and met the clients' within a few
// connections (the one-off TestShareInboundPlaintext failure of session
// 15 was this, with the default range). Now every connection works.
func TestPlaintextClientsNeverMeetTheAgentsPorts(t *testing.T) {
	testenv.RequireRoot(t)
	m := meshtest.New(t, meshtest.Options{})
	go peerEcho(m.B.Listen(t, "[::]:8080"))
	for _, p := range []*meshtest.Node{m.A, m.B} {
		p.Pod.Run(t, "sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40199")
		p.Pod.Run(t, "sysctl", "-qw", "net.ipv4.ip_local_reserved_ports=")
	}
	for _, dst := range []netip.Addr{m.B.Pod.IP4, m.B.Pod.IP6} {
		var held []net.Conn
		for i := 0; i < 120; i++ {
			// A.Net dials marked: plaintext from A's address, as a
			// client outside the mesh.
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			c, err := m.A.Net.Dial(ctx, netip.Addr{}, netip.AddrPortFrom(dst, 8080))
			cancel()
			if err != nil {
				t.Fatalf("%v: client connection %d (with %d held): %v", dst, i, len(held), err)
			}
			held = append(held, c)
			c.SetDeadline(time.Now().Add(3 * time.Second))
			msg := fmt.Sprintf("conn-%d", i)
			fmt.Fprintf(c, "echo\n%s", msg)
			buf := make([]byte, len(msg))
			if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
				t.Fatalf("%v: client connection %d from %v (with %d held): read %q, %v; want its echo", dst, i, c.LocalAddr(), len(held)-1, buf, err)
			}
			c.SetDeadline(time.Time{})
		}
		for _, c := range held {
			c.Close()
		}
	}
}
