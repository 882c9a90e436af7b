package identity_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambit-mesh/ambit/node-agent/ca"
	"github.com/ambit-mesh/ambit/node-agent/ca/catest"
	"github.com/ambit-mesh/ambit/node-agent/identity"
)

const td = "cluster.local"

// caEnv is a real HTTPS CA with the Kubernetes authorizer over a fake API.
type caEnv struct {
	cluster *catest.Cluster
	auth    *ca.Authority
	https   *catest.Server
}

func newCA(t testing.TB, nodes ...string) *caEnv {
	t.Helper()
	a := newAuthority(t)
	cl := catest.NewCluster()
	for _, n := range nodes {
		cl.AddAgent(t, n)
	}
	authz, err := ca.NewKubeAuthorizer(ca.KubeConfig{Client: cl.Client})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	if err := authz.Start(ctx); err != nil {
		t.Fatal(err)
	}
	srv, err := ca.NewServer(ca.ServerConfig{Authority: a, Authorizer: authz, MinTTL: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return &caEnv{cluster: cl, auth: a, https: catest.StartServer(t, a, srv)}
}

// agent is the identity manager of one node, talking to the CA over HTTPS.
func (e *caEnv) agent(t testing.TB, node string, ttl time.Duration, mod func(*identity.Config)) *identity.Manager {
	t.Helper()
	tok := e.cluster.Token(t, node, catest.TokenOptions{})
	cfg := identity.Config{
		TrustDomain: td, TTL: ttl,
		Remote: &identity.RemoteConfig{URL: e.https.URL, ServerName: e.https.ServerName,
			Token: func() (string, error) { return tok, nil }, Roots: e.auth.Material().Roots},
		Registerer: prometheus.NewRegistry(),
	}
	if mod != nil {
		mod(&cfg)
	}
	return startManager(t, cfg)
}

// startManager makes a Manager of cfg and runs it until the test ends.
func startManager(t testing.TB, cfg identity.Config) *identity.Manager {
	t.Helper()
	m, err := identity.NewManager(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = m.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return m
}

// peerID verifies a peer chain the way the tunnel does: against the
// current roots, for client or server use, in our trust domain, and
// returns the SPIFFE ID.
func peerID(raw [][]byte, roots *x509.CertPool, usage x509.ExtKeyUsage) (string, error) {
	if len(raw) == 0 {
		return "", errors.New("no peer certificate")
	}
	certs := make([]*x509.Certificate, len(raw))
	for i, r := range raw {
		c, err := x509.ParseCertificate(r)
		if err != nil {
			return "", err
		}
		certs[i] = c
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	if _, err := certs[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
		return "", err
	}
	if len(certs[0].URIs) != 1 {
		return "", errors.New("want one URI SAN")
	}
	id, err := ca.ParseID(certs[0].URIs[0].String())
	if err != nil {
		return "", err
	}
	if id.TrustDomain != td {
		return "", fmt.Errorf("foreign trust domain %s", id.TrustDomain)
	}
	return id.String(), nil
}

// mtlsServer is an HBONE-like endpoint: TLS 1.3, client certificate
// required and verified with the server manager's roots, certificate from
// the manager at every handshake. It echoes what it reads.
func mtlsServer(t testing.TB, m *identity.Manager, id string) string {
	t.Helper()
	cfg := &tls.Config{
		MinVersion: tls.VersionTLS13,
		ClientAuth: tls.RequireAnyClientCert,
		GetCertificate: func(h *tls.ClientHelloInfo) (*tls.Certificate, error) {
			return m.Certificate(h.Context(), id)
		},
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			_, err := peerID(raw, m.Roots(), x509.ExtKeyUsageClientAuth)
			return err
		},
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	return ln.Addr().String()
}

// dial makes one mTLS connection as clientID, checks the server is
// serverID, and round-trips a byte. It returns the serial of the client
// certificate used.
func dial(m *identity.Manager, addr, clientID, serverID string) (string, error) {
	var serial string
	cfg := &tls.Config{
		MinVersion:         tls.VersionTLS13,
		InsecureSkipVerify: true, // verified below, SPIFFE-style
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			c, err := m.Certificate(context.Background(), clientID)
			if err == nil {
				serial = c.Leaf.SerialNumber.Text(16)
			}
			return c, err
		},
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			id, err := peerID(raw, m.Roots(), x509.ExtKeyUsageServerAuth)
			if err == nil && id != serverID {
				err = fmt.Errorf("server is %s, want %s", id, serverID)
			}
			return err
		},
	}
	d := &net.Dialer{Timeout: 5 * time.Second}
	c, err := tls.DialWithDialer(d, "tcp", addr, cfg)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte{42}); err != nil {
		return "", err
	}
	b := make([]byte, 1)
	if _, err := io.ReadFull(c, b); err != nil || b[0] != 42 {
		return "", fmt.Errorf("echo: %v", err)
	}
	return serial, nil
}

// traffic dials in a loop until stop is closed, recording failures and the
// distinct client serials seen.
type traffic struct {
	ok, failed atomic.Int64
	mu         sync.Mutex
	serials    map[string]bool
	firstErr   error
	done       chan struct{}
}

func runTraffic(m *identity.Manager, addr, clientID, serverID string, stop <-chan struct{}) *traffic {
	tr := &traffic{serials: map[string]bool{}, done: make(chan struct{})}
	go func() {
		defer close(tr.done)
		for {
			select {
			case <-stop:
				return
			default:
			}
			s, err := dial(m, addr, clientID, serverID)
			tr.mu.Lock()
			if err != nil {
				tr.failed.Add(1)
				if tr.firstErr == nil {
					tr.firstErr = err
				}
			} else {
				tr.ok.Add(1)
				tr.serials[s] = true
			}
			tr.mu.Unlock()
			time.Sleep(20 * time.Millisecond)
		}
	}()
	return tr
}

func (tr *traffic) check(t *testing.T) int {
	t.Helper()
	<-tr.done
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if tr.failed.Load() > 0 {
		t.Fatalf("%d of %d connections failed; first: %v", tr.failed.Load(), tr.failed.Load()+tr.ok.Load(), tr.firstErr)
	}
	if tr.ok.Load() == 0 {
		t.Fatal("no connection made")
	}
	return len(tr.serials)
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// newAuthority is a CA of the test trust domain on a root of its own.
func newAuthority(t testing.TB) *ca.Authority { return catest.NewAuthority(t, td) }
