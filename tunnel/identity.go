package tunnel

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
	"sync"
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

// tlsReason is the metrics reason of a failed handshake or of a stream
// refused by recheck: "tls_" and the PeerError's reason, else "tls".
func tlsReason(err error) string {
	var pe *PeerError
	if errors.As(err, &pe) {
		return "tls_" + pe.Reason
	}
	return "tls"
}

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
// empty, the exact identity. It returns the peer's identity and the
// earliest expiry in the verified chain.
func (p *Proxy) verifyPeer(raw [][]byte, want string, usage x509.ExtKeyUsage, roots *x509.CertPool) (string, time.Time, error) {
	if len(raw) == 0 {
		return "", time.Time{}, &PeerError{"no_certificate", errors.New("peer sent no certificate")}
	}
	certs := make([]*x509.Certificate, 0, len(raw))
	for _, r := range raw {
		c, err := x509.ParseCertificate(r)
		if err != nil {
			return "", time.Time{}, &PeerError{"untrusted", fmt.Errorf("parse: %w", err)}
		}
		certs = append(certs, c)
	}
	leaf := certs[0]
	now := time.Now()
	if now.After(leaf.NotAfter) || now.Before(leaf.NotBefore) {
		return "", time.Time{}, &PeerError{"expired", fmt.Errorf("valid %s to %s", leaf.NotBefore.Format(time.RFC3339), leaf.NotAfter.Format(time.RFC3339))}
	}
	if roots == nil {
		// A nil pool is the system's roots to crypto/x509: any CA the
		// node trusts would vouch for a mesh identity
		// (TestNilRootsTrustNothing).
		return "", time.Time{}, &PeerError{"untrusted", errors.New("no trust bundle")}
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	chains, err := leaf.Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: inter,
		KeyUsages:     []x509.ExtKeyUsage{usage},
		CurrentTime:   now,
	})
	if err != nil {
		var inv x509.CertificateInvalidError
		if errors.As(err, &inv) && inv.Reason == x509.Expired {
			return "", time.Time{}, &PeerError{"expired", err}
		}
		return "", time.Time{}, &PeerError{"untrusted", err}
	}
	// A workload certificate must not be able to sign: chain
	// verification accepts a leaf that is a CA, and with its key the
	// workload could mint any identity of the trust domain. (The
	// X.509-SVID rules: leaf cA false, neither keyCertSign nor cRLSign.)
	if leaf.IsCA || leaf.KeyUsage&(x509.KeyUsageCertSign|x509.KeyUsageCRLSign) != 0 {
		return "", time.Time{}, &PeerError{"untrusted", errors.New("peer leaf certificate is a CA or may sign certificates")}
	}
	id, err := spiffeID(leaf)
	if err != nil {
		return "", time.Time{}, &PeerError{"bad_identity", err}
	}
	if td := trustDomainOf(id); td != p.cfg.Certificates.TrustDomain() {
		return "", time.Time{}, &PeerError{"foreign_trust_domain", fmt.Errorf("peer %s is not in trust domain %q", id, p.cfg.Certificates.TrustDomain())}
	}
	if want != "" && id != want {
		return "", time.Time{}, &PeerError{"wrong_identity", fmt.Errorf("peer is %s, want %s", id, want)}
	}
	until := leaf.NotAfter
	for _, c := range chains[0] {
		if c.NotAfter.Before(until) {
			until = c.NotAfter
		}
	}
	return id, until, nil
}

// peerState is what a handshake verified, kept for the connection's
// life. An HBONE connection carries new streams long after its handshake
// (pooled on the client, held by the client on the server), and
// crypto/tls never looks at the peer again: without a second look, a
// certificate that expired, or that a changed trust bundle no longer
// accepts (a root removed after a compromise), would keep getting new
// streams for as long as the connection is busy. recheck is that look,
// done before each new stream.
type peerState struct {
	want  string
	usage x509.ExtKeyUsage

	// client: the side that opens streams, which leaves the connection
	// ahead of the expiry (retireLead).
	client bool

	mu    sync.Mutex
	own   [][]byte       // our certificates as presented (client: rechecked too)
	chain [][]byte       // the peer's certificates as presented
	roots *x509.CertPool // the bundle they were last verified against
	since time.Time      // when the handshake verified the peer
	until time.Time      // earliest expiry: the peer's chain and our own certificate
	err   error          // once refused, refused for good
}

// maxRetireLead bounds how long before a certificate of a pooled
// connection expires the client stops opening streams on it (see
// retireLead).
const maxRetireLead = time.Minute

// retireLead is how early the client leaves a connection before its
// certificates expire: a quarter of the life they had at the handshake,
// at most maxRetireLead. Both ends stop at the same expiry (each side's
// until is the earliest of the same certificates), so a stream the
// client opened just before it reached the server just after, and was
// refused (401): the app's connection reset, once per busy connection
// at every rotation (the identity manager renews at half-life, the
// connection keeps the old certificates). Leaving ahead covers the
// round trip and the nodes' clock skew; a fraction of the life rather
// than a fixed time, so a connection dialed with a certificate close to
// its end (the CA unreachable) still carries streams for a while
// instead of being left at once and dialed again, and again.
func (ps *peerState) retireLead() time.Duration {
	if !ps.client || ps.since.IsZero() {
		return 0
	}
	return min(maxRetireLead, ps.until.Sub(ps.since)/4)
}

