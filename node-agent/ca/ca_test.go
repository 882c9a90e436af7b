package ca_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	corev1 "k8s.io/api/core/v1"

	"github.com/ambit-mesh/ambit/node-agent/ca"
	"github.com/ambit-mesh/ambit/node-agent/ca/catest"
)

const td = "cluster.local"

// newAuthority is a CA of the test trust domain on a root of its own.
func newAuthority(t testing.TB) *ca.Authority { return catest.NewAuthority(t, td) }

// csrFor makes a P-256 CSR with the given URI SANs (strings) plus extras.
func csrFor(t testing.TB, uris []string, mod func(*x509.CertificateRequest)) string {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.CertificateRequest{}
	for _, s := range uris {
		u, err := url.Parse(s)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = append(tmpl.URIs, u)
	}
	if mod != nil {
		mod(tmpl)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
}

type env struct {
	cluster *catest.Cluster
	auth    *ca.Authority
	server  *ca.Server
	https   *catest.Server
	client  *http.Client
	roots   *x509.CertPool
}

func newEnv(t *testing.T, limiter *ca.Limiter) *env {
	t.Helper()
	e := &env{cluster: catest.NewCluster(), auth: newAuthority(t)}
	for _, n := range []string{"node-1", "node-2"} {
		e.cluster.AddAgent(t, n)
	}
	e.cluster.AddPod(t, "shop", "web-1", "web", "node-1")
	e.cluster.AddPod(t, "shop", "db-1", "db", "node-2")
	authz, err := ca.NewKubeAuthorizer(ca.KubeConfig{Client: e.cluster.Client})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	if err := authz.Start(ctx); err != nil {
		t.Fatal(err)
	}
	e.server, err = ca.NewServer(ca.ServerConfig{Authority: e.auth, Authorizer: authz, Limiter: limiter, Registerer: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	e.https = catest.StartServer(t, e.auth, e.server)
	e.roots = x509.NewCertPool()
	e.roots.AddCert(e.auth.Material().Cert)
	e.client = &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{
		MinVersion: tls.VersionTLS13, RootCAs: e.roots, ServerName: e.https.ServerName}}}
	return e
}

type result struct {
	status int
	resp   ca.CertificateResponse
	err    ca.ErrorResponse
}

func (e *env) post(t *testing.T, token string, body []byte) result {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, e.https.URL+ca.PathCertificates, bytes.NewReader(body))
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	res, err := e.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	r := result{status: res.StatusCode}
	if res.StatusCode == http.StatusOK {
		if err := json.Unmarshal(b, &r.resp); err != nil {
			t.Fatalf("200 with bad body %q", b)
		}
	} else if err := json.Unmarshal(b, &r.err); err != nil || r.err.Reason == "" || r.err.Error == "" {
		t.Fatalf("refusal %d without a JSON reason: %q", res.StatusCode, b)
	}
	return r
}

func (e *env) ask(t *testing.T, token, identity string, ttl int64) result {
	t.Helper()
	body, _ := json.Marshal(ca.CertificateRequest{CSR: csrFor(t, []string{identity}, nil), TTLSeconds: ttl})
	return e.post(t, token, body)
}

func TestNodeBoundIssuance(t *testing.T) {
	e := newEnv(t, nil)
	tok1 := e.cluster.Token(t, "node-1", catest.TokenOptions{})
	web := "spiffe://cluster.local/ns/shop/sa/web"

	r := e.ask(t, tok1, web, 3600)
	if r.status != 200 {
		t.Fatalf("node-1 asking for its own pod's identity: %d %+v", r.status, r.err)
	}
	chain, err := ca.ParseCerts([]byte(r.resp.Chain))
	if err != nil || len(chain) != 1 {
		t.Fatalf("chain: %v (%d certs)", err, len(chain))
	}
	leaf := chain[0]
	roots, _ := ca.ParseCerts([]byte(r.resp.Roots))
	pool := x509.NewCertPool()
	for _, c := range roots {
		pool.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth}}); err != nil {
		t.Fatalf("leaf does not verify against the returned roots: %v", err)
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != web || len(leaf.DNSNames)+len(leaf.IPAddresses)+len(leaf.EmailAddresses) != 0 {
		t.Fatalf("SANs: uris %v dns %v ip %v", leaf.URIs, leaf.DNSNames, leaf.IPAddresses)
	}
	if leaf.KeyUsage != x509.KeyUsageDigitalSignature || len(leaf.ExtKeyUsage) != 2 || leaf.IsCA {
		t.Fatalf("usage: ku %v eku %v ca %v", leaf.KeyUsage, leaf.ExtKeyUsage, leaf.IsCA)
	}
	if life := time.Until(leaf.NotAfter); life > time.Hour || life < 59*time.Minute {
		t.Fatalf("asked for 1h, got %s", life)
	}

	// The same agent asking for a workload that runs on node-2 only.
	if r := e.ask(t, tok1, "spiffe://cluster.local/ns/shop/sa/db", 0); r.status != 403 || r.err.Reason != ca.ReasonNotOnNode {
		t.Fatalf("node-1 got db (runs on node-2): %d %+v", r.status, r.err)
	}
	// node-2 gets db with the default TTL (24h).
	tok2 := e.cluster.Token(t, "node-2", catest.TokenOptions{})
	r = e.ask(t, tok2, "spiffe://cluster.local/ns/shop/sa/db", 0)
	if r.status != 200 {
		t.Fatalf("node-2 db: %d %+v", r.status, r.err)
	}
	if c, _ := ca.ParseCerts([]byte(r.resp.Chain)); time.Until(c[0].NotAfter) < 23*time.Hour {
		t.Fatalf("default ttl: %s", time.Until(c[0].NotAfter))
	}
	if got := testutil.ToFloat64(e.server.Refused(ca.ReasonNotOnNode)); got != 1 {
		t.Fatalf("not_on_node refusals counted %v, want 1", got)
	}
}

