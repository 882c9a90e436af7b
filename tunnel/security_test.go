package tunnel_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testca"
	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/tunnel"
	"github.com/ambit-mesh/ambit/tunnel/hbone"
	"github.com/ambit-mesh/ambit/tunnel/internal/podtest"
)

// capture runs tcpdump on a pod's link until stop is called and returns
// the raw pcap bytes and the decoded one-line-per-packet text.
func capture(t *testing.T, p *podtest.Pod) (stop func() (raw []byte, text string)) {
	t.Helper()
	file := filepath.Join(t.TempDir(), "cap.pcap")
	cmd := exec.Command("ip", "netns", "exec", p.Name, "tcpdump", "-i", p.Link, "-U", "-s", "0", "-n", "-w", file, "tcp")
	stderr := &testenv.Buffer{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(stderr.String(), "listening on") && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	return func() ([]byte, string) {
		cmd.Process.Signal(syscall.SIGINT)
		cmd.Wait()
		raw, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command("tcpdump", "-r", file, "-n", "-q").Output()
		if err != nil {
			t.Fatal(err)
		}
		return raw, string(out)
	}
}

// TestServiceVIPEncrypted: A's app calls a Service VIP; the agent picks
// an endpoint (B), tunnels it over HBONE; on the wire there is only TLS
// to port 15008 and not one copy of the (recognizable) payload.
func TestServiceVIPEncrypted(t *testing.T) {
	m := newMesh(t)
	vip := netip.MustParseAddrPort("10.96.7.10:80")
	vip6 := netip.MustParseAddrPort("[fd00:96::10]:80")
	m.Dir.AddService(vip, netip.AddrPortFrom(m.B.Pod.IP4, 8080))
	m.Dir.AddService(vip6, netip.AddrPortFrom(m.B.Pod.IP6, 8080))
	var mark [8]byte
	rand.Read(mark[:])
	marker := "AMBIT-SECRET-" + hex.EncodeToString(mark[:])
	payload := strings.Repeat(marker, 20000) // ~580 KB
	stop := capture(t, m.A.Pod)
	for _, v := range []netip.AddrPort{vip, vip6} {
		c, err := m.A.Dial(v)
		if err != nil {
			t.Fatal(err)
		}
		got := ask(t, c, "echo\n"+payload)
		c.Close()
		if got != strings.TrimSpace(payload) {
			t.Fatalf("via %v: echo of %d bytes came back as %d bytes", v, len(payload), len(got))
		}
	}
	raw, text := stop()
	onlyHBONEOnTheWire(t, raw, text, marker[:20], "AMBIT-SECRET")
	waitMetric(t, m.A, "ambit_tunnel_connections_closed_total", map[string]string{"direction": "outbound", "mode": "hbone"}, 2)
}

// outsideServer runs peerEcho on :8080 in a netns of its own, outside the
// mesh, on a veth link of pod p's, and returns p's address on that link
// (the source the server sees) and the server's.
func outsideServer(t *testing.T, p *podtest.Pod) (local, server netip.Addr) {
	t.Helper()
	c := podtest.NewNetns(t)
	sfx := podtest.Suffix()
	la, lc := "atp"+sfx, "atq"+sfx
	p.Run(t, "ip", "link", "add", la, "type", "veth", "peer", "name", lc, "netns", c.Name)
	b := p.IP4.As4()
	local = netip.AddrFrom4([4]byte{b[0], b[1], 1, 1})
	server = netip.AddrFrom4([4]byte{b[0], b[1], 1, 2})
	p.Run(t, "ip", "addr", "add", local.String()+"/24", "dev", la)
	p.Run(t, "ip", "link", "set", la, "up")
	c.Run(t, "ip", "addr", "add", server.String()+"/24", "dev", lc)
	c.Run(t, "ip", "link", "set", lc, "up")
	var ln net.Listener
	c.Do(t, func() (err error) { ln, err = net.Listen("tcp", ":8080"); return })
	t.Cleanup(func() { ln.Close() })
	go peerEcho(ln)
	return local, server
}

// TestPassthrough: a destination outside the mesh is reached in
// plaintext from A's own netns (A's IP, marked: not captured again).
func TestPassthrough(t *testing.T) {
	m := newMesh(t)
	aIP, cIP := outsideServer(t, m.A.Pod)
	conn, err := m.A.Dial(netip.AddrPortFrom(cIP, 8080))
	if err != nil {
		t.Fatal(err)
	}
	if got := ask(t, conn, "who"); got != aIP.String() {
		t.Errorf("outside server saw %q, want A's address %s", got, aIP)
	}
	conn.Close()
	waitMetric(t, m.A, "ambit_tunnel_connections_closed_total", map[string]string{"direction": "outbound", "mode": "passthrough"}, 1)
}

// TestInboundPlaintextModes: a client outside the mesh (A's socket with
// the agent mark, so A's capture skips it) reaches B's app in plaintext
// when B is permissive, and is refused when strict.
func TestInboundPlaintextModes(t *testing.T) {
	m := newMesh(t)
	dial := func() (net.Conn, error) {
		return m.A.Net.Dial(context.Background(), netip.Addr{}, netip.AddrPortFrom(m.B.Pod.IP4, 8080))
	}
	c, err := dial()
	if err != nil {
		t.Fatal(err)
	}
	if got := ask(t, c, "who"); got != m.A.Pod.IP4.String() {
		t.Errorf("permissive: app saw %q, want %s", got, m.A.Pod.IP4)
	}
	c.Close()
	waitMetric(t, m.B, "ambit_tunnel_connections_closed_total", map[string]string{"direction": "inbound", "mode": "plaintext"}, 1)

	m.Auth.Set(func(ci tunnel.ConnInfo) tunnel.Verdict {
		if ci.Plaintext {
			return tunnel.Verdict{Allow: false, Policy: "strict", Reason: "plaintext refused"}
		}
		return tunnel.Verdict{Allow: true}
	})
	c, err = dial()
	if err == nil {
		fmt.Fprintf(c, "who\n")
		b, rerr := io.ReadAll(c)
		c.Close()
		if len(b) > 0 {
			t.Errorf("strict: plaintext client got %q (err %v)", b, rerr)
		}
	}
	waitMetric(t, m.B, "ambit_tunnel_connections_failed_total", map[string]string{"direction": "inbound", "reason": "denied"}, 1)
	// HBONE from A is still allowed.
	c, err = m.A.Dial(netip.AddrPortFrom(m.B.Pod.IP4, 8080))
	if err != nil {
		t.Fatal(err)
	}
	if got := ask(t, c, "who"); got != m.A.Pod.IP4.String() {
		t.Errorf("strict: HBONE client got %q", got)
	}
	c.Close()
}

// TestBadPeersRefused: every kind of bad client certificate is refused
// at B's 15008 and counted by reason; a server with the wrong identity is
// refused by A.
func TestBadPeersRefused(t *testing.T) {
	m := newMesh(t)
	other, _ := testca.New("cluster.local")
	idA := m.A.Workload.Identity
	mk := func(ca *testca.CA, id string, o testca.IssueOptions) *tls.Certificate {
		c, err := ca.Issue(id, o)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	cases := []struct {
		name, reason string
		cert         *tls.Certificate
	}{
		{"wrong CA", "tls_untrusted", mk(other, idA, testca.IssueOptions{})},
		{"expired", "tls_expired", mk(m.CA, idA, testca.IssueOptions{NotBefore: time.Now().Add(-2 * time.Hour), NotAfter: time.Now().Add(-time.Hour)})},
		{"other trust domain", "tls_foreign_trust_domain", mk(m.CA, "spiffe://evil.example/ns/a/sa/client", testca.IssueOptions{})},
		{"no certificate", "tls_no_certificate", nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			raw, err := m.A.Net.Dial(context.Background(), netip.Addr{}, netip.AddrPortFrom(m.B.Pod.IP4, 15008))
			if err != nil {
				t.Fatal(err)
			}
			cfg := &tls.Config{MinVersion: tls.VersionTLS13, NextProtos: []string{"h2"}, InsecureSkipVerify: true}
			if tc.cert != nil {
				cfg.Certificates = []tls.Certificate{*tc.cert}
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			hc, err := hbone.Client(ctx, raw, cfg, hbone.Config{})
			if err == nil {
				s, err := hc.OpenStream(netip.AddrPortFrom(m.B.Pod.IP4, 8080).String(), nil)
				if err == nil {
					if st, _, err := s.Response(ctx); err == nil {
						t.Errorf("stream answered %d, want the connection refused", st)
					}
				}
				hc.Close()
			}
			waitMetric(t, m.B, "ambit_tunnel_connections_failed_total", map[string]string{"direction": "inbound", "reason": tc.reason}, 1)
		})
	}
	// Wrong SAN: the directory expects another identity for B's IPv6.
	impostor := m.B.Workload
	impostor.IPs = []netip.Addr{m.B.Pod.IP6}
	impostor.Identity = m.CA.ID("b", "someone-else")
	m.Dir.AddWorkload(impostor)
	c, err := m.A.Dial(netip.AddrPortFrom(m.B.Pod.IP6, 8080))
	if err == nil {
		fmt.Fprintf(c, "who\n")
		b, _ := io.ReadAll(c)
		c.Close()
		if len(b) > 0 {
			t.Errorf("reached a server with the wrong identity: %q", b)
		}
	}
	waitMetric(t, m.A, "ambit_tunnel_connections_failed_total", map[string]string{"direction": "outbound", "reason": "tls_wrong_identity"}, 1)
}

// TestStalledReaderBoundedMemory: B's app stops reading for 5 s (the
// issue asks 30 s; 5 s keeps the suite fast and shows the same thing)
// while A's app writes as fast as it can. The agents' buffered bytes stay
// within one stream window and the heap stays flat; then every byte
// arrives.
func TestStalledReaderBoundedMemory(t *testing.T) {
	m := newMesh(t)
	ln := m.B.Listen(t, "[::]:8090")
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	c, err := m.A.Dial(netip.AddrPortFrom(m.B.Pod.IP4, 8090))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var written int64
	writerDone := make(chan struct{})
	stopWriting := make(chan struct{})
	go func() {
		defer close(writerDone)
		buf := make([]byte, 64<<10)
		for {
			select {
			case <-stopWriting:
				c.(*net.TCPConn).CloseWrite()
				return
			default:
			}
			c.SetWriteDeadline(time.Now().Add(200 * time.Millisecond))
			n, err := c.Write(buf)
			written += int64(n)
			if err != nil && !os.IsTimeout(err) {
				return
			}
		}
	}()
	app := <-accepted
	defer app.Close()
	heap := func() uint64 {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapInuse
	}
	// The reader stalls for 30 s, as the issue asks, while the writer
	// pushes; the agents' buffers and heap are sampled every 5 s, so a
	// slow leak shows as growth between samples, not only at the end.
	time.Sleep(time.Second)
	h1, b1 := heap(), hbone.BufferedBytes()
	const window = 4 << 20
	hMax, bMax := h1, b1
	for i := 0; i < 6; i++ {
		if i == 5 {
			time.Sleep(4 * time.Second) // 1 + 5×5 + 4 = 30 s
		} else {
			time.Sleep(5 * time.Second)
		}
		h, b := heap(), hbone.BufferedBytes()
		hMax, bMax = max(hMax, h), max(bMax, b)
	}
	t.Logf("stalled reader, 30 s: buffered %d bytes at first, at most %d; heap in use %d KiB at first, at most %d KiB", b1, bMax, h1>>10, hMax>>10)
	if bMax > window {
		t.Errorf("agents buffer %d bytes for one stalled stream, more than its %d window", bMax, window)
	}
	if hMax > h1+8<<20 {
		t.Errorf("heap grew from %d to %d KiB while the reader stalled", h1>>10, hMax>>10)
	}
	close(stopWriting)
	<-writerDone
	n, err := io.Copy(io.Discard, app)
	if err != nil {
		t.Fatal(err)
	}
	if n != written {
		t.Errorf("reader got %d bytes, writer wrote %d", n, written)
	}
	t.Logf("writer pushed %d MiB in total; all arrived", written>>20)
}

// TestReauthorize: a live connection that policy no longer allows is cut
// when the embedder calls Reauthorize; new ones are refused.
func TestReauthorize(t *testing.T) {
	m := newMesh(t)
	c, err := m.A.Dial(netip.AddrPortFrom(m.B.Pod.IP4, 8080))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "echo\nping")
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatal(err)
	}
	m.Auth.Set(func(ci tunnel.ConnInfo) tunnel.Verdict {
		return tunnel.Verdict{Allow: ci.SrcIdentity != m.A.Workload.Identity, Policy: "deny-a"}
	})
	m.B.Proxy.Reauthorize()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Read(buf); err == nil {
		t.Error("connection still open after Reauthorize denied it")
	} else if os.IsTimeout(err) {
		t.Error("connection not cut by Reauthorize")
	}
	waitMetric(t, m.B, "ambit_tunnel_connections_failed_total", map[string]string{"reason": "policy_revoked"}, 1)
	c2, err := m.A.Dial(netip.AddrPortFrom(m.B.Pod.IP4, 8080))
	if err == nil {
		fmt.Fprintf(c2, "who\n")
		b, _ := io.ReadAll(c2)
		c2.Close()
		if len(b) > 0 {
			t.Errorf("denied client got %q", b)
		}
	}
	waitMetric(t, m.A, "ambit_tunnel_connections_failed_total", map[string]string{"direction": "outbound", "reason": "denied"}, 1)
}

