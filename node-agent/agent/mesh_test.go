package agent

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"math/big"
	"net/netip"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/cluster"
	"github.com/ambit-mesh/ambit/tunnel"
)

// testCA issues SPIFFE certificates on demand (tunnel.Certificates).
type testCA struct {
	key   *ecdsa.PrivateKey
	cert  *x509.Certificate
	pool  *x509.CertPool
	mu    sync.Mutex
	certs map[string]*tls.Certificate
}

func newTestCA(t testing.TB) *testCA {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test root"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(c)
	return &testCA{key: key, cert: c, pool: pool, certs: map[string]*tls.Certificate{}}
}

func (ca *testCA) Certificate(_ context.Context, id string) (*tls.Certificate, error) {
	ca.mu.Lock()
	defer ca.mu.Unlock()
	if c, ok := ca.certs[id]; ok {
		return c, nil
	}
	u, err := url.Parse(id)
	if err != nil {
		return nil, err
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), URIs: []*url.URL{u},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		return nil, err
	}
	leaf, _ := x509.ParseCertificate(der)
	c := &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
	ca.certs[id] = c
	return c, nil
}

func (ca *testCA) Roots() *x509.CertPool { return ca.pool }
func (ca *testCA) TrustDomain() string   { return "cluster.local" }

// TestMeshThroughRealTunnel: two pods enrolled by this agent, served by
// the real tunnel; the client's request reaches the server's app over
// HBONE (mTLS on 15008), as the tunnel's own metrics show.
func TestMeshThroughRealTunnel(t *testing.T) {
	testenv.RequireRoot(t)
	var proxy *tunnel.Proxy
	reg := prometheus.NewRegistry()
	h := startAgent(t, "", invAmbient, func(o *Options) {
		p, err := tunnel.New(tunnel.Config{Directory: o.View, Certificates: newTestCA(t), Logger: quietLogger(), Registerer: reg})
		if err != nil {
			t.Fatal(err)
		}
		proxy = p
		o.Tunnel = ProxyTunnel{Proxy: p}
	})
	pol := h.a.Policy()
	h.inv.SetMeshed(func(p cluster.Pod, ns *cluster.Namespace) bool { return pol.Decide(p, ns).Enroll })
	client, server := newPair(t, "10.90.0.2", "10.90.0.3")
	enrollLikePlugin(t, h, "client", client, "10.90.0.2/24")
	enrollLikePlugin(t, h, "server", server, "10.90.0.3/24")
	if w, ok := h.inv.WorkloadByIP(netip.MustParseAddr("10.90.0.3")); !ok || !w.Meshed {
		t.Fatalf("server not meshed in the directory: %+v %v", w, ok)
	}

	c, line, err := dialFrom(t, client, "10.90.0.3:8080")
	if err != nil || line != "plain" {
		t.Fatalf("client → server app through the mesh: %q %v", line, err)
	}
	secret := "top-secret-payload-7f3a"
	c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(c, "%s\n", secret)
	got, err := bufio.NewReader(c).ReadString('\n')
	c.Close()
	if err != nil || strings.TrimSpace(got) != secret {
		t.Fatalf("echo through the mesh: %q %v", got, err)
	}
	// It went over HBONE: an outbound hbone connection from the client
	// and an inbound one at the server, both as their SPIFFE identities.
	out := countOpened(t, reg, "outbound", "hbone")
	in := countOpened(t, reg, "inbound", "hbone")
	if out < 1 || in < 1 {
		t.Fatalf("tunnel connections opened: outbound hbone %v, inbound hbone %v", out, in)
	}
	_ = proxy
}

func countOpened(t testing.TB, reg *prometheus.Registry, direction, mode string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var n float64
	for _, mf := range mfs {
		if mf.GetName() != "ambit_tunnel_connections_opened_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			lv := map[string]string{}
			for _, l := range m.GetLabel() {
				lv[l.GetName()] = l.GetValue()
			}
			if lv["direction"] == direction && lv["mode"] == mode {
				n += m.GetCounter().GetValue()
			}
		}
	}
	return n
}