func TestTokensRefused(t *testing.T) {
	e := newEnv(t, nil)
	web := "spiffe://cluster.local/ns/shop/sa/web"
	cases := []struct {
		name   string
		token  string
		status int
		reason ca.Reason
	}{
		{"none", "", 401, ca.ReasonUnauthenticated},
		{"garbage", "not-a-jwt", 401, ca.ReasonUnauthenticated},
		{"forged", e.cluster.Token(t, "node-1", catest.TokenOptions{Forged: true}), 401, ca.ReasonUnauthenticated},
		{"expired", e.cluster.Token(t, "node-1", catest.TokenOptions{Lifetime: -time.Minute}), 401, ca.ReasonUnauthenticated},
		{"wrong audience", e.cluster.Token(t, "node-1", catest.TokenOptions{Audience: "https://kubernetes.default.svc"}), 401, ca.ReasonUnauthenticated},
		{"workload's own token", e.cluster.Token(t, "node-1", catest.TokenOptions{Namespace: "shop", SA: "web", Pod: "web-1"}), 403, ca.ReasonNotAgent},
		{"not bound to a pod", e.cluster.Token(t, "node-1", catest.TokenOptions{Pod: "-"}), 403, ca.ReasonNoNode},
		{"bound pod replaced", e.cluster.Token(t, "node-1", catest.TokenOptions{WrongPodUID: true}), 401, ca.ReasonUnauthenticated},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := e.ask(t, c.token, web, 0)
			if r.status != c.status || r.err.Reason != c.reason {
				t.Fatalf("got %d %q (%s), want %d %q", r.status, r.err.Reason, r.err.Error, c.status, c.reason)
			}
		})
	}
	if got := testutil.ToFloat64(e.server.Refused(ca.ReasonUnauthenticated)); got != 6 {
		t.Fatalf("unauthenticated refusals counted %v, want 6", got)
	}
}

// Older API servers put no node into the token: the CA reads the bound pod.
func TestNodeFromBoundPod(t *testing.T) {
	e := newEnv(t, nil)
	e.cluster.NodeInTokens = false
	tok := e.cluster.Token(t, "node-1", catest.TokenOptions{})
	if r := e.ask(t, tok, "spiffe://cluster.local/ns/shop/sa/web", 0); r.status != 200 {
		t.Fatalf("%d %+v", r.status, r.err)
	}
	if r := e.ask(t, tok, "spiffe://cluster.local/ns/shop/sa/db", 0); r.status != 403 || r.err.Reason != ca.ReasonNotOnNode {
		t.Fatalf("%d %+v", r.status, r.err)
	}
}

func TestPodGoneNoLongerIssued(t *testing.T) {
	e := newEnv(t, nil)
	tok := e.cluster.Token(t, "node-1", catest.TokenOptions{})
	e.cluster.AddPod(t, "batch", "job-1", "worker", "node-1")
	e.cluster.AddPod(t, "shop", "api-1", "api", "node-1")
	for _, id := range []string{"spiffe://cluster.local/ns/batch/sa/worker", "spiffe://cluster.local/ns/shop/sa/api"} {
		if r := e.ask(t, tok, id, 0); r.status != 200 {
			t.Fatalf("%s before: %d %+v", id, r.status, r.err)
		}
	}
	e.cluster.SetPhase(t, "batch", "job-1", corev1.PodSucceeded)
	e.cluster.DeletePod(t, "shop", "api-1")
	// Refused once the CA's pod informer has seen the change (the
	// documented contract, docs/identity.md); asking at once raced the
	// informer's watch and got a certificate in 3-4% of runs. Then the
	// refusal holds.
	for _, id := range []string{"spiffe://cluster.local/ns/batch/sa/worker", "spiffe://cluster.local/ns/shop/sa/api"} {
		deadline := time.Now().Add(10 * time.Second)
		r := e.ask(t, tok, id, 0)
		for r.status == 200 && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
			r = e.ask(t, tok, id, 0)
		}
		if r.status != 403 || r.err.Reason != ca.ReasonNotOnNode {
			t.Fatalf("%s after the pod finished/left: %d %+v", id, r.status, r.err)
		}
		if r := e.ask(t, tok, id, 0); r.status != 403 || r.err.Reason != ca.ReasonNotOnNode {
			t.Fatalf("%s asked again: %d %+v", id, r.status, r.err)
		}
	}
}