// TestDrainOnClose: Close stops new connections at once but lets an
// established one finish within the deadline.
func TestDrainOnClose(t *testing.T) {
	m := newMesh(t)
	c, err := m.A.Dial(netip.AddrPortFrom(m.B.Pod.IP4, 8080))
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(c, "echo\n")
	closed := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		closed <- m.A.Serving.Close(ctx)
	}()
	// New connections from A are refused (its 15001 listener is gone)...
	deadline := time.Now().Add(10 * time.Second)
	for {
		c2, err := m.A.Dial(netip.AddrPortFrom(m.B.Pod.IP4, 8080))
		if err != nil {
			break
		}
		c2.Close()
		if time.Now().After(deadline) {
			t.Fatal("new connections still accepted while draining")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// ...while the established one still works.
	fmt.Fprintf(c, "still-here")
	buf := make([]byte, len("still-here"))
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatalf("established connection broken by drain: %v", err)
	}
	select {
	case err := <-closed:
		t.Fatalf("Close returned (%v) while a connection was still open", err)
	default:
	}
	c.Close()
	select {
	case err := <-closed:
		if err != nil {
			t.Errorf("Close after a clean drain: %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("Close did not return after the last connection ended")
	}
}

// onlyHBONEOnTheWire fails t unless a capture of the link (raw bytes,
// one text line per packet) saw at least 20 packets, every one on the
// HBONE port, and none of the payload markers.
func onlyHBONEOnTheWire(t *testing.T, raw []byte, text string, markers ...string) {
	t.Helper()
	for _, m := range markers {
		if bytes.Contains(raw, []byte(m)) {
			t.Fatalf("plaintext payload %q visible on the wire", m)
		}
	}
	lines := strings.Split(strings.TrimSpace(text), "\n")
	if len(lines) < 20 {
		t.Fatalf("capture saw only %d packets: %q", len(lines), text)
	}
	for _, l := range lines {
		if !strings.Contains(l, ".15008") {
			t.Fatalf("packet not on the HBONE port: %s", l)
		}
	}
	t.Logf("%d packets captured, all on 15008, payload markers absent", len(lines))
}
