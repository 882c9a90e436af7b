package identity

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/ambit-mesh/ambit/node-agent/ca"
)

// RemoteConfig configures the HTTPS client of the CA service.
type RemoteConfig struct {
	// URL of the CA, e.g. https://ambit-ca.ambit-system.svc:15012.
	URL string
	// TokenFile is the projected service-account token (audience
	// "ambit-ca"); it is re-read for every request because the kubelet
	// rotates it. Token, when set, is used instead (tests).
	TokenFile string
	Token     func() (string, error)
	// RootsFile (PEM) or Roots: the trust bundle to verify the CA's
	// serving certificate before the first answer (mounted from the
	// ambit-ca-root ConfigMap). Afterwards every response's bundle is
	// trusted as well, so a root rotation does not lock the agent out.
	RootsFile string
	Roots     []*x509.Certificate
	// ServerName to verify in the CA's certificate; default the URL host.
	ServerName string
	// Timeout per request (default 10s).
	Timeout time.Duration
}

// RemoteSigner asks the CA service over HTTPS (TLS 1.3).
type RemoteSigner struct {
	cfg        RemoteConfig
	base       *url.URL
	serverName string
	client     *http.Client
	trusted    atomic.Pointer[x509.CertPool]
	bootstrap  []*x509.Certificate
}

// NewRemoteSigner checks cfg and builds the client.
func NewRemoteSigner(cfg RemoteConfig) (*RemoteSigner, error) {
	u, err := url.Parse(cfg.URL)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return nil, fmt.Errorf("identity: CA URL %q: want https://host[:port]", cfg.URL)
	}
	if cfg.Token == nil {
		if cfg.TokenFile == "" {
			return nil, errors.New("identity: TokenFile or Token required")
		}
		path := cfg.TokenFile
		cfg.Token = func() (string, error) {
			b, err := os.ReadFile(path)
			if err != nil {
				return "", fmt.Errorf("service-account token: %w", err)
			}
			return strings.TrimSpace(string(b)), nil
		}
	}
	roots := append([]*x509.Certificate(nil), cfg.Roots...)
	if cfg.RootsFile != "" {
		b, err := os.ReadFile(cfg.RootsFile)
		if err != nil {
			return nil, fmt.Errorf("identity: CA roots: %w", err)
		}
		r, err := ca.ParseCerts(b)
		if err != nil {
			return nil, fmt.Errorf("identity: CA roots %s: %w", cfg.RootsFile, err)
		}
		roots = append(roots, r...)
	}
	if len(roots) == 0 {
		return nil, errors.New("identity: no trust bundle for the CA (RootsFile or Roots)")
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 10 * time.Second
	}
	s := &RemoteSigner{cfg: cfg, base: u, serverName: cfg.ServerName, bootstrap: roots}
	if s.serverName == "" {
		s.serverName = u.Hostname()
	}
	s.setTrusted(nil)
	tr := &http.Transport{
		Proxy:               nil,
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		ForceAttemptHTTP2:   true,
		MaxIdleConnsPerHost: 4,
		IdleConnTimeout:     90 * time.Second,
		TLSHandshakeTimeout: 5 * time.Second,
		TLSClientConfig: &tls.Config{
			MinVersion: tls.VersionTLS13,
			ServerName: s.serverName,
			// Verification is ours (below) so that the set of trusted
			// roots can follow the bundle the CA hands out.
			InsecureSkipVerify: true,
			VerifyConnection:   s.verifyCA,
		},
	}
	s.client = &http.Client{Transport: tr, Timeout: cfg.Timeout}
	return s, nil
}

func (s *RemoteSigner) setTrusted(latest []*x509.Certificate) {
	p := x509.NewCertPool()
	for _, c := range s.bootstrap {
		p.AddCert(c)
	}
	for _, c := range latest {
		p.AddCert(c)
	}
	s.trusted.Store(p)
}

func (s *RemoteSigner) verifyCA(cs tls.ConnectionState) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("CA presented no certificate")
	}
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{
		DNSName: s.serverName, Roots: s.trusted.Load(), Intermediates: inter,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	if err != nil {
		return fmt.Errorf("CA certificate not trusted: %w", err)
	}
	return nil
}

// CAError is a refusal from the CA, with its reason word.
type CAError struct {
	Status int
	Reason ca.Reason
	Msg    string
}

func (e *CAError) Error() string {
	return fmt.Sprintf("CA refused (%d %s): %s", e.Status, e.Reason, e.Msg)
}

// Sign posts the CSR.
func (s *RemoteSigner) Sign(ctx context.Context, csrDER []byte, ttl time.Duration) ([]*x509.Certificate, []*x509.Certificate, error) {
	tok, err := s.cfg.Token()
	if err != nil {
		return nil, nil, err
	}
	body, _ := json.Marshal(ca.CertificateRequest{
		CSR:        string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csrDER})),
		TTLSeconds: int64((ttl + time.Second - 1) / time.Second),
	})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, s.base.JoinPath(ca.PathCertificates).String(), bytes.NewReader(body))
	if err != nil {
		return nil, nil, err
	}
	req.Header.Set("Authorization", "Bearer "+tok)
	req.Header.Set("Content-Type", "application/json")
	var resp ca.CertificateResponse
	if err := s.do(req, &resp); err != nil {
		return nil, nil, err
	}
	chain, err := ca.ParseCerts([]byte(resp.Chain))
	if err != nil || len(chain) == 0 {
		return nil, nil, fmt.Errorf("CA response: bad chain: %v", err)
	}
	roots, err := ca.ParseCerts([]byte(resp.Roots))
	if err != nil || len(roots) == 0 {
		return nil, nil, fmt.Errorf("CA response: bad roots: %v", err)
	}
	s.setTrusted(roots)
	return chain, roots, nil
}

// Roots fetches GET /v1/roots.
func (s *RemoteSigner) Roots(ctx context.Context) ([]*x509.Certificate, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.base.JoinPath(ca.PathRoots).String(), nil)
	if err != nil {
		return nil, err
	}
	var resp ca.RootsResponse
	if err := s.do(req, &resp); err != nil {
		return nil, err
	}
	roots, err := ca.ParseCerts([]byte(resp.Roots))
	if err != nil || len(roots) == 0 {
		return nil, fmt.Errorf("CA roots: bad bundle: %v", err)
	}
	s.setTrusted(roots)
	return roots, nil
}

// maxCAErrorMsg bounds the message of a CA's (or a proxy's) refusal
// kept in a CAError.
const maxCAErrorMsg = 1024

func (s *RemoteSigner) do(req *http.Request, out any) error {
	res, err := s.client.Do(req)
	if err != nil {
		return err
	}
	defer res.Body.Close()
	b, err := io.ReadAll(io.LimitReader(res.Body, 1<<20))
	if err != nil {
		return err
	}
	if res.StatusCode != http.StatusOK {
		var e ca.ErrorResponse
		_ = json.Unmarshal(b, &e)
		if e.Error == "" {
			e.Error = string(b)
		}
		// The body is a proxy's or load balancer's error page as often
		// as our CA's one-line answer: the error goes into every failed
		// fetch's log line and into status, so keep what says what
		// happened and drop the page.
		return &CAError{Status: res.StatusCode, Reason: ca.Reason(brief(string(e.Reason), 128)), Msg: brief(e.Error, maxCAErrorMsg)}
	}
	if err := json.Unmarshal(b, out); err != nil {
		return fmt.Errorf("CA response: %w", err)
	}
	return nil
}
