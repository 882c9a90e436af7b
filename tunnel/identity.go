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

// spiffeID returns the SPIFFE ID (first spiffe:// URI SAN) of a cert.
func spiffeID(c *x509.Certificate) (string, error) {
	for _, u := range c.URIs {
		if u.Scheme == "spiffe" {
			return u.String(), nil
		}
	}
	return "", errors.New("no spiffe:// URI SAN")
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
