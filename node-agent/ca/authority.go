package ca

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"sync"
	"time"
)

// Material is the signing key of a CA and what it chains to.
type Material struct {
	// Cert signs workload certificates; Key is its private key.
	Cert *x509.Certificate
	Key  crypto.Signer
	// Intermediates lie between Cert and a root (empty when Cert is a
	// root or directly under one). They go into every issued chain.
	Intermediates []*x509.Certificate
	// Roots is the trust bundle handed to agents. During a root rotation
	// it holds the old and the new root side by side.
	Roots []*x509.Certificate
}

// ParseMaterial reads PEM material. certPEM holds the signing certificate,
// optionally followed by intermediates; keyPEM its key (PKCS#8, EC or
// PKCS#1). rootsPEM is the trust bundle; empty means certPEM's signing
// certificate is itself the (self-signed) root. The signing certificate
// must be a CA that may sign, its key must match, and it must chain to one
// of the roots: a mistake here would issue certificates no peer accepts.
func ParseMaterial(certPEM, keyPEM, rootsPEM []byte) (*Material, error) {
	certs, err := parseCerts(certPEM)
	if err != nil {
		return nil, fmt.Errorf("ca certificate: %w", err)
	}
	if len(certs) == 0 {
		return nil, errors.New("ca certificate: no CERTIFICATE block")
	}
	key, err := parseKey(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("ca key: %w", err)
	}
	m := &Material{Cert: certs[0], Key: key, Intermediates: certs[1:]}
	if len(bytes.TrimSpace(rootsPEM)) > 0 {
		if m.Roots, err = parseCerts(rootsPEM); err != nil {
			return nil, fmt.Errorf("root bundle: %w", err)
		}
		if len(m.Roots) == 0 {
			return nil, errors.New("root bundle: no CERTIFICATE block")
		}
	} else {
		if err := m.Cert.CheckSignatureFrom(m.Cert); err != nil {
			return nil, errors.New("ca certificate is not self-signed and no root bundle was given")
		}
		m.Roots = []*x509.Certificate{m.Cert}
	}
	// A self-signed signing cert that is also listed in Intermediates or a
	// chain that ends in a root: drop roots from the intermediates.
	m.Intermediates = dropRoots(m.Intermediates, m.Roots)
	if _, err := m.check(); err != nil {
		return nil, err
	}
	return m, nil
}

// check validates the material and returns until when its chain is
// valid: the earliest expiry among the signing certificate, the
// intermediates and the root of the chain (the longest-lived chain when
// several roots verify it). A leaf outliving it is refused by every
// peer once that part of its chain has expired, while the agent, going
// by the leaf's own NotAfter, keeps serving it until half-life.
func (m *Material) check() (time.Time, error) {
	if !m.Cert.IsCA || m.Cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return time.Time{}, errors.New("ca certificate: not a CA certificate with the certSign key usage")
	}
	if !publicKeysEqual(m.Cert.PublicKey, m.Key.Public()) {
		return time.Time{}, errors.New("ca key does not match the ca certificate")
	}
	now := time.Now()
	if now.After(m.Cert.NotAfter) {
		return time.Time{}, fmt.Errorf("ca certificate expired at %s", m.Cert.NotAfter.UTC().Format(time.RFC3339))
	}
	roots := x509.NewCertPool()
	for _, r := range m.Roots {
		roots.AddCert(r)
	}
	inter := x509.NewCertPool()
	for _, c := range m.Intermediates {
		inter.AddCert(c)
	}
	chains, err := m.Cert.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	if err != nil {
		return time.Time{}, fmt.Errorf("ca certificate does not chain to the root bundle: %v", err)
	}
	var until time.Time
	for _, chain := range chains {
		end := chain[0].NotAfter
		for _, c := range chain[1:] {
			if c.NotAfter.Before(end) {
				end = c.NotAfter
			}
		}
		if end.After(until) {
			until = end
		}
	}
	return until, nil
}

