package tunnel_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testca"
	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/tunnel"
	"github.com/ambit-mesh/ambit/tunnel/hbone"
	"github.com/ambit-mesh/ambit/tunnel/internal/meshtest"
)

// A pooled HBONE connection outlives the handshake that checked its
// peer. These tests change what the handshake relied on (the trust
// bundle, the certificates' validity) while such a connection is open,
// and require that new streams no longer use it.

// reaches says whether A's app gets an answer from B's app.
func reaches(t *testing.T, m *meshtest.Mesh) bool {
	t.Helper()
	return reachesAt(m, m.B.Pod.IP4)
}

// reachesAt says whether A's app gets an answer from B's app at dst
// (one of B's addresses), within 5 s.
func reachesAt(m *meshtest.Mesh, dst netip.Addr) bool {
	c, err := m.A.Dial(netip.AddrPortFrom(dst, 8080))
	if err != nil {
		return false
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, "who\n"); err != nil {
		return false
	}
	b, _ := io.ReadAll(c)
	return len(b) > 0
}

// holdToB opens an HBONE connection from A's netns to B's 15008 with
// cert (a raw client of B's that keeps it across a change), and returns
// it with a function that opens one stream on it and gives B's answer
// (-1 when there was none).
func holdToB(t *testing.T, m *meshtest.Mesh, cert *tls.Certificate) (*hbone.Conn, func() int) {
	t.Helper()
	raw, err := m.A.Net.Dial(context.Background(), netip.Addr{}, netip.AddrPortFrom(m.B.Pod.IP4, 15008))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	held, err := hbone.Client(ctx, raw, &tls.Config{MinVersion: tls.VersionTLS13, NextProtos: []string{"h2"},
		InsecureSkipVerify: true, Certificates: []tls.Certificate{*cert}}, hbone.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { held.Close() })
	return held, func() int {
		s, err := held.OpenStream(netip.AddrPortFrom(m.B.Pod.IP4, 8080).String(), nil)
		if err != nil {
			return -1
		}
		defer s.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		st, _, err := s.Response(ctx)
		if err != nil {
			return -1
		}
		return st
	}
}

