package ca

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
)

// MaxCSRBytes bounds a CSR; a P-256 CSR with one URI SAN is about 300 bytes.
const MaxCSRBytes = 16 << 10

// ParseCSR decodes one PEM "CERTIFICATE REQUEST", checks its signature and
// returns it with the single identity it asks for, which must be in
// trustDomain. The rules are strict on purpose: exactly one URI SAN of the
// form spiffe://<td>/ns/X/sa/Y, no DNS, IP or e-mail SANs, and a key the
// mesh uses (ECDSA P-256/P-384, Ed25519, RSA >= 2048 bits). Everything
// else is refused with an error that says why.
func ParseCSR(pemBytes []byte, trustDomain string) (*x509.CertificateRequest, ID, error) {
	if len(pemBytes) == 0 {
		return nil, ID{}, errors.New("csr: empty")
	}
	if len(pemBytes) > MaxCSRBytes {
		return nil, ID{}, fmt.Errorf("csr: %d bytes, more than %d", len(pemBytes), MaxCSRBytes)
	}
	block, rest := pem.Decode(pemBytes)
	if block == nil {
		return nil, ID{}, errors.New("csr: no PEM block")
	}
	if block.Type != "CERTIFICATE REQUEST" && block.Type != "NEW CERTIFICATE REQUEST" {
		return nil, ID{}, fmt.Errorf("csr: PEM block is %q, want CERTIFICATE REQUEST", block.Type)
	}
	if next, _ := pem.Decode(rest); next != nil {
		return nil, ID{}, errors.New("csr: more than one PEM block")
	}
	return ParseCSRDER(block.Bytes, trustDomain)
}

// ParseCSRDER is ParseCSR for DER bytes (the in-process signer uses it).
func ParseCSRDER(der []byte, trustDomain string) (*x509.CertificateRequest, ID, error) {
	if len(der) > MaxCSRBytes {
		return nil, ID{}, fmt.Errorf("csr: %d bytes, more than %d", len(der), MaxCSRBytes)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, ID{}, fmt.Errorf("csr: malformed: %v", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, ID{}, fmt.Errorf("csr: bad signature: %v", err)
	}
	if err := checkKey(csr.PublicKey); err != nil {
		return nil, ID{}, err
	}
	if len(csr.DNSNames) > 0 || len(csr.IPAddresses) > 0 || len(csr.EmailAddresses) > 0 {
		return nil, ID{}, errors.New("csr: only a URI SAN is allowed (found DNS, IP or e-mail SANs)")
	}
	if len(csr.URIs) != 1 {
		return nil, ID{}, fmt.Errorf("csr: want exactly one URI SAN, found %d", len(csr.URIs))
	}
	id, err := idFromURL(csr.URIs[0])
	if err != nil {
		return nil, ID{}, fmt.Errorf("csr: %v", err)
	}
	if id.TrustDomain != trustDomain {
		return nil, ID{}, fmt.Errorf("csr: trust domain %q, this CA signs for %q", id.TrustDomain, trustDomain)
	}
	return csr, id, nil
}

func checkKey(pub any) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() && k.Curve != elliptic.P384() {
			return fmt.Errorf("csr: ECDSA curve %s not accepted (P-256 or P-384)", k.Curve.Params().Name)
		}
	case ed25519.PublicKey:
	case *rsa.PublicKey:
		if k.N.BitLen() < 2048 {
			return fmt.Errorf("csr: RSA key of %d bits, need at least 2048", k.N.BitLen())
		}
	default:
		return fmt.Errorf("csr: key type %T not accepted", pub)
	}
	return nil
}