// PEM renders the material as (cert+intermediates, key, roots).
func (m *Material) PEM() (certPEM, keyPEM, rootsPEM []byte, err error) {
	certPEM = EncodeCerts(append([]*x509.Certificate{m.Cert}, m.Intermediates...))
	der, err := x509.MarshalPKCS8PrivateKey(m.Key)
	if err != nil {
		return nil, nil, nil, err
	}
	keyPEM = pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	return certPEM, keyPEM, EncodeCerts(m.Roots), nil
}

// GenerateRoot makes a new self-signed ECDSA P-256 root for trustDomain.
func GenerateRoot(trustDomain string, validity time.Duration) (*Material, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"ambit"}, CommonName: "ambit root CA " + trustDomain + " " + now.UTC().Format("2006-01-02T15:04:05Z")},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(validity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &Material{Cert: cert, Key: key, Roots: []*x509.Certificate{cert}}, nil
}

// Authority signs workload certificates for one trust domain. Its material
// can be swapped at run time (Update) for root or key rotation; signing
// and Roots are safe for concurrent use.
type Authority struct {
	trustDomain string
	mu          sync.RWMutex
	m           *Material
	rootsPEM    []byte
	until       time.Time // m's chain is valid until then (Material.check)
}

// NewAuthority returns an Authority signing with m.
func NewAuthority(trustDomain string, m *Material) (*Authority, error) {
	if err := ValidateTrustDomain(trustDomain); err != nil {
		return nil, err
	}
	a := &Authority{trustDomain: trustDomain}
	if err := a.Update(m); err != nil {
		return nil, err
	}
	return a, nil
}

// TrustDomain is the domain this authority signs for.
func (a *Authority) TrustDomain() string { return a.trustDomain }

// Update replaces the signing material (after checking it).
func (a *Authority) Update(m *Material) error {
	if m == nil || m.Cert == nil || m.Key == nil {
		return errors.New("ca: incomplete material")
	}
	until, err := m.check()
	if err != nil {
		return err
	}
	a.mu.Lock()
	a.m, a.until = m, until
	a.rootsPEM = EncodeCerts(m.Roots)
	a.mu.Unlock()
	return nil
}

// Material returns the current material (read-only).
func (a *Authority) Material() *Material {
	a.mu.RLock()
	defer a.mu.RUnlock()
	return a.m
}

// RootsPEM is the current trust bundle.
func (a *Authority) RootsPEM() []byte {
	a.mu.RLock()
	defer a.mu.RUnlock()
	return a.rootsPEM
}

// clockSkew backdates NotBefore so a peer whose clock is a little behind
// accepts a fresh certificate. Agents schedule rotation from NotAfter and
// the time they received it, so this does not shorten anything.
const clockSkew = time.Minute

