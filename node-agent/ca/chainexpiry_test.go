package ca_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/node-agent/ca"
)

// caUntil is a CA certificate under parent valid until notAfter.
func caUntil(t *testing.T, parent *ca.Material, cn string, notAfter time.Time) *ca.Material {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: notAfter,
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent.Cert, key.Public(), parent.Key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &ca.Material{Cert: c, Key: key, Roots: parent.Roots}
}

// A leaf must not outlive any certificate of its chain: peers refuse it
// as soon as one has expired, while the agent keeps it until its own
// half-life. Cutting only at the signing certificate (as before) let a
// 24 h leaf outlive an intermediate or a root that ends in 2 h.
func TestLeafNeverOutlivesItsChain(t *testing.T) {
	soon := time.Now().Add(2 * time.Hour).Truncate(time.Second)
	later := time.Now().Add(48 * time.Hour)
	csr, id, err := ca.ParseCSR([]byte(csrFor(t, []string{"spiffe://cluster.local/ns/a/sa/b"}, nil)), td)
	if err != nil {
		t.Fatal(err)
	}
	cases := map[string]func() *ca.Material{
		"intermediate ends first": func() *ca.Material {
			root, _ := ca.GenerateRoot(td, 365*24*time.Hour)
			inter := caUntil(t, root, "intermediate", soon)
			signing := caUntil(t, inter, "signing", later)
			signing.Intermediates = []*x509.Certificate{inter.Cert}
			return signing
		},
		"root ends first": func() *ca.Material {
			root, _ := ca.GenerateRoot(td, time.Until(soon))
			return caUntil(t, root, "signing", later)
		},
	}
	for name, mk := range cases {
		t.Run(name, func(t *testing.T) {
			a, err := ca.NewAuthority(td, mk())
			if err != nil {
				t.Fatal(err)
			}
			chain, _, err := a.Sign(csr, id, 24*time.Hour)
			if err != nil {
				t.Fatal(err)
			}
			if got := chain[0].NotAfter; got.After(soon) {
				t.Fatalf("leaf valid until %s, past its chain's end %s", got.UTC(), soon.UTC())
			}
			tc, err := a.ServingCertificate([]string{"ambit-ca"}, nil, 7*24*time.Hour)
			if err != nil {
				t.Fatal(err)
			}
			if got := tc.Leaf.NotAfter; got.After(soon) {
				t.Fatalf("serving certificate valid until %s, past its chain's end %s", got.UTC(), soon.UTC())
			}
		})
	}
}

// Material is checked when loaded, but it can expire while the CA runs
// (a cert-manager intermediate that was not renewed): the CA must then
// refuse with an error that says so, not answer 200 with a leaf that is
// already expired (NotAfter cut to the signing certificate's, in the past).
func TestExpiredSigningChainRefused(t *testing.T) {
	root, _ := ca.GenerateRoot(td, 365*24*time.Hour)
	signing := caUntil(t, root, "signing", time.Now().Add(1500*time.Millisecond).Truncate(time.Second))
	a, err := ca.NewAuthority(td, signing)
	if err != nil {
		t.Fatal(err)
	}
	csr, id, err := ca.ParseCSR([]byte(csrFor(t, []string{"spiffe://cluster.local/ns/a/sa/b"}, nil)), td)
	if err != nil {
		t.Fatal(err)
	}
	// Wait for the signing certificate to expire (the condition, not a
	// guess at a duration).
	for !time.Now().After(signing.Cert.NotAfter) {
		time.Sleep(50 * time.Millisecond)
	}
	chain, _, err := a.Sign(csr, id, time.Hour)
	if err == nil {
		t.Fatalf("signed under an expired CA certificate: leaf valid %s to %s", chain[0].NotBefore.UTC(), chain[0].NotAfter.UTC())
	}
	if !strings.Contains(err.Error(), "expired") {
		t.Fatalf("error does not say the chain expired: %v", err)
	}
}
