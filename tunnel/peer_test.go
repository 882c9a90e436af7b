package tunnel

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"net"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// These tests run real TLS 1.3 handshakes on loopback between the
// tunnel's own configs (serverTLS, clientTLS) and peers presenting
// certificates built here, one defect at a time. No network namespace is
// needed: the check under test is the handshake.

const (
	tdLocal  = "cluster.local"
	idClient = "spiffe://cluster.local/ns/a/sa/client"
	idServer = "spiffe://cluster.local/ns/b/sa/server"
)

// issuer is a certificate with its key, able to sign others.
type issuer struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

var serialN atomic.Int64

// mint signs tmpl with parent (self-signed when parent is nil), filling
// in what every certificate needs.
func mint(t testing.TB, tmpl *x509.Certificate, parent *issuer) *issuer {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl.SerialNumber = big.NewInt(serialN.Add(1))
	if tmpl.NotBefore.IsZero() {
		tmpl.NotBefore = time.Now().Add(-time.Hour)
	}
	if tmpl.NotAfter.IsZero() {
		tmpl.NotAfter = time.Now().Add(time.Hour)
	}
	signer, signKey := tmpl, key
	if parent != nil {
		signer, signKey = parent.cert, parent.key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, signer, &key.PublicKey, signKey)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &issuer{cert: c, key: key}
}

func caTmpl(name string) *x509.Certificate {
	return &x509.Certificate{Subject: pkix.Name{CommonName: name}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign}
}