// Sign issues a workload certificate for id (already authorized) with the
// public key of csr. The result is the chain leaf first, then
// intermediates; roots are not included. The lifetime is cut at the
// expiry of the signing chain (signing certificate, intermediates, root),
// and nothing is signed once that has passed: material checked at load
// can expire while the CA runs, and a leaf under it is dead on arrival.
func (a *Authority) Sign(csr *x509.CertificateRequest, id ID, ttl time.Duration) ([]*x509.Certificate, []byte, error) {
	if id.TrustDomain != a.trustDomain {
		return nil, nil, fmt.Errorf("ca: identity %s not in trust domain %s", id, a.trustDomain)
	}
	if ttl <= 0 {
		return nil, nil, errors.New("ca: ttl must be positive")
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, nil, err
	}
	a.mu.RLock()
	m, rootsPEM, until := a.m, a.rootsPEM, a.until
	a.mu.RUnlock()
	now := time.Now()
	if !now.Before(until) {
		return nil, nil, fmt.Errorf("ca: signing chain expired at %s; renew the CA certificate", until.UTC().Format(time.RFC3339))
	}
	notAfter := now.Add(ttl)
	if notAfter.After(until) {
		notAfter = until
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              notAfter,
		URIs:                  []*url.URL{id.URL()},
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	if _, isRSA := csr.PublicKey.(*rsa.PublicKey); isRSA {
		tmpl.KeyUsage |= x509.KeyUsageKeyEncipherment
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, m.Cert, csr.PublicKey, m.Key)
	if err != nil {
		return nil, nil, fmt.Errorf("ca: signing: %v", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, err
	}
	chain := make([]*x509.Certificate, 0, 2+len(m.Intermediates))
	chain = append(chain, leaf)
	if !isSelfSigned(m.Cert) {
		chain = append(chain, m.Cert)
	}
	chain = append(chain, m.Intermediates...)
	return chain, rootsPEM, nil
}

// ServingCertificate issues the CA's own HTTPS certificate (DNS and IP
// SANs, serverAuth) under the same signing key, so agents verify the CA
// with the trust bundle they already hold.
func (a *Authority) ServingCertificate(dnsNames []string, ips []net.IP, ttl time.Duration) (*tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	a.mu.RLock()
	m, until := a.m, a.until
	a.mu.RUnlock()
	now := time.Now()
	if !now.Before(until) {
		return nil, fmt.Errorf("ca: signing chain expired at %s; renew the CA certificate", until.UTC().Format(time.RFC3339))
	}
	notAfter := now.Add(ttl)
	if notAfter.After(until) {
		notAfter = until
	}
	cn := "ambit-ca"
	if len(dnsNames) > 0 {
		cn = dnsNames[0]
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"ambit"}, CommonName: cn},
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              notAfter,
		DNSNames:              dnsNames,
		IPAddresses:           ips,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, m.Cert, key.Public(), m.Key)
	if err != nil {
		return nil, err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	tc := &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
	if !isSelfSigned(m.Cert) {
		tc.Certificate = append(tc.Certificate, m.Cert.Raw)
	}
	for _, c := range m.Intermediates {
		tc.Certificate = append(tc.Certificate, c.Raw)
	}
	return tc, nil
}

// EncodeCerts renders certificates as concatenated PEM.
func EncodeCerts(certs []*x509.Certificate) []byte {
	var b bytes.Buffer
	for _, c := range certs {
		_ = pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	return b.Bytes()
}

// ParseCerts reads every CERTIFICATE block of a PEM bundle; any other
// block type or trailing garbage is an error.
func ParseCerts(pemBytes []byte) ([]*x509.Certificate, error) { return parseCerts(pemBytes) }

func parseCerts(pemBytes []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	rest := pemBytes
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("unexpected PEM block %q", block.Type)
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	if len(bytes.TrimSpace(rest)) > 0 {
		return nil, errors.New("trailing data that is not PEM")
	}
	return out, nil
}

func parseKey(pemBytes []byte) (crypto.Signer, error) {
	block, _ := pem.Decode(pemBytes)
	if block == nil {
		return nil, errors.New("no PEM block")
	}
	var k any
	var err error
	switch block.Type {
	case "PRIVATE KEY":
		k, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	case "EC PRIVATE KEY":
		k, err = x509.ParseECPrivateKey(block.Bytes)
	case "RSA PRIVATE KEY":
		k, err = x509.ParsePKCS1PrivateKey(block.Bytes)
	default:
		return nil, fmt.Errorf("unexpected PEM block %q", block.Type)
	}
	if err != nil {
		return nil, err
	}
	s, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("key type %T cannot sign", k)
	}
	return s, nil
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	ae, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && ae.Equal(b)
}

func isSelfSigned(c *x509.Certificate) bool {
	return bytes.Equal(c.RawIssuer, c.RawSubject) && c.CheckSignatureFrom(c) == nil
}

func dropRoots(chain, roots []*x509.Certificate) []*x509.Certificate {
	out := chain[:0:0]
	for _, c := range chain {
		root := false
		for _, r := range roots {
			if c.Equal(r) {
				root = true
			}
		}
		if !root {
			out = append(out, c)
		}
	}
	return out
}

func randomSerial() (*big.Int, error) {
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
}
