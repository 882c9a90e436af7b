package ca_test

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/json"
	"encoding/pem"
	"net"
	"net/url"
	"testing"

	"github.com/ambit-mesh/ambit/node-agent/ca"
	"github.com/ambit-mesh/ambit/node-agent/ca/catest"
)

// TestCSRCannotWiden: whatever else a CSR asks for — CA:true, keyCertSign,
// codeSigning, a subject, extra extensions — the certificate carries only
// what the CA puts there: the one identity, digitalSignature, serverAuth +
// clientAuth, not a CA. A CA that copied the CSR's extensions would hand a
// node a key able to mint any identity of the trust domain.
func TestCSRCannotWiden(t *testing.T) {
	e := newEnv(t, nil)
	tok := e.cluster.Token(t, "node-1", catest.TokenOptions{})
	web := "spiffe://cluster.local/ns/shop/sa/web"
	bc, _ := asn1.Marshal(struct {
		IsCA bool `asn1:"optional"`
	}{true})
	ku, _ := asn1.Marshal(asn1.BitString{Bytes: []byte{0x06}, BitLength: 7})     // keyCertSign | cRLSign
	eku, _ := asn1.Marshal([]asn1.ObjectIdentifier{{1, 3, 6, 1, 5, 5, 7, 3, 3}}) // codeSigning
	csr := csrFor(t, []string{web}, func(r *x509.CertificateRequest) {
		r.Subject = pkix.Name{CommonName: "admin", Organization: []string{"system:masters"}}
		r.ExtraExtensions = []pkix.Extension{
			{Id: asn1.ObjectIdentifier{2, 5, 29, 19}, Critical: true, Value: bc},
			{Id: asn1.ObjectIdentifier{2, 5, 29, 15}, Critical: true, Value: ku},
			{Id: asn1.ObjectIdentifier{2, 5, 29, 37}, Value: eku},
		}
	})
	body, _ := json.Marshal(ca.CertificateRequest{CSR: csr})
	r := e.post(t, tok, body)
	if r.status != 200 {
		t.Fatalf("%d %+v", r.status, r.err)
	}
	chain, err := ca.ParseCerts([]byte(r.resp.Chain))
	if err != nil || len(chain) == 0 {
		t.Fatalf("chain: %v", err)
	}
	leaf := chain[0]
	if leaf.IsCA || leaf.KeyUsage != x509.KeyUsageDigitalSignature || leaf.MaxPathLen > 0 {
		t.Errorf("leaf IsCA=%v KeyUsage=%b", leaf.IsCA, leaf.KeyUsage)
	}
	if len(leaf.ExtKeyUsage) != 2 || leaf.ExtKeyUsage[0] != x509.ExtKeyUsageServerAuth || leaf.ExtKeyUsage[1] != x509.ExtKeyUsageClientAuth || len(leaf.UnknownExtKeyUsage) > 0 {
		t.Errorf("leaf ExtKeyUsage %v %v", leaf.ExtKeyUsage, leaf.UnknownExtKeyUsage)
	}
	if len(leaf.Subject.Names) > 0 || len(leaf.URIs) != 1 || leaf.URIs[0].String() != web {
		t.Errorf("leaf subject %q URIs %v", leaf.Subject, leaf.URIs)
	}
}

// TestCSRRefused: SANs other than the one URI, a signature that does not
// verify, a weak key.
func TestCSRRefused(t *testing.T) {
	e := newEnv(t, nil)
	tok := e.cluster.Token(t, "node-1", catest.TokenOptions{})
	web := "spiffe://cluster.local/ns/shop/sa/web"
	badSig := func() string {
		b, _ := pem.Decode([]byte(csrFor(t, []string{web}, nil)))
		b.Bytes[len(b.Bytes)-1] ^= 0xff // inside the signature
		return string(pem.EncodeToMemory(b))
	}()
	weak := func() string {
		k, err := rsa.GenerateKey(rand.Reader, 1024)
		if err != nil {
			t.Fatal(err)
		}
		der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: mustURIs(t, web)}, k)
		if err != nil {
			t.Fatal(err)
		}
		return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
	}()
	for name, csr := range map[string]string{
		"ip san":        csrFor(t, []string{web}, func(r *x509.CertificateRequest) { r.IPAddresses = []net.IP{net.IPv4(10, 0, 0, 1)} }),
		"email san":     csrFor(t, []string{web}, func(r *x509.CertificateRequest) { r.EmailAddresses = []string{"a@b.c"} }),
		"bad signature": badSig,
		"rsa 1024":      weak,
		"query":         csrFor(t, []string{web + "?x=1"}, nil),
		"upper case":    csrFor(t, []string{"spiffe://cluster.local/ns/Shop/sa/web"}, nil),
		"escaped":       csrFor(t, []string{"spiffe://cluster.local/ns/shop/sa/w%65b"}, nil),
	} {
		t.Run(name, func(t *testing.T) {
			body, _ := json.Marshal(ca.CertificateRequest{CSR: csr})
			if r := e.post(t, tok, body); r.status != 400 || r.err.Reason != ca.ReasonBadRequest {
				t.Fatalf("got %d %+v, want 400 bad_request", r.status, r.err)
			}
		})
	}
}

func mustURIs(t *testing.T, s ...string) []*url.URL {
	t.Helper()
	var out []*url.URL
	for _, x := range s {
		u, err := url.Parse(x)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, u)
	}
	return out
}