// TestRemovedRootStopsPooledConnections: A reaches B over a pooled
// connection; the root both certificates chain to is removed from the
// bundle; A's next connection must not ride the pooled one (B is no
// longer trusted), and B must refuse a new stream on a connection made
// before (A is no longer trusted either).
func TestRemovedRootStopsPooledConnections(t *testing.T) {
	m := newMesh(t)
	cert, err := m.Certs.Certificate(context.Background(), m.A.Workload.Identity)
	if err != nil {
		t.Fatal(err)
	}
	held, stream := holdToB(t, m, cert)
	if st := stream(); st != 200 {
		t.Fatalf("before the change: B answered %d", st)
	}
	if !reaches(t, m) {
		t.Fatal("before the change: A does not reach B")
	}
	other, err := testca.New("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	m.Certs.SetRoots(other.Cert)

	if reaches(t, m) {
		t.Error("A reached B over a connection whose peer the bundle no longer trusts")
	}
	waitMetric(t, m.A, "ambit_tunnel_connections_failed_total", map[string]string{"direction": "outbound", "reason": "tls_untrusted"}, 1)
	if st := stream(); st == 200 {
		t.Error("B opened a new stream for a client the bundle no longer trusts")
	}
	waitMetric(t, m.B, "ambit_tunnel_connections_failed_total", map[string]string{"direction": "inbound", "reason": "tls_untrusted"}, 1)
	// And B sends the client away (GOAWAY), so a client that has a
	// certificate the bundle trusts dials again rather than have every
	// stream refused on the connection it pooled.
	select {
	case <-held.Done():
	case <-time.After(5 * time.Second):
		t.Error("B kept the connection of a client it no longer trusts")
	}
}

// TestExpiredCertificateStopsPooledConnections: B's certificate expires
// while A holds a pooled connection to it: A's next connection must not
// use that one. And a client whose own certificate expires on a held
// connection gets no new stream from B.
func TestExpiredCertificateStopsPooledConnections(t *testing.T) {
	m := newMesh(t)
	const life = 3 * time.Second
	short := func(id string) *tls.Certificate {
		c, err := m.CA.Issue(id, testca.IssueOptions{NotAfter: time.Now().Add(life)})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	m.Certs.Set(m.B.Workload.Identity, short(m.B.Workload.Identity))
	_, stream := holdToB(t, m, short(m.A.Workload.Identity))
	if st := stream(); st != 200 {
		t.Fatalf("before expiry: B answered %d", st)
	}
	if !reaches(t, m) {
		t.Fatal("before expiry: A does not reach B")
	}
	time.Sleep(life + 500*time.Millisecond)

	if reaches(t, m) {
		t.Error("A reached B over a connection whose peer's certificate has expired")
	}
	waitMetric(t, m.A, "ambit_tunnel_connections_failed_total", map[string]string{"direction": "outbound", "reason": "tls_expired"}, 1)
	if st := stream(); st == 200 {
		t.Error("B opened a new stream for a client whose certificate has expired")
	}
}

// ownBundle is one node's view of the mesh's store, with a bundle of its
// own: that node's agent got a new bundle before the other's did.
type ownBundle struct {
	*testca.Store
	mu    sync.Mutex
	roots *x509.CertPool
}

func (o *ownBundle) Roots() *x509.CertPool {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.roots != nil {
		return o.roots
	}
	return o.Store.Roots()
}

func (o *ownBundle) SetRoots(roots ...*x509.Certificate) {
	p := x509.NewCertPool()
	for _, r := range roots {
		p.AddCert(r)
	}
	o.mu.Lock()
	o.roots = p
	o.mu.Unlock()
}

// TestCertificateRefusalCountedAsSuch: B's bundle (only B's: the new
// bundle reached B's node first) drops the root of A's certificate while
// A holds a pooled connection to B. A still trusts B and opens a stream
// on it; B refuses it (401) because of A's certificate. A must count
// that as a certificate refusal, not as a policy denial (B counts
// tls_untrusted; HBONE's bare 401 is what a policy denial answers).
func TestCertificateRefusalCountedAsSuch(t *testing.T) {
	testenv.RequireRoot(t)
	bb := &ownBundle{}
	m := meshtest.New(t, meshtest.Options{CertificatesB: func(s *testca.Store) tunnel.Certificates {
		bb.Store = s
		return bb
	}})
	go peerEcho(m.B.Listen(t, "[::]:8080"))
	if !reaches(t, m) {
		t.Fatal("before the change: A does not reach B")
	}
	other, err := testca.New("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	bb.SetRoots(other.Cert)

	if reaches(t, m) {
		t.Error("A reached B, whose bundle no longer trusts A")
	}
	waitMetric(t, m.B, "ambit_tunnel_connections_failed_total", map[string]string{"direction": "inbound", "reason": "tls_untrusted"}, 1)
	waitMetric(t, m.A, "ambit_tunnel_connections_failed_total", map[string]string{"direction": "outbound", "reason": "tls_refused_untrusted"}, 1)
	if n := m.A.Metric(t, "ambit_tunnel_connections_failed_total", map[string]string{"direction": "outbound", "reason": "denied"}); n != 0 {
		t.Errorf("A counted %v certificate refusals as policy denials", n)
	}
}

// TestRemovedOwnRootFailsNoStream: A's certificate is under a second
// root, B's under the first; the bundle drops the second while A holds a
// pooled connection to B, and A's certificate is renewed under the first
// (as the identity manager does when the bundle drops the root of a
// certificate it holds). A still trusts B, so only A's own certificate
// tells it that B will refuse new streams on that connection: none of
// A's app connections may fail (before, the first ones got B's 401 until
// its GOAWAY came back).
func TestRemovedOwnRootFailsNoStream(t *testing.T) {
	m := newMesh(t)
	second, err := testca.New("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	m.Certs.SetRoots(m.CA.Cert, second.Cert)
	underSecond, err := second.Issue(m.A.Workload.Identity, testca.IssueOptions{})
	if err != nil {
		t.Fatal(err)
	}
	m.Certs.Set(m.A.Workload.Identity, underSecond)
	dsts := []netip.Addr{m.B.Pod.IP4, m.B.Pod.IP6} // two pooled connections
	for _, dst := range dsts {
		if !reachesAt(m, dst) {
			t.Fatalf("before the change: A does not reach B at %v", dst)
		}
	}
	renewed, err := m.CA.Issue(m.A.Workload.Identity, testca.IssueOptions{})
	if err != nil {
		t.Fatal(err)
	}
	m.Certs.Set(m.A.Workload.Identity, renewed)
	m.Certs.SetRoots(m.CA.Cert)

	failed := 0
	for i := range 20 {
		if !reachesAt(m, dsts[i%2]) {
			failed++
		}
	}
	if failed > 0 {
		t.Errorf("%d of 20 of A's connections failed after the bundle dropped the root of A's certificate", failed)
	}
	if n := m.B.Metric(t, "ambit_tunnel_connections_failed_total", map[string]string{"direction": "inbound", "reason": "tls_untrusted"}); n != 0 {
		t.Errorf("B refused %v streams of A's old certificate", n)
	}
}
