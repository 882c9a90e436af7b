package tunnel_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambit-mesh/ambit/tunnel"
)

// TestPlaintextFromMeshedPodIsCounted: an app in meshed pod A that puts
// the agent's mark (0x539) on its own socket skips A's capture. SO_MARK
// needs CAP_NET_ADMIN, or since Linux 5.17 only CAP_NET_RAW, which
// container runtimes give a root container by default. Its bytes cross
// the link in plaintext; B's inbound capture still takes them (the mark
// does not survive the netns crossing), so a strict B refuses them, but
// a permissive B serves them. Either way B's agent now says so: the
// source IP is a meshed pod's, which only a bypassed capture (or a
// source agent that did not know B as meshed) explains. Before, both
// counted as any plaintext client's: nothing told the operator that two
// meshed pods talked in plaintext. A source outside the mesh is not
// counted.
func TestPlaintextFromMeshedPodIsCounted(t *testing.T) {
	m := newMesh(t)
	// The app's own socket in A: marked like the agent's, not the agent's.
	dial := func() (net.Conn, error) {
		var c net.Conn
		var err error
		m.A.Pod.Do(t, func() error {
			d := net.Dialer{Timeout: 3 * time.Second, Control: func(_, _ string, rc syscall.RawConn) error {
				var serr error
				if cerr := rc.Control(func(fd uintptr) {
					serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, 0x539)
				}); cerr != nil {
					return cerr
				}
				return serr
			}}
			c, err = d.DialContext(context.Background(), "tcp", netip.AddrPortFrom(m.B.Pod.IP4, 8080).String())
			return nil
		})
		return c, err
	}
	fromMesh := map[string]string{"src_identity": m.A.Workload.Identity, "dst_identity": m.B.Workload.Identity}
	const name = "ambit_tunnel_plaintext_from_meshed_total"

	// Permissive B: served, and counted as plaintext from a meshed pod.
	c, err := dial()
	if err != nil {
		t.Fatal(err)
	}
	if got := ask(t, c, "who"); got != m.A.Pod.IP4.String() {
		t.Fatalf("permissive: app saw %q, want %s", got, m.A.Pod.IP4)
	}
	c.Close()
	waitMetric(t, m.B, name, fromMesh, 1)

	// Strict B: refused, and still counted.
	m.Auth.Set(func(ci tunnel.ConnInfo) tunnel.Verdict {
		if ci.Plaintext {
			return tunnel.Verdict{Allow: false, Policy: "strict", Reason: "plaintext refused"}
		}
		return tunnel.Verdict{Allow: true}
	})
	if c, err = dial(); err == nil {
		fmt.Fprintf(c, "who\n")
		b, _ := io.ReadAll(c)
		c.Close()
		if len(b) > 0 {
			t.Fatalf("strict: the marked app got %q", b)
		}
	}
	waitMetric(t, m.B, "ambit_tunnel_connections_failed_total", map[string]string{"direction": "inbound", "reason": "denied"}, 1)
	waitMetric(t, m.B, name, fromMesh, 2)

	// A source the directory knows outside the mesh: an ordinary
	// plaintext client, not counted.
	m.Auth.Set(nil)
	w := m.A.Workload
	w.Meshed = false
	m.Dir.AddWorkload(w)
	if c, err = dial(); err != nil {
		t.Fatal(err)
	}
	if got := ask(t, c, "who"); got != m.A.Pod.IP4.String() {
		t.Fatalf("unmeshed source: app saw %q", got)
	}
	c.Close()
	waitMetric(t, m.B, "ambit_tunnel_connections_closed_total", map[string]string{"direction": "inbound", "mode": "plaintext"}, 2)
	if got := m.B.Metric(t, name, nil); got != 2 {
		t.Fatalf("%s = %v after a plaintext client outside the mesh, want 2", name, got)
	}
}

// TestRemoteToAgentPortsRefused: a plaintext client (A's socket with the
// agent mark, so A's capture skips it) aiming at B's own 15001 or 15006
// is taken by B's inbound capture to 15006 and refused there
// (self_call), never looped into B's outbound side or its app.
func TestRemoteToAgentPortsRefused(t *testing.T) {
	m := newMesh(t)
	for _, port := range []uint16{15001, 15006} {
		c, err := m.A.Net.Dial(context.Background(), netip.Addr{}, netip.AddrPortFrom(m.B.Pod.IP4, port))
		if err != nil {
			continue // reset before connect() returned
		}
		fmt.Fprintf(c, "who\n")
		b, _ := io.ReadAll(c)
		c.Close()
		if len(b) > 0 {
			t.Errorf("to B:%d: got %q, want a reset", port, b)
		}
	}
	waitMetric(t, m.B, "ambit_tunnel_connections_failed_total", map[string]string{"direction": "inbound", "reason": "self_call"}, 2)
}