func mustURL(t testing.TB, s string) *url.URL {
	t.Helper()
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// leafTmpl is a workload certificate as the CA issues it.
func leafTmpl(t testing.TB, ids ...string) *x509.Certificate {
	tmpl := &x509.Certificate{KeyUsage: x509.KeyUsageDigitalSignature, BasicConstraintsValid: true,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	for _, id := range ids {
		tmpl.URIs = append(tmpl.URIs, mustURL(t, id))
	}
	return tmpl
}

// chain is a tls.Certificate of leaf followed by intermediates.
func chain(leaf *issuer, inter ...*issuer) *tls.Certificate {
	tc := &tls.Certificate{Certificate: [][]byte{leaf.cert.Raw}, PrivateKey: leaf.key, Leaf: leaf.cert}
	for _, c := range inter {
		tc.Certificate = append(tc.Certificate, c.cert.Raw)
	}
	return tc
}

// testCerts is a tunnel Certificates whose bundle can be swapped, as the
// identity manager's is during a root rotation.
type testCerts struct {
	mu    sync.Mutex
	certs map[string]*tls.Certificate
	roots atomic.Pointer[x509.CertPool]
}

func newTestCerts(roots ...*x509.Certificate) *testCerts {
	c := &testCerts{certs: map[string]*tls.Certificate{}}
	c.setRoots(roots...)
	return c
}

func (c *testCerts) setRoots(roots ...*x509.Certificate) {
	p := x509.NewCertPool()
	for _, r := range roots {
		p.AddCert(r)
	}
	c.roots.Store(p)
}

func (c *testCerts) set(id string, tc *tls.Certificate) {
	c.mu.Lock()
	c.certs[id] = tc
	c.mu.Unlock()
}

func (c *testCerts) Certificate(_ context.Context, id string) (*tls.Certificate, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if tc, ok := c.certs[id]; ok {
		return tc, nil
	}
	return nil, errors.New("no certificate for " + id)
}
func (c *testCerts) Roots() *x509.CertPool { return c.roots.Load() }
func (c *testCerts) TrustDomain() string   { return tdLocal }

// handshake runs one TLS handshake over a loopback TCP connection and
// returns both sides' errors.
func handshake(t *testing.T, client, server *tls.Config) (clientErr, serverErr error, cs tls.ConnectionState) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return handshakeOn(t, ln, client, server)
}

// handshakeOn is handshake on a given listener (the same address twice
// is what lets a client resume).
func handshakeOn(t *testing.T, ln net.Listener, client, server *tls.Config) (clientErr, serverErr error, cs tls.ConnectionState) {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- err
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		tc := tls.Server(c, server)
		err = tc.Handshake()
		if err == nil {
			// TLS 1.3: the client's certificate is checked after the
			// client's handshake returned; read once so a refusal
			// reaches the client too.
			_, _ = tc.Write([]byte{1})
		}
		done <- err
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	tc := tls.Client(c, client)
	clientErr = tc.Handshake()
	if clientErr == nil {
		var b [1]byte
		_, clientErr = tc.Read(b[:])
		cs = tc.ConnectionState()
	}
	serverErr = <-done
	return clientErr, serverErr, cs
}

// peerReason is the PeerError reason in err, or "" if there is none.
func peerReason(err error) string {
	var pe *PeerError
	if errors.As(err, &pe) {
		return pe.Reason
	}
	return ""
}

// TestPeerCertificateChecks presents each defective certificate to our
// server (as a client) and to our client (as the server it dials for
// the certificate's first identity), over real TLS 1.3. The valid cases
// are the control: they must pass both ways, so a refusal is the check
// and not a broken harness.
func TestPeerCertificateChecks(t *testing.T) {
	root := mint(t, caTmpl("root"), nil)
	inter := mint(t, caTmpl("intermediate"), root)
	notCA := mint(t, &x509.Certificate{Subject: pkix.Name{CommonName: "not a CA"}, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign}, root)
	noBC := mint(t, &x509.Certificate{Subject: pkix.Name{CommonName: "no basic constraints"},
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign}, root)
	expiredInter := mint(t, func() *x509.Certificate {
		c := caTmpl("expired intermediate")
		c.NotBefore, c.NotAfter = time.Now().Add(-2*time.Hour), time.Now().Add(-time.Hour)
		return c
	}(), root)
	foreignRoot := mint(t, caTmpl("foreign root"), nil)

	// The peer's identity for each side: B serves, A connects.
	leaf := func(parent *issuer, mod func(*x509.Certificate), ids ...string) *issuer {
		tmpl := leafTmpl(t, ids...)
		if mod != nil {
			mod(tmpl)
		}
		return mint(t, tmpl, parent)
	}
	caLeaf := func(c *x509.Certificate) {
		c.IsCA = true
		c.KeyUsage |= x509.KeyUsageCertSign
	}
	// A workload certificate that is itself a CA could sign any
	// identity in the trust domain with its own key.
	rogueCA := leaf(root, caLeaf, idServer)

	type peer struct {
		cert *tls.Certificate
		want string // "" = accepted, else the refusal reason
	}
	cases := []struct {
		name string
		// asClient is presented to our server, asServer to our client
		// (which expects idServer). nil: not applicable that way.
		asClient, asServer *peer
	}{
		{"valid, root-signed",
			&peer{chain(leaf(root, nil, idClient)), ""},
			&peer{chain(leaf(root, nil, idServer)), ""}},
		{"valid, via an intermediate",
			&peer{chain(leaf(inter, nil, idClient), inter), ""},
			&peer{chain(leaf(inter, nil, idServer), inter), ""}},
		{"foreign root",
			&peer{chain(leaf(foreignRoot, nil, idClient)), "untrusted"},
			&peer{chain(leaf(foreignRoot, nil, idServer)), "untrusted"}},
		{"intermediate marked CA:false",
			&peer{chain(leaf(notCA, nil, idClient), notCA), "untrusted"},
			&peer{chain(leaf(notCA, nil, idServer), notCA), "untrusted"}},
		{"intermediate without basic constraints",
			&peer{chain(leaf(noBC, nil, idClient), noBC), "untrusted"},
			&peer{chain(leaf(noBC, nil, idServer), noBC), "untrusted"}},
		{"expired intermediate",
			&peer{chain(leaf(expiredInter, nil, idClient), expiredInter), "expired"},
			&peer{chain(leaf(expiredInter, nil, idServer), expiredInter), "expired"}},
		{"expired leaf",
			&peer{chain(leaf(root, func(c *x509.Certificate) { c.NotAfter = time.Now().Add(-time.Minute) }, idClient)), "expired"},
			&peer{chain(leaf(root, func(c *x509.Certificate) { c.NotAfter = time.Now().Add(-time.Minute) }, idServer)), "expired"}},
		{"leaf not yet valid",
			&peer{chain(leaf(root, func(c *x509.Certificate) { c.NotBefore = time.Now().Add(time.Hour) }, idClient)), "expired"},
			&peer{chain(leaf(root, func(c *x509.Certificate) { c.NotBefore = time.Now().Add(time.Hour) }, idServer)), "expired"}},
		{"wrong extended key usage",
			&peer{chain(leaf(root, func(c *x509.Certificate) { c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth} }, idClient)), "untrusted"},
			&peer{chain(leaf(root, func(c *x509.Certificate) { c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth} }, idServer)), "untrusted"}},
		{"leaf with CA:true",
			&peer{chain(leaf(root, caLeaf, idClient)), "untrusted"},
			&peer{chain(rogueCA), "untrusted"}},
		{"leaf with keyCertSign but CA:false",
			&peer{chain(leaf(root, func(c *x509.Certificate) { c.KeyUsage |= x509.KeyUsageCertSign }, idClient)), "untrusted"},
			&peer{chain(leaf(root, func(c *x509.Certificate) { c.KeyUsage |= x509.KeyUsageCertSign }, idServer)), "untrusted"}},
		{"two URI SANs",
			&peer{chain(leaf(root, nil, idClient, idServer)), "bad_identity"},
			&peer{chain(leaf(root, nil, idServer, idClient)), "bad_identity"}},
		{"another URI SAN before the SPIFFE ID",
			&peer{chain(leaf(root, nil, "https://example.com/", idClient)), "bad_identity"},
			&peer{chain(leaf(root, nil, "https://example.com/", idServer)), "bad_identity"}},
		{"foreign trust domain",
			&peer{chain(leaf(root, nil, "spiffe://evil.example/ns/a/sa/client")), "foreign_trust_domain"},
			&peer{chain(leaf(root, nil, "spiffe://evil.example/ns/b/sa/server")), "foreign_trust_domain"}},
		{"wrong identity", nil,
			&peer{chain(leaf(root, nil, "spiffe://cluster.local/ns/b/sa/other")), "wrong_identity"}},
		// Not of the form spiffe://<td>/ns/<ns>/sa/<sa>: policy reads
		// the namespace and service account out of the ID, so each
		// of these would be taken for ns "prod" or sa "admin".
		{"extra path before ns", &peer{chain(leaf(root, nil, "spiffe://cluster.local/x/ns/prod/sa/admin")), "bad_identity"}, nil},
		{"extra path after sa", &peer{chain(leaf(root, nil, "spiffe://cluster.local/ns/prod/sa/admin/x")), "bad_identity"}, nil},
		{"no sa", &peer{chain(leaf(root, nil, "spiffe://cluster.local/ns/prod")), "bad_identity"}, nil},
		{"empty namespace", &peer{chain(leaf(root, nil, "spiffe://cluster.local/ns//sa/admin")), "bad_identity"}, nil},
		{"query", &peer{chain(leaf(root, nil, "spiffe://cluster.local/ns/prod/sa/admin?x=1")), "bad_identity"}, nil},
		{"fragment", &peer{chain(leaf(root, nil, "spiffe://cluster.local/ns/prod/sa/admin#x")), "bad_identity"}, nil},
		{"escaped path", &peer{chain(leaf(root, nil, "spiffe://cluster.local/ns/prod/sa/%61dmin")), "bad_identity"}, nil},
		{"port", &peer{chain(leaf(root, nil, "spiffe://cluster.local:80/ns/prod/sa/admin")), "bad_identity"}, nil},
		{"user info", &peer{chain(leaf(root, nil, "spiffe://u@cluster.local/ns/prod/sa/admin")), "bad_identity"}, nil},
		{"upper-case name", &peer{chain(leaf(root, nil, "spiffe://cluster.local/ns/Prod/sa/admin")), "bad_identity"}, nil},
	}

	certs := newTestCerts(root.cert)
	certs.set(idServer, chain(leaf(root, nil, idServer)))
	certs.set(idClient, chain(leaf(root, nil, idClient)))
	p := &Proxy{cfg: Config{Certificates: certs}}
	plain := func(c *tls.Certificate) *tls.Config {
		cfg := &tls.Config{MinVersion: tls.VersionTLS13, NextProtos: []string{"h2"}, InsecureSkipVerify: true}
		if c != nil {
			cfg.Certificates = []tls.Certificate{*c}
		}
		return cfg
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if pc := tc.asClient; pc != nil {
				_, serr, _ := handshake(t, plain(pc.cert), p.serverTLS(idServer, &peerState{}))
				if got := peerReason(serr); got != pc.want || (pc.want == "" && serr != nil) {
					t.Errorf("our server: err %v (reason %q), want reason %q", serr, got, pc.want)
				}
			}
			if ps := tc.asServer; ps != nil {
				cerr, _, _ := handshake(t, p.clientTLS(idClient, idServer, &peerState{}), plain(ps.cert))
				if got := peerReason(cerr); got != ps.want || (ps.want == "" && cerr != nil) {
					t.Errorf("our client: err %v (reason %q), want reason %q", cerr, got, ps.want)
				}
			}
		})
	}
}

