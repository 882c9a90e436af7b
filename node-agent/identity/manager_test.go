package identity_test

import (
	"context"

	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"errors"
	"github.com/prometheus/client_golang/prometheus"
	"os"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/ca"
	"github.com/ambit-mesh/ambit/node-agent/identity"
)

const (
	webID = "spiffe://cluster.local/ns/shop/sa/web"
	dbID  = "spiffe://cluster.local/ns/shop/sa/db"
)

func TestPrefetchAndShape(t *testing.T) {
	e := newCA(t, "node-1", "node-2")
	e.cluster.AddPod(t, "shop", "web-1", "web", "node-1")
	e.cluster.AddPod(t, "shop", "db-1", "db", "node-2")
	m := e.agent(t, "node-1", time.Hour, nil)
	if m.TrustDomain() != td {
		t.Fatal(m.TrustDomain())
	}
	if err := m.Prefetch(webID); err != nil {
		t.Fatal(err)
	}
	if err := m.Prefetch("spiffe://cluster.local/ns/shop"); err == nil {
		t.Fatal("malformed identity accepted by Prefetch")
	}
	if err := m.Prefetch("spiffe://other.domain/ns/shop/sa/web"); err == nil {
		t.Fatal("foreign trust domain accepted by Prefetch")
	}
	c, err := m.Certificate(context.Background(), webID)
	if err != nil {
		t.Fatal(err)
	}
	if k, ok := c.PrivateKey.(*ecdsa.PrivateKey); !ok || k.Curve != elliptic.P256() {
		t.Fatalf("key %T, want ECDSA P-256", c.PrivateKey)
	}
	if _, err := peerID(c.Certificate, m.Roots(), x509.ExtKeyUsageClientAuth); err != nil {
		t.Fatalf("own certificate does not verify with own roots: %v", err)
	}
	if _, err := peerID(c.Certificate, m.Roots(), x509.ExtKeyUsageServerAuth); err != nil {
		t.Fatalf("not usable as server: %v", err)
	}
	// Cached: the same certificate until rotation.
	if c2, _ := m.Certificate(context.Background(), webID); c2 != c {
		t.Fatal("second call fetched again")
	}
	// A workload of node-2: the CA refuses node-1, the manager says why.
	_, err = m.Certificate(context.Background(), dbID)
	var ce *identity.CAError
	if !errors.As(err, &ce) || ce.Reason != ca.ReasonNotOnNode || ce.Status != 403 {
		t.Fatalf("db from node-1: %v", err)
	}
	m.Forget(webID)
}

// Real mTLS through a loop of connections while certificates of 2 s live
// through several rotations: no handshake fails.
func TestRotationUnderTraffic(t *testing.T) {
	e := newCA(t, "node-1", "node-2")
	e.cluster.AddPod(t, "shop", "web-1", "web", "node-1")
	e.cluster.AddPod(t, "shop", "db-1", "db", "node-2")
	client := e.agent(t, "node-1", 2*time.Second, nil)
	server := e.agent(t, "node-2", 2*time.Second, nil)
	if err := client.Prefetch(webID); err != nil {
		t.Fatal(err)
	}
	if err := server.Prefetch(dbID); err != nil {
		t.Fatal(err)
	}
	addr := mtlsServer(t, server, dbID)
	stop := make(chan struct{})
	tr := runTraffic(client, addr, webID, dbID, stop)
	time.Sleep(5 * time.Second) // about four rotations of each certificate
	close(stop)
	if n := tr.check(t); n < 3 {
		t.Fatalf("client used %d certificates in 5 s of 2 s certificates: rotation did not happen", n)
	}
	t.Logf("%d connections, %d client certificates", tr.ok.Load(), len(tr.serials))
}