func TestRateLimitPerNode(t *testing.T) {
	e := newEnv(t, ca.NewLimiter(0.001, 3))
	e.cluster.AddPod(t, "shop", "web-2", "web", "node-2")
	tok1 := e.cluster.Token(t, "node-1", catest.TokenOptions{})
	web := "spiffe://cluster.local/ns/shop/sa/web"
	for i := 0; i < 3; i++ {
		if r := e.ask(t, tok1, web, 0); r.status != 200 {
			t.Fatalf("request %d within burst: %d %+v", i, r.status, r.err)
		}
	}
	if r := e.ask(t, tok1, web, 0); r.status != 429 || r.err.Reason != ca.ReasonRateLimited {
		t.Fatalf("4th request: %d %+v", r.status, r.err)
	}
	// Another node has its own bucket.
	if r := e.ask(t, e.cluster.Token(t, "node-2", catest.TokenOptions{}), web, 0); r.status != 200 {
		t.Fatalf("node-2 throttled by node-1: %d %+v", r.status, r.err)
	}
}

func TestBadRequests(t *testing.T) {
	e := newEnv(t, nil)
	tok := e.cluster.Token(t, "node-1", catest.TokenOptions{})
	web := "spiffe://cluster.local/ns/shop/sa/web"
	body := func(csr string, ttl int64) []byte {
		b, _ := json.Marshal(ca.CertificateRequest{CSR: csr, TTLSeconds: ttl})
		return b
	}
	cases := []struct {
		name   string
		body   []byte
		status int
	}{
		{"not json", []byte("{"), 400},
		{"unknown field", []byte(`{"csr":"x","identity":"spiffe://cluster.local/ns/a/sa/b"}`), 400},
		{"two objects", append(body(csrFor(t, []string{web}, nil), 0), []byte(`{}`)...), 400},
		{"no csr", []byte(`{"ttlSeconds":5}`), 400},
		{"negative ttl", body(csrFor(t, []string{web}, nil), -1), 400},
		{"malformed DER", body(string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: []byte{0x30, 0x03, 1, 2, 3}})), 0), 400},
		{"certificate instead of csr", body(string(ca.EncodeCerts([]*x509.Certificate{e.auth.Material().Cert})), 0), 400},
		{"dns san", body(csrFor(t, []string{web}, func(r *x509.CertificateRequest) { r.DNSNames = []string{"web.shop"} }), 0), 400},
		{"two uri sans", body(csrFor(t, []string{web, "spiffe://cluster.local/ns/shop/sa/db"}, nil), 0), 400},
		{"no san", body(csrFor(t, nil, nil), 0), 400},
		{"https uri", body(csrFor(t, []string{"https://cluster.local/ns/shop/sa/web"}, nil), 0), 400},
		{"other trust domain", body(csrFor(t, []string{"spiffe://evil.example/ns/shop/sa/web"}, nil), 0), 400},
		{"extra path", body(csrFor(t, []string{web + "/x"}, nil), 0), 400},
		{"huge", body(strings.Repeat("A", ca.MaxRequestBytes+1), 0), 413},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if r := e.post(t, tok, c.body); r.status != c.status || r.err.Reason != ca.ReasonBadRequest {
				t.Fatalf("got %d %+v, want %d bad_request", r.status, r.err, c.status)
			}
		})
	}
	res, err := e.client.Get(e.https.URL + ca.PathCertificates)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != 405 {
		t.Fatalf("GET %s: %d", ca.PathCertificates, res.StatusCode)
	}
	// The roots endpoint answers anyone.
	res, err = e.client.Get(e.https.URL + ca.PathRoots)
	if err != nil {
		t.Fatal(err)
	}
	var rr ca.RootsResponse
	_ = json.NewDecoder(res.Body).Decode(&rr)
	res.Body.Close()
	if got, _ := ca.ParseCerts([]byte(rr.Roots)); len(got) != 1 || !got[0].Equal(e.auth.Material().Cert) {
		t.Fatalf("GET /v1/roots: %d roots", len(got))
	}
}
