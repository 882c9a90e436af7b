package ca_test

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"io"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/node-agent/ca"
	"github.com/ambit-mesh/ambit/node-agent/ca/catest"
)

// BenchmarkSignInProcess is the baseline: CSR check + signing, no HTTP,
// no authorization.
func BenchmarkSignInProcess(b *testing.B) {
	a := newAuthority(b)
	csrPEM := []byte(csrFor(b, []string{"spiffe://cluster.local/ns/shop/sa/web"}, nil))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		csr, id, err := ca.ParseCSR(csrPEM, td)
		if err != nil {
			b.Fatal(err)
		}
		if _, _, err := a.Sign(csr, id, time.Hour); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "certs/s")
}

// BenchmarkIssueHTTPS: certificates per second from one CA replica over
// HTTPS on loopback, with the Kubernetes authorizer (TokenReview cached,
// pod check from the informer) and several agents in parallel.
func BenchmarkIssueHTTPS(b *testing.B) {
	cl := catest.NewCluster()
	cl.AddAgent(b, "node-1")
	cl.AddPod(b, "shop", "web-1", "web", "node-1")
	authz, err := ca.NewKubeAuthorizer(ca.KubeConfig{Client: cl.Client})
	if err != nil {
		b.Fatal(err)
	}
	ctx := b.Context()
	if err := authz.Start(ctx); err != nil {
		b.Fatal(err)
	}
	a := newAuthority(b)
	srv, err := ca.NewServer(ca.ServerConfig{Authority: a, Authorizer: authz})
	if err != nil {
		b.Fatal(err)
	}
	hs := catest.StartServer(b, a, srv)
	tok := cl.Token(b, "node-1", catest.TokenOptions{})
	// Pre-made CSRs: the agents' key generation is not the CA's cost.
	bodies := make([][]byte, 64)
	for i := range bodies {
		bodies[i], _ = json.Marshal(ca.CertificateRequest{CSR: csrFor(b, []string{"spiffe://cluster.local/ns/shop/sa/web"}, nil)})
	}
	pool := x509Pool(a)
	var n atomic.Int64
	b.SetParallelism(4)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		c := &http.Client{Transport: &http.Transport{ForceAttemptHTTP2: true, TLSClientConfig: &tls.Config{
			MinVersion: tls.VersionTLS13, RootCAs: pool, ServerName: hs.ServerName}}}
		for pb.Next() {
			i := n.Add(1)
			req, _ := http.NewRequest(http.MethodPost, hs.URL+ca.PathCertificates, bytes.NewReader(bodies[i%int64(len(bodies))]))
			req.Header.Set("Authorization", "Bearer "+tok)
			res, err := c.Do(req)
			if err != nil {
				b.Error(err)
				return
			}
			_, _ = io.Copy(io.Discard, res.Body)
			res.Body.Close()
			if res.StatusCode != 200 {
				b.Errorf("status %d", res.StatusCode)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "certs/s")
}

func x509Pool(a *ca.Authority) *x509.CertPool {
	p := x509.NewCertPool()
	for _, r := range a.Material().Roots {
		p.AddCert(r)
	}
	return p
}