// TestNoSessionResumption: neither our server nor our client resumes a
// TLS session. crypto/tls does not call VerifyPeerCertificate on a
// resumed handshake, so a resumed peer would skip the identity checks
// and keep a certificate the current trust bundle no longer accepts.
// The controls show that the same peer resumes with a plain Go
// configuration, so "did not resume" is our configuration's doing.
func TestNoSessionResumption(t *testing.T) {
	root := mint(t, caTmpl("root"), nil)
	certs := newTestCerts(root.cert)
	certs.set(idServer, chain(mint(t, leafTmpl(t, idServer), root)))
	certs.set(idClient, chain(mint(t, leafTmpl(t, idClient), root)))
	p := &Proxy{cfg: Config{Certificates: certs}}
	clientCert, _ := certs.Certificate(context.Background(), idClient)
	serverCert, _ := certs.Certificate(context.Background(), idServer)

	twice := func(t *testing.T, client func() *tls.Config, server *tls.Config) bool {
		t.Helper()
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		var resumed bool
		for i := 0; i < 2; i++ {
			cerr, serr, cs := handshakeOn(t, ln, client(), server)
			if cerr != nil || serr != nil {
				t.Fatalf("handshake %d: client %v, server %v", i, cerr, serr)
			}
			resumed = cs.DidResume
		}
		return resumed
	}
	// A client that asks to resume, against our server and a plain one.
	cache := tls.NewLRUClientSessionCache(4)
	resumingClient := func() *tls.Config {
		return &tls.Config{MinVersion: tls.VersionTLS13, NextProtos: []string{"h2"}, InsecureSkipVerify: true,
			ServerName: "peer", ClientSessionCache: cache, Certificates: []tls.Certificate{*clientCert}}
	}
	plainServer := &tls.Config{MinVersion: tls.VersionTLS13, NextProtos: []string{"h2"},
		Certificates: []tls.Certificate{*serverCert}, ClientAuth: tls.RequireAnyClientCert}
	t.Run("control: plain server resumes", func(t *testing.T) {
		if !twice(t, resumingClient, plainServer) {
			t.Fatal("a plain server did not resume: the harness cannot see resumption")
		}
	})
	t.Run("our server", func(t *testing.T) {
		if twice(t, resumingClient, p.serverTLS(idServer, &peerState{})) {
			t.Error("our server resumed a session")
		}
	})
	t.Run("our client", func(t *testing.T) {
		// ServerName would key a session cache; ours has none to use.
		if twice(t, func() *tls.Config { return p.clientTLS(idClient, idServer, &peerState{}) }, plainServer) {
			t.Error("our client resumed a session")
		}
	})
}

// TestStatusReason: a bare 401 (a policy denial, and all a spec-following
// peer such as ztunnel sends) is "denied"; our certificate refusal says
// so in refusedHeader; a value we do not know never becomes a label.
func TestStatusReason(t *testing.T) {
	for _, c := range []struct {
		st   int
		why  string
		want string
	}{
		{401, "", "denied"},
		{403, "", "denied"},
		{403, "tls_expired", "denied"},
		{401, "tls_expired", "tls_refused_expired"},
		{401, "tls_untrusted", "tls_refused_untrusted"},
		{401, "anything\nelse", "tls_refused"},
		{503, "tls_untrusted", "upstream_unavailable"},
		{400, "", "bad_request"},
		{502, "", "status_502"},
	} {
		if got := statusReason(c.st, c.why); got != c.want {
			t.Errorf("statusReason(%d, %q) = %q, want %q", c.st, c.why, got, c.want)
		}
	}
}