// The CA goes away for longer than a rotation interval but less than the
// certificate's remaining life: traffic does not notice, and the manager
// rotates once the CA is back.
func TestCAOutageInvisible(t *testing.T) {
	e := newCA(t, "node-1", "node-2")
	e.cluster.AddPod(t, "shop", "web-1", "web", "node-1")
	e.cluster.AddPod(t, "shop", "db-1", "db", "node-2")
	const ttl = 4 * time.Second
	reg := prometheus.NewRegistry()
	client := e.agent(t, "node-1", ttl, func(c *identity.Config) { c.Registerer = reg })
	server := e.agent(t, "node-2", ttl, nil)
	_ = client.Prefetch(webID)
	_ = server.Prefetch(dbID)
	c0, err := client.Certificate(context.Background(), webID)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := server.Certificate(context.Background(), dbID); err != nil {
		t.Fatal(err)
	}
	addr := mtlsServer(t, server, dbID)
	stop := make(chan struct{})
	tr := runTraffic(client, addr, webID, dbID, stop)

	e.https.Stop()
	// Rotation falls due at about 1.6-2 s; stay down past it.
	time.Sleep(2500 * time.Millisecond)
	if time.Now().After(c0.Leaf.NotAfter) {
		t.Fatal("test machine too slow: the outage outlived the certificate")
	}
	if c, _ := client.Certificate(context.Background(), webID); c != c0 {
		t.Fatal("certificate changed while the CA was down")
	}
	if n := fetches(t, reg, "error"); n == 0 {
		t.Fatal("no failed fetch during the outage: the rotation never ran into it")
	}
	if err := e.https.Restart(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "rotation after the CA came back", func() bool {
		c, err := client.Certificate(context.Background(), webID)
		return err == nil && c != c0
	})
	close(stop)
	tr.check(t)
}

