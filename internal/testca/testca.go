// Package testca is a throwaway SPIFFE CA for tests and
// benchmarks (ECDSA P-256, URI SAN spiffe://<td>/ns/<ns>/sa/<sa>), and a
// tunnel.Certificates backed by it.
package testca

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"math/big"
	"net/url"
	"sync"
	"time"
)

// CA is a root that issues workload certificates.
type CA struct {
	TrustDomain string
	Cert        *x509.Certificate
	key         *ecdsa.PrivateKey
	serial      int64
	mu          sync.Mutex
}

// New makes a root CA for trust domain td.
func New(td string) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{Organization: []string{td}, CommonName: "ambit test root"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	cert, _ := x509.ParseCertificate(der)
	return &CA{TrustDomain: td, Cert: cert, key: key, serial: 1}, nil
}

// ID is the SPIFFE ID of ns/sa in the CA's trust domain.
func (ca *CA) ID(ns, sa string) string {
	return fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", ca.TrustDomain, ns, sa)
}

// IssueOptions bend a certificate for negative tests.
type IssueOptions struct {
	NotBefore, NotAfter time.Time // zero: now-1h .. now+1h
}

// Issue signs a workload certificate for the SPIFFE ID id.
func (ca *CA) Issue(id string, o IssueOptions) (*tls.Certificate, error) {
	u, err := url.Parse(id)
	if err != nil {
		return nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	ca.mu.Lock()
	ca.serial++
	serial := ca.serial
	ca.mu.Unlock()
	nb, na := o.NotBefore, o.NotAfter
	if nb.IsZero() {
		nb = time.Now().Add(-time.Hour)
	}
	if na.IsZero() {
		na = time.Now().Add(time.Hour)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial),
		NotBefore:    nb,
		NotAfter:     na,
		URIs:         []*url.URL{u},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.key)
	if err != nil {
		return nil, err
	}
	leaf, _ := x509.ParseCertificate(der)
	return &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, nil
}

// Store is a tunnel.Certificates: certificates issued on demand by a CA
// and cached, the CA's root as the bundle (SetRoots replaces it).
type Store struct {
	CA    *CA
	mu    sync.Mutex
	certs map[string]*tls.Certificate
	roots *x509.CertPool
}

// NewStore returns a Store issuing from ca.
func NewStore(ca *CA) *Store { return &Store{CA: ca, certs: map[string]*tls.Certificate{}} }

// Set pins the certificate returned for id (for negative tests).
func (s *Store) Set(id string, c *tls.Certificate) {
	s.mu.Lock()
	s.certs[id] = c
	s.mu.Unlock()
}

// Certificate implements tunnel.Certificates.
func (s *Store) Certificate(_ context.Context, id string) (*tls.Certificate, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if c, ok := s.certs[id]; ok {
		return c, nil
	}
	c, err := s.CA.Issue(id, IssueOptions{})
	if err != nil {
		return nil, err
	}
	s.certs[id] = c
	return c, nil
}

// Roots implements tunnel.Certificates. As the identity manager's, the
// pool is the same one until the bundle changes.
func (s *Store) Roots() *x509.CertPool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.roots == nil {
		s.roots = x509.NewCertPool()
		s.roots.AddCert(s.CA.Cert)
	}
	return s.roots
}

// SetRoots replaces the trust bundle (a root rotation, a removed root).
func (s *Store) SetRoots(roots ...*x509.Certificate) {
	p := x509.NewCertPool()
	for _, r := range roots {
		p.AddCert(r)
	}
	s.mu.Lock()
	s.roots = p
	s.mu.Unlock()
}

// TrustDomain implements tunnel.Certificates.
func (s *Store) TrustDomain() string { return s.CA.TrustDomain }
