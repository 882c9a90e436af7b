package tunnel

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
	"time"
)

// PeerError is why a peer's certificate was refused. Reason is a short
// stable word for metrics: no_certificate, untrusted, expired,
// bad_identity, foreign_trust_domain, wrong_identity.
type PeerError struct {
	Reason string
	Err    error
}

func (e *PeerError) Error() string {
	return "peer certificate refused (" + e.Reason + "): " + e.Err.Error()
}
func (e *PeerError) Unwrap() error { return e.Err }

// spiffeID returns the SPIFFE ID of a workload certificate: its only URI
// SAN, of the form spiffe://<td>/ns/<ns>/sa/<sa> with names Kubernetes
// accepts. Anything looser is refused rather than trimmed: policy reads
// the namespace and service account out of the ID by position, so a
// certificate for spiffe://td/x/ns/prod/sa/admin or .../sa/admin/x (which
// our CA never issues, but another issuer under a shared root might)
// would otherwise be matched as namespace prod, service account admin.
// The X.509-SVID rules ask for exactly one URI SAN, so a second one is not
// a choice left to us.
func spiffeID(c *x509.Certificate) (string, error) {
	if len(c.URIs) != 1 {
		return "", fmt.Errorf("%d URI SANs, want exactly one (the SPIFFE ID)", len(c.URIs))
	}
	u := c.URIs[0]
	id := u.String()
	if u.Scheme != "spiffe" || u.Opaque != "" || u.User != nil || u.RawPath != "" ||
		u.RawQuery != "" || u.ForceQuery || u.Fragment != "" || !wellFormedID(id) {
		return "", fmt.Errorf("URI SAN %q is not spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>", id)
	}
	return id, nil
}

// wellFormedID checks spiffe://<td>/ns/<ns>/sa/<sa>: a trust domain of
// [a-z0-9._-], a namespace and service account of [a-z0-9.-] (what
// Kubernetes allows in those names), nothing before, between or after.
func wellFormedID(id string) bool {
	rest, ok := strings.CutPrefix(id, "spiffe://")
	if !ok {
		return false
	}
	td, path, _ := strings.Cut(rest, "/")
	parts := strings.Split(path, "/")
	if len(parts) != 4 || parts[0] != "ns" || parts[2] != "sa" || len(td) > 255 {
		return false
	}
	return validName(td, "._-") && validName(parts[1], "-") && validName(parts[3], ".-") &&
		len(parts[1]) <= 63 && len(parts[3]) <= 253
}

func validName(s, extra string) bool {
	if s == "" {
		return false
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || strings.ContainsRune(extra, c)) {
			return false
		}
	}
	return true
}

// trustDomainOf returns the trust domain of spiffe://<td>/...
func trustDomainOf(id string) string {
	rest, ok := strings.CutPrefix(id, "spiffe://")
	if !ok {
		return ""
	}
	td, _, _ := strings.Cut(rest, "/")
	return td
}

// verifyPeer checks a peer chain against the current trust bundle, the
// usage (client or server auth), our trust domain and, when want is not
// empty, the exact identity. It returns the peer's identity.
func (p *Proxy) verifyPeer(raw [][]byte, want string, usage x509.ExtKeyUsage) (string, error) {
	if len(raw) == 0 {
		return "", &PeerError{"no_certificate", errors.New("peer sent no certificate")}
	}
	certs := make([]*x509.Certificate, 0, len(raw))
	for _, r := range raw {
		c, err := x509.ParseCertificate(r)
		if err != nil {
			return "", &PeerError{"untrusted", fmt.Errorf("parse: %w", err)}
		}
		certs = append(certs, c)
	}
	leaf := certs[0]
	now := time.Now()
	if now.After(leaf.NotAfter) || now.Before(leaf.NotBefore) {
		return "", &PeerError{"expired", fmt.Errorf("valid %s to %s", leaf.NotBefore.Format(time.RFC3339), leaf.NotAfter.Format(time.RFC3339))}
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{
		Roots:         p.cfg.Certificates.Roots(),
		Intermediates: inter,
		KeyUsages:     []x509.ExtKeyUsage{usage},
		CurrentTime:   now,
	}); err != nil {
		var inv x509.CertificateInvalidError
		if errors.As(err, &inv) && inv.Reason == x509.Expired {
			return "", &PeerError{"expired", err}
		}
		return "", &PeerError{"untrusted", err}
	}
	// A workload certificate must not be able to sign: chain
	// verification accepts a leaf that is a CA, and with its key the
	// workload could mint any identity of the trust domain. (The
	// X.509-SVID rules: leaf cA false, neither keyCertSign nor cRLSign.)
	if leaf.IsCA || leaf.KeyUsage&(x509.KeyUsageCertSign|x509.KeyUsageCRLSign) != 0 {
		return "", &PeerError{"untrusted", errors.New("peer leaf certificate is a CA or may sign certificates")}
	}
	id, err := spiffeID(leaf)
	if err != nil {
		return "", &PeerError{"bad_identity", err}
	}
	if td := trustDomainOf(id); td != p.cfg.Certificates.TrustDomain() {
		return "", &PeerError{"foreign_trust_domain", fmt.Errorf("peer %s is not in trust domain %q", id, p.cfg.Certificates.TrustDomain())}
	}
	if want != "" && id != want {
		return "", &PeerError{"wrong_identity", fmt.Errorf("peer is %s, want %s", id, want)}
	}
	return id, nil
}

// serverTLS is the 15008 TLS config of a pod: its own certificate, a
// client certificate required and checked.
func (p *Proxy) serverTLS(identity string) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		NextProtos: []string{"h2"},
		// We verify ourselves (below) to classify failures; requesting
		// rather than requiring lets "no certificate" be counted as such.
		ClientAuth: tls.RequestClientCert,
		GetCertificate: func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
			return p.cfg.Certificates.Certificate(hello.Context(), identity)
		},
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			_, err := p.verifyPeer(raw, "", x509.ExtKeyUsageClientAuth)
			return err
		},
		SessionTicketsDisabled:      true,
		DynamicRecordSizingDisabled: true,
	}
}

// clientTLS is the config to reach dstID as srcID. No SNI is sent; the
// server's URI SAN must equal dstID.
func (p *Proxy) clientTLS(ctx context.Context, srcID, dstID string) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		NextProtos: []string{"h2"},
		// Hostname verification does not apply (SPIFFE identities);
		// VerifyPeerCertificate does the full chain and SAN check.
		InsecureSkipVerify: true,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return p.cfg.Certificates.Certificate(ctx, srcID)
		},
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			_, err := p.verifyPeer(raw, dstID, x509.ExtKeyUsageServerAuth)
			return err
		},
		DynamicRecordSizingDisabled: true,
	}
}

// peerIdentity is the verified identity of a handshaken connection.
func peerIdentity(tc *tls.Conn) string {
	cs := tc.ConnectionState()
	if len(cs.PeerCertificates) == 0 {
		return ""
	}
	id, _ := spiffeID(cs.PeerCertificates[0])
	return id
}