// Root rotation with overlap: bundle A → A+B (still signing with A) →
// signing with B → bundle B only. Connections never fail; at the end a
// certificate under the retired root A is refused.
func TestRootRotationNoFailedHandshake(t *testing.T) {
	e := newCA(t, "node-1", "node-2")
	e.cluster.AddPod(t, "shop", "web-1", "web", "node-1")
	e.cluster.AddPod(t, "shop", "db-1", "db", "node-2")
	fast := func(c *identity.Config) { c.RootsRefresh = 200 * time.Millisecond }
	client := e.agent(t, "node-1", 2*time.Second, fast)
	server := e.agent(t, "node-2", 2*time.Second, fast)
	_ = client.Prefetch(webID)
	_ = server.Prefetch(dbID)
	old, err := client.Certificate(context.Background(), webID)
	if err != nil {
		t.Fatal(err)
	}
	addr := mtlsServer(t, server, dbID)
	stop := make(chan struct{})
	tr := runTraffic(client, addr, webID, dbID, stop)

	a := e.auth.Material()
	b, err := ca.GenerateRoot(td, 30*24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	both := []*x509.Certificate{a.Cert, b.Cert}
	bundle := func(m *identity.Manager) []string {
		var s []string
		for _, c := range m.RootCertificates() {
			s = append(s, c.Subject.CommonName)
		}
		sort.Strings(s)
		return s
	}
	hasRoots := func(want ...*x509.Certificate) func() bool {
		var names []string
		for _, c := range want {
			names = append(names, c.Subject.CommonName)
		}
		sort.Strings(names)
		return func() bool {
			for _, m := range []*identity.Manager{client, server} {
				got := bundle(m)
				if len(got) != len(names) {
					return false
				}
				for i := range got {
					if got[i] != names[i] {
						return false
					}
				}
			}
			return true
		}
	}
	signedBy := func(root *x509.Certificate) func() bool {
		return func() bool {
			for _, p := range []struct {
				m  *identity.Manager
				id string
			}{{client, webID}, {server, dbID}} {
				c, err := p.m.Certificate(context.Background(), p.id)
				if err != nil || c.Leaf.CheckSignatureFrom(root) != nil {
					return false
				}
			}
			return true
		}
	}
	// 1. Distribute B next to A; A still signs.
	if err := e.auth.Update(&ca.Material{Cert: a.Cert, Key: a.Key, Roots: both}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "both agents trusting A and B", hasRoots(a.Cert, b.Cert))
	// 2. B signs; A stays trusted while its certificates live.
	if err := e.auth.Update(&ca.Material{Cert: b.Cert, Key: b.Key, Roots: both}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "all certificates issued under B", signedBy(b.Cert))
	// 3. Retire A (after every A certificate expired: TTL 2 s).
	time.Sleep(2 * time.Second)
	if err := e.auth.Update(&ca.Material{Cert: b.Cert, Key: b.Key, Roots: []*x509.Certificate{b.Cert}}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "both agents trusting B only", hasRoots(b.Cert))
	time.Sleep(500 * time.Millisecond)
	close(stop)
	tr.check(t)
	if _, err := peerID(old.Certificate, server.Roots(), x509.ExtKeyUsageClientAuth); err == nil {
		t.Fatal("a certificate under the retired root is still accepted")
	}
}

// A root removed from the bundle at once (a compromise: no overlap, its
// certificates still valid for an hour): as soon as an agent has the new
// bundle, the certificates it hands out chain to it, rather than the old
// ones until their rotation at half-life, which every peer with the new
// bundle refuses.
func TestRemovedRootRenewsCertificates(t *testing.T) {
	e := newCA(t, "node-1", "node-2")
	e.cluster.AddPod(t, "shop", "web-1", "web", "node-1")
	e.cluster.AddPod(t, "shop", "db-1", "db", "node-2")
	fast := func(c *identity.Config) { c.RootsRefresh = 200 * time.Millisecond }
	client := e.agent(t, "node-1", time.Hour, fast)
	server := e.agent(t, "node-2", time.Hour, fast)
	_ = client.Prefetch(webID)
	_ = server.Prefetch(dbID)
	addr := mtlsServer(t, server, dbID)
	if _, err := dial(client, addr, webID, dbID); err != nil {
		t.Fatalf("before the change: %v", err)
	}
	b, err := ca.GenerateRoot(td, 30*24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.auth.Update(&ca.Material{Cert: b.Cert, Key: b.Key, Roots: []*x509.Certificate{b.Cert}}); err != nil {
		t.Fatal(err)
	}
	for _, p := range []struct {
		m  *identity.Manager
		id string
	}{{client, webID}, {server, dbID}} {
		waitFor(t, 10*time.Second, p.id+"'s agent trusting the new root only", func() bool {
			r := p.m.RootCertificates()
			return len(r) == 1 && r[0].Equal(b.Cert)
		})
		// At once: no window in which the old certificate is handed out.
		c, err := p.m.Certificate(context.Background(), p.id)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Leaf.CheckSignatureFrom(b.Cert); err != nil {
			t.Errorf("%s: certificate handed out after the bundle dropped its root is not under the new root (issued %s)", p.id, c.Leaf.NotBefore)
		}
	}
	if _, err := dial(client, addr, webID, dbID); err != nil {
		t.Errorf("after the change: %v", err)
	}
}

// Static mode: the CA lives in the state directory; no private key of a
// workload ever reaches the disk.
func TestLocalMode(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	m, err := identity.NewManager(identity.Config{TrustDomain: td, LocalCADir: dir, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Prefetch(webID); err != nil {
		t.Fatal(err)
	}
	_ = m.Prefetch(dbID)
	addr := mtlsServer(t, m, dbID)
	if _, err := dial(m, addr, webID, dbID); err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir(dir)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	sort.Strings(names)
	if len(names) != 3 || names[0] != ".lock" || names[1] != "ca.crt" || names[2] != "ca.key" {
		t.Fatalf("state dir holds %v", names)
	}
	// A second agent start reuses the same root: certificates issued
	// before the restart stay valid for peers.
	m2, err := identity.NewManager(identity.Config{TrustDomain: td, LocalCADir: dir})
	if err != nil {
		t.Fatal(err)
	}
	c, _ := m.Certificate(context.Background(), webID)
	if _, err := peerID(c.Certificate, m2.Roots(), x509.ExtKeyUsageClientAuth); err != nil {
		t.Fatalf("restart changed the root: %v", err)
	}
}

func TestConfigErrors(t *testing.T) {
	for name, cfg := range map[string]identity.Config{
		"no CA":       {},
		"two CAs":     {LocalCADir: t.TempDir(), Remote: &identity.RemoteConfig{URL: "https://x", Token: func() (string, error) { return "", nil }}},
		"bad domain":  {TrustDomain: "Bad Domain", LocalCADir: t.TempDir()},
		"http url":    {Remote: &identity.RemoteConfig{URL: "http://x", TokenFile: "/t"}},
		"no ca roots": {Remote: &identity.RemoteConfig{URL: "https://x", TokenFile: "/t"}},
		"tiny ttl":    {LocalCADir: t.TempDir(), TTL: time.Millisecond},
	} {
		if _, err := identity.NewManager(cfg); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func fetches(t *testing.T, g prometheus.Gatherer, result string) float64 {
	t.Helper()
	return testenv.Metric(t, g, "ambit_identity_certificate_fetches_total", map[string]string{"result": result})
}
