package ca_test

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/ambit-mesh/ambit/node-agent/ca"
)

func csrSeeds(f *testing.F) []string {
	return []string{
		csrFor(f, []string{"spiffe://cluster.local/ns/shop/sa/web"}, nil),
		csrFor(f, []string{"spiffe://cluster.local/ns/shop/sa/web", "spiffe://cluster.local/ns/shop/sa/db"}, nil),
		csrFor(f, []string{"spiffe://other/ns/shop/sa/web"}, nil),
		csrFor(f, nil, nil),
		"-----BEGIN CERTIFICATE REQUEST-----\nMAMCAQA=\n-----END CERTIFICATE REQUEST-----\n",
		"",
	}
}

func FuzzParseCSR(f *testing.F) {
	for _, s := range csrSeeds(f) {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		csr, id, err := ca.ParseCSR(b, td)
		if err != nil {
			return
		}
		if len(csr.URIs) != 1 || csr.URIs[0].String() != id.String() || id.TrustDomain != td {
			t.Fatalf("accepted %v as %v", csr.URIs, id)
		}
		if _, err := ca.ParseID(id.String()); err != nil {
			t.Fatalf("accepted an identity that does not parse back: %v", err)
		}
	})
}

func FuzzParseID(f *testing.F) {
	for _, s := range []string{"spiffe://cluster.local/ns/a/sa/b", "spiffe://x/ns//sa/b", "spiffe://x:1/ns/a/sa/b", "spiffe://x/ns/a/sa/b?q", "spiffe://x/ns/a%2Fb/sa/c"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, err := ca.ParseID(s)
		if err == nil && id.String() != s {
			t.Fatalf("%q parsed as %q", s, id.String())
		}
	})
}

// The whole request path, body first: any input gets a JSON answer with a
// sane status, and a 200 is only ever a certificate for the one URI asked.
func FuzzCertificatesHandler(f *testing.F) {
	a := newAuthority(f)
	srv, err := ca.NewServer(ca.ServerConfig{Authority: a, Authorizer: ca.StaticAuthorizer{
		Tokens: map[string]ca.Caller{"t": {Node: "n"}},
		Allow:  func(string, ca.ID) bool { return true },
	}})
	if err != nil {
		f.Fatal(err)
	}
	for _, s := range csrSeeds(f) {
		b, _ := json.Marshal(ca.CertificateRequest{CSR: s, TTLSeconds: 60})
		f.Add(b)
	}
	f.Add([]byte(`{"csr":1}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, body []byte) {
		req := httptest.NewRequest(http.MethodPost, ca.PathCertificates, bytes.NewReader(body))
		req.Header.Set("Authorization", "Bearer t")
		rec := httptest.NewRecorder()
		srv.ServeHTTP(rec, req)
		switch rec.Code {
		case 200:
			var r ca.CertificateResponse
			if err := json.Unmarshal(rec.Body.Bytes(), &r); err != nil {
				t.Fatal(err)
			}
			chain, err := ca.ParseCerts([]byte(r.Chain))
			if err != nil || len(chain) != 1 || len(chain[0].URIs) != 1 || len(chain[0].DNSNames) != 0 {
				t.Fatalf("bad issuance: %v", err)
			}
		case 400, 413:
			var e ca.ErrorResponse
			if err := json.Unmarshal(rec.Body.Bytes(), &e); err != nil || e.Reason != ca.ReasonBadRequest {
				t.Fatalf("refusal body %q", rec.Body.Bytes())
			}
		default:
			t.Fatalf("status %d for %q", rec.Code, body)
		}
	})
}