// ownCert notes when our certificate for this connection expires: a
// peer checks it only at the handshake, so we stop using the connection
// for new streams once it has.
func (ps *peerState) ownCert(c *tls.Certificate) {
	leaf := c.Leaf
	if leaf == nil && len(c.Certificate) > 0 {
		leaf, _ = x509.ParseCertificate(c.Certificate[0])
	}
	if leaf == nil {
		return
	}
	ps.mu.Lock()
	ps.own = c.Certificate
	if ps.until.IsZero() || leaf.NotAfter.Before(ps.until) {
		ps.until = leaf.NotAfter
	}
	ps.mu.Unlock()
}

// verify is the handshake's check; it records what passed.
func (ps *peerState) verify(p *Proxy, raw [][]byte) (string, error) {
	roots := p.cfg.Certificates.Roots()
	id, until, err := p.verifyPeer(raw, ps.want, ps.usage, roots)
	if err != nil {
		return "", err
	}
	ps.mu.Lock()
	ps.chain, ps.roots = raw, roots
	if ps.since.IsZero() {
		ps.since = time.Now()
	}
	if ps.until.IsZero() || until.Before(ps.until) {
		ps.until = until
	}
	ps.mu.Unlock()
	return id, nil
}

// recheck says whether a connection verified at its handshake may still
// carry a new stream: no certificate involved has expired (on the client,
// none expires within retireLead), and the peer's chain passes against
// the current bundle; on the client, our own chain too: the server
// refuses it (401) once it has the same bundle, and a stream sent
// meanwhile would reach it before its GOAWAY comes back. It costs a
// pointer compare unless the bundle changed since the last check; then
// the chains are verified again, once.
func (p *Proxy) recheck(ps *peerState, now time.Time) error {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	if ps.err != nil {
		return ps.err
	}
	if ps.chain == nil {
		return nil // not verified here (a test's bare connection)
	}
	if !now.Before(ps.until) {
		ps.err = &PeerError{"expired", fmt.Errorf("a certificate of this connection expired at %s", ps.until.Format(time.RFC3339))}
		return ps.err
	}
	if lead := ps.retireLead(); lead > 0 && !now.Add(lead).Before(ps.until) {
		ps.err = &PeerError{"expired", fmt.Errorf("a certificate of this connection expires at %s: the connection is left %s ahead, so no stream reaches the peer after it", ps.until.Format(time.RFC3339), lead)}
		return ps.err
	}
	roots := p.cfg.Certificates.Roots()
	if roots == ps.roots {
		return nil
	}
	if _, _, err := p.verifyPeer(ps.chain, ps.want, ps.usage, roots); err != nil {
		ps.err = err
		return err
	}
	if ps.client && ps.own != nil {
		if err := chainsTo(ps.own, roots, x509.ExtKeyUsageClientAuth); err != nil {
			ps.err = fmt.Errorf("our own certificate no longer verifies against the trust bundle (peers with it refuse it): %w", err)
			return ps.err
		}
	}
	ps.roots = roots
	return nil
}

// chainsTo verifies our own chain (leaf first) against roots for usage.
// Only when the bundle changed: our certificate passed the identity
// manager's checks when it was issued, the chain is all that can change.
func chainsTo(raw [][]byte, roots *x509.CertPool, usage x509.ExtKeyUsage) error {
	if len(raw) == 0 {
		return errors.New("no certificate")
	}
	if roots == nil {
		return errors.New("no trust bundle") // not the system's roots (verifyPeer)
	}
	leaf, err := x509.ParseCertificate(raw[0])
	if err != nil {
		return err
	}
	inter := x509.NewCertPool()
	for _, r := range raw[1:] {
		c, err := x509.ParseCertificate(r)
		if err != nil {
			return err
		}
		inter.AddCert(c)
	}
	_, err = leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{usage}})
	return err
}

// serverTLS is the 15008 TLS config of a pod: its own certificate, a
// client certificate required and checked (and recorded in ps).
func (p *Proxy) serverTLS(identity string, ps *peerState) *tls.Config {
	ps.usage = x509.ExtKeyUsageClientAuth
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		NextProtos: []string{"h2"},
		// We verify ourselves (below) to classify failures; requesting
		// rather than requiring lets "no certificate" be counted as such.
		ClientAuth: tls.RequestClientCert,
		GetCertificate: func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
			c, err := p.cfg.Certificates.Certificate(hello.Context(), identity)
			if err == nil {
				ps.ownCert(c)
			}
			return c, err
		},
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			_, err := ps.verify(p, raw)
			return err
		},
		// No resumption, here or in clientTLS (no session cache): a
		// resumed handshake skips VerifyPeerCertificate.
		SessionTicketsDisabled:      true,
		DynamicRecordSizingDisabled: true,
	}
}

// clientTLS is the config to reach dstID as srcID. No SNI is sent; the
// server's URI SAN must equal dstID. ps records what was verified.
func (p *Proxy) clientTLS(srcID, dstID string, ps *peerState) *tls.Config {
	ps.want, ps.usage, ps.client = dstID, x509.ExtKeyUsageServerAuth, true
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		NextProtos: []string{"h2"},
		// Hostname verification does not apply (SPIFFE identities);
		// VerifyPeerCertificate does the full chain and SAN check.
		InsecureSkipVerify: true,
		// The handshake's context (the dial's: connect timeout, the
		// pool's close), as serverTLS's: with one detached from it, a
		// certificate being fetched from an unreachable CA held the
		// dial past both (TestClientCertificateWaitEndsWithTheDial).
		GetClientCertificate: func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
			c, err := p.cfg.Certificates.Certificate(cri.Context(), srcID)
			if err == nil {
				ps.ownCert(c)
			}
			return c, err
		},
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			_, err := ps.verify(p, raw)
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
