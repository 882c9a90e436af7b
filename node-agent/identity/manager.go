package identity

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambit-mesh/ambit/node-agent/ca"
)

// Config configures a Manager. Exactly one way to reach a CA: Signer, or
// Remote (Kubernetes mode, HTTPS CA service), or LocalCADir (static mode,
// in-process CA whose files live in the agent's state directory).
type Config struct {
	// TrustDomain of the mesh (default "cluster.local").
	TrustDomain string
	// TTL asked for workload certificates (default 24h; the CA may cap it).
	TTL time.Duration

	Signer     Signer
	Remote     *RemoteConfig
	LocalCADir string

	// RootsRefresh: how often the trust bundle is re-read from the CA
	// besides every issuance (default 5m).
	RootsRefresh time.Duration
	// Concurrency bounds simultaneous requests to the CA (default 8).
	Concurrency int
	// FetchTimeout bounds one request (default 30s).
	FetchTimeout time.Duration
	Logger       *slog.Logger
	// Registerer receives the manager's metrics; nil means none.
	Registerer prometheus.Registerer
	// OnTurn, if set, is called each time Run's loop turns, with when
	// it turns next at the latest: a liveness heartbeat (a loop that
	// stopped turning lets the node's certificates expire).
	OnTurn func(next time.Time)
}

// Manager keeps one certificate per workload identity of the node, in
// memory only, and the trust bundle. It implements tunnel.Certificates.
type Manager struct {
	cfg    Config
	signer Signer
	log    *slog.Logger
	sem    chan struct{}
	wakeCh chan struct{}

	mu      sync.Mutex
	entries map[string]*entry

	roots atomic.Pointer[rootSet]

	fetches *prometheus.CounterVec

	// now is time.Now; a test replaces it to model a suspended machine.
	now func() time.Time
}

type entry struct {
	id       string
	refs     int // Prefetch minus Forget; 0 = fetched on demand only
	cert     *tls.Certificate
	notAfter time.Time
	due      time.Time // next rotation or retry
	failures int
	lastErr  error
	lastFail time.Time
	inflight chan struct{} // closed when the running fetch ends
	// stale: cert no longer chains to the bundle (its root was removed)
	// and the fetch started for it at the change runs; Certificate waits
	// for that fetch, at most staleWait. Cleared when it ends, failed or
	// not: Run's retries of a failed one do not make callers wait.
	stale bool
	// staleAt: when the last fetch for a bundle change started;
	// renewAt: a renewal held back by staleGap (zero: none).
	staleAt, renewAt time.Time
}

// staleWait bounds how long Certificate waits for the fetch of a
// certificate whose root left the bundle before it serves the old one.
// A CA answers in milliseconds (tens when loaded); a fetch still running
// after this is queued behind many (every certificate of the node is
// renewed at once, Concurrency at a time) or the CA struggles, and a
// caller waiting longer would reach the tunnel's handshake timeout (10 s)
// before the fetch's own (30 s): an error for certain, where the old
// certificate is still accepted by every peer that has not yet refreshed
// its bundle.
const staleWait = 2 * time.Second

// staleGap: a certificate is renewed for a bundle change at most once in
// this time; a later change within it schedules the renewal at its end.
// The Kubernetes CA's replicas re-read its Secret every minute, so for up
// to a minute after a root change they answer with different bundles:
// each answer flipped the bundle, each flip left the certificates of the
// other replica not chaining to it, and renewing them at once fetched in
// a loop as fast as the CA answered (TestDisagreeingReplicasNoFetchLoop:
// 809 requests in 2 s for 3 identities). A minute also puts the held-back
// renewal after the replicas agree.
const staleGap = time.Minute

type rootSet struct {
	certs []*x509.Certificate
	pool  *x509.CertPool
	key   string
}

// NewManager checks cfg and returns a Manager. It does no network I/O;
// call Run to rotate in the background.
func NewManager(cfg Config) (*Manager, error) {
	if cfg.TrustDomain == "" {
		cfg.TrustDomain = "cluster.local"
	}
	if err := ca.ValidateTrustDomain(cfg.TrustDomain); err != nil {
		return nil, fmt.Errorf("identity: %w", err)
	}
	if cfg.TTL <= 0 {
		cfg.TTL = ca.DefaultTTL
	}
	if cfg.TTL < time.Second {
		return nil, fmt.Errorf("identity: TTL %s shorter than a second", cfg.TTL)
	}
	if cfg.RootsRefresh <= 0 {
		cfg.RootsRefresh = 5 * time.Minute
	}
	if cfg.Concurrency <= 0 {
		cfg.Concurrency = 8
	}
	if cfg.FetchTimeout <= 0 {
		cfg.FetchTimeout = 30 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	signer := cfg.Signer
	n := 0
	for _, set := range []bool{cfg.Signer != nil, cfg.Remote != nil, cfg.LocalCADir != ""} {
		if set {
			n++
		}
	}
	if n != 1 {
		return nil, errors.New("identity: set exactly one of Signer, Remote, LocalCADir")
	}
	var err error
	switch {
	case cfg.Remote != nil:
		if signer, err = NewRemoteSigner(*cfg.Remote); err != nil {
			return nil, err
		}
	case cfg.LocalCADir != "":
		if signer, err = NewLocalSigner(cfg.LocalCADir, cfg.TrustDomain); err != nil {
			return nil, err
		}
	}
	m := &Manager{cfg: cfg, signer: signer, log: cfg.Logger.With("component", "identity"),
		sem: make(chan struct{}, cfg.Concurrency), wakeCh: make(chan struct{}, 1), entries: map[string]*entry{},
		fetches: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ambit_identity_certificate_fetches_total", Help: "Workload certificate requests to the CA, by result."}, []string{"result"}),
		now: time.Now,
	}
	// Seed the bundle with what is known without asking: an empty pool,
	// never nil (nil would mean the system roots to crypto/tls).
	m.roots.Store(&rootSet{pool: x509.NewCertPool()})
	switch s := signer.(type) {
	case *RemoteSigner:
		m.setRoots(s.bootstrap)
	case *LocalSigner:
		m.setRoots(s.Authority.Material().Roots)
	}
	if cfg.Registerer != nil {
		held := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "ambit_identity_certificates", Help: "Workload identities with a valid certificate."},
			func() float64 { return float64(m.valid()) })
		for _, c := range []prometheus.Collector{m.fetches, held} {
			if err := cfg.Registerer.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return m, nil
}

// TrustDomain is the mesh's trust domain.
func (m *Manager) TrustDomain() string { return m.cfg.TrustDomain }

// Roots is the current trust bundle (all roots of the last answer from the
// CA: old and new side by side during a root rotation). The pool is shared:
// do not modify it.
func (m *Manager) Roots() *x509.CertPool { return m.roots.Load().pool }

// RootCertificates returns the current bundle as certificates.
func (m *Manager) RootCertificates() []*x509.Certificate { return m.roots.Load().certs }

func (m *Manager) setRoots(certs []*x509.Certificate) {
	if len(certs) == 0 {
		return
	}
	key := string(ca.EncodeCerts(certs))
	// Under mu, the bundle and the stale marks change together: whoever
	// sees the new bundle and then asks for a certificate gets one that
	// chains to it (or waits for it).
	m.mu.Lock()
	defer m.mu.Unlock()
	if old := m.roots.Load(); old.key == key {
		return
	}
	p := x509.NewCertPool()
	for _, c := range certs {
		p.AddCert(c)
	}
	m.roots.Store(&rootSet{certs: certs, pool: p, key: key})
	n := m.renewUntrustedLocked(p)
	m.log.Info("trust bundle updated", "roots", len(certs), "certificates_renewed", n)
}

// renewUntrustedLocked starts a fetch for every certificate that does
// not chain to roots: its root left the bundle (a compromised root
// dropped without waiting for its certificates to expire). Every peer
// with the new bundle refuses such a certificate, and rotation would
// replace it only at half-life. It returns how many it started. A
// verification per held certificate, only when the bundle changes.
func (m *Manager) renewUntrustedLocked(roots *x509.CertPool) int {
	n, now := 0, time.Now()
	for _, e := range m.entries {
		// An expired one is fetched anyway (Run, or the next
		// Certificate).
		if e.cert == nil || !now.Before(e.notAfter) || chainsTo(e.cert, roots) {
			continue
		}
		switch {
		case e.inflight != nil:
			e.stale = true
		case now.Sub(e.staleAt) < staleGap:
			// Renewed for a bundle change a moment ago: CA replicas
			// that disagree (see staleGap). Held back, not waited for.
			if at := e.staleAt.Add(staleGap); e.renewAt.IsZero() || at.Before(e.renewAt) {
				e.renewAt = at
			}
			m.wake()
		default:
			e.stale, e.staleAt = true, now
			m.startLocked(e)
		}
		n++
	}
	return n
}

// chainsTo says whether c verifies against roots (with its own
// intermediates), for either use.
func chainsTo(c *tls.Certificate, roots *x509.CertPool) bool {
	if c.Leaf == nil {
		return false
	}
	inter := x509.NewCertPool()
	for _, raw := range c.Certificate[1:] {
		ic, err := x509.ParseCertificate(raw)
		if err != nil {
			return false
		}
		inter.AddCert(ic)
	}
	_, err := c.Leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth}})
	return err == nil
}

// IdentityFor renders the SPIFFE ID of a service account in this trust domain.
func (m *Manager) IdentityFor(namespace, serviceAccount string) (string, error) {
	id, err := ca.NewID(m.cfg.TrustDomain, namespace, serviceAccount)
	if err != nil {
		return "", err
	}
	return id.String(), nil
}

func (m *Manager) checkID(identity string) error {
	id, err := ca.ParseID(identity)
	if err != nil {
		return fmt.Errorf("identity: %w", err)
	}
	if id.TrustDomain != m.cfg.TrustDomain {
		return fmt.Errorf("identity: %s is not in trust domain %s", identity, m.cfg.TrustDomain)
	}
	return nil
}

// Prefetch pins identity (a pod using it was enrolled) and fetches its
// certificate in the background so the pod's first connection does not
// wait. Pinned identities are rotated by Run. Calls nest: each Prefetch
// needs one Forget.
func (m *Manager) Prefetch(identity string) error {
	if err := m.checkID(identity); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	e := m.entryLocked(identity)
	e.refs++
	if e.cert == nil && e.inflight == nil {
		m.startLocked(e)
	}
	return nil
}

// Forget drops one pin of identity (a pod using it left the node). When no
// pod on the node uses it any more, its certificate and key are dropped.
func (m *Manager) Forget(identity string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	e, ok := m.entries[identity]
	if !ok {
		return
	}
	if e.refs--; e.refs <= 0 {
		delete(m.entries, identity)
	}
}

func (m *Manager) entryLocked(identity string) *entry {
	e, ok := m.entries[identity]
	if !ok {
		e = &entry{id: identity}
		m.entries[identity] = e
	}
	return e
}

// retryGap: after a failed fetch with no valid certificate, handshakes
// within this gap get the error instead of hammering the CA again.
const retryGap = 200 * time.Millisecond

// Certificate returns the current certificate of identity, fetching it if
// there is none or it expired. A certificate past its rotation time but
// still valid is returned as is (rotation runs in the background), which
// is what makes a CA outage shorter than the remaining lifetime invisible.
// One that no longer chains to the bundle waits for the fetch started at
// the bundle change; if that fetch failed, it is returned as is too
// (peers that still trust its root accept it; Run retries).
func (m *Manager) Certificate(ctx context.Context, identity string) (*tls.Certificate, error) {
	m.mu.Lock()
	e, ok := m.entries[identity]
	if !ok {
		if err := m.checkID(identity); err != nil {
			m.mu.Unlock()
			return nil, err
		}
		e = m.entryLocked(identity)
	}
	// old: a valid certificate whose renewal for a bundle change runs;
	// served if that takes longer than staleWait.
	var old *tls.Certificate
	if c := e.cert; c != nil && time.Now().Before(e.notAfter) {
		if !(e.stale && e.inflight != nil) {
			m.mu.Unlock()
			return c, nil
		}
		old = c
	}
	ch := e.inflight
	if ch == nil {
		if e.lastErr != nil && time.Since(e.lastFail) < retryGap {
			err := e.lastErr
			m.mu.Unlock()
			return nil, err
		}
		ch = m.startLocked(e)
	}
	m.mu.Unlock()
	var bound <-chan time.Time
	if old != nil {
		t := time.NewTimer(staleWait)
		defer t.Stop()
		bound = t.C
	}
	select {
	case <-ch:
	case <-bound:
		return old, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("identity: waiting for the certificate of %s: %w", identity, ctx.Err())
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if c := e.cert; c != nil && time.Now().Before(e.notAfter) {
		return c, nil
	}
	if e.lastErr != nil {
		return nil, e.lastErr
	}
	return nil, fmt.Errorf("identity: no certificate for %s", identity)
}

func (m *Manager) startLocked(e *entry) chan struct{} {
	ch := make(chan struct{})
	e.inflight = ch
	go m.fetch(e, ch)
	return ch
}

func (m *Manager) fetch(e *entry, done chan struct{}) {
	m.sem <- struct{}{}
	ctx, cancel := context.WithTimeout(context.Background(), m.cfg.FetchTimeout)
	cert, roots, err := m.issue(ctx, e.id)
	cancel()
	<-m.sem
	now := m.now()
	if err == nil {
		m.setRoots(roots)
		m.fetches.WithLabelValues("ok").Inc()
	} else {
		m.fetches.WithLabelValues("error").Inc()
	}
	m.mu.Lock()
	e.inflight, e.stale, e.renewAt = nil, false, time.Time{}
	if err == nil {
		e.cert, e.notAfter, e.failures, e.lastErr = cert, cert.Leaf.NotAfter, 0, nil
		e.due = now.Add(rotateAfter(e.notAfter.Sub(now)))
	} else {
		e.failures++
		e.lastErr, e.lastFail = err, now
		var remaining time.Duration
		if e.cert != nil {
			remaining = e.notAfter.Sub(now)
		}
		wait := backoff(e.failures, m.cfg.TTL, remaining)
		e.due = now.Add(wait)
		m.log.Warn("workload certificate fetch failed", "identity", e.id, "err", err,
			"failures", e.failures, "retryIn", wait.Round(time.Millisecond), "validFor", remaining.Round(time.Second))
	}
	m.mu.Unlock()
	close(done)
	m.wake()
}

// rotateAfter: at half of the remaining lifetime, minus up to a tenth of it
// as jitter so the pods of a node (and the nodes of a cluster) spread out.
func rotateAfter(life time.Duration) time.Duration {
	if life <= 0 {
		return 0
	}
	half := life / 2
	return half - time.Duration(mrand.Int64N(int64(life/10)+1))
}

// backoff grows exponentially from a base tied to the certificate lifetime
// (1s for long-lived ones, shorter for short-lived) up to 150s, never more
// than a quarter of what remains of a still-valid certificate, jittered
// between half and all of that.
func backoff(failures int, ttl, remaining time.Duration) time.Duration {
	base := min(max(ttl/20, 100*time.Millisecond), time.Second)
	d := base << min(failures-1, 16)
	d = min(d, 150*time.Second)
	if remaining > 0 {
		d = min(d, max(remaining/4, 100*time.Millisecond))
	}
	return d/2 + time.Duration(mrand.Int64N(int64(d/2)+1))
}

// issue makes a key and CSR, has it signed and checks the answer: the
// leaf must carry our key and exactly the identity asked for, and chain to
// the returned roots, or peers would refuse it anyway.
func (m *Manager) issue(ctx context.Context, identity string) (*tls.Certificate, []*x509.Certificate, error) {
	u, err := url.Parse(identity)
	if err != nil {
		return nil, nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{u}}, key)
	if err != nil {
		return nil, nil, err
	}
	chain, roots, err := m.signer.Sign(ctx, csr, m.cfg.TTL)
	if err != nil {
		return nil, nil, fmt.Errorf("identity: certificate for %s: %w", identity, err)
	}
	if len(chain) == 0 || len(roots) == 0 {
		return nil, nil, fmt.Errorf("identity: certificate for %s: empty chain or roots", identity)
	}
	leaf := chain[0]
	if !key.PublicKey.Equal(leaf.PublicKey) {
		return nil, nil, fmt.Errorf("identity: CA returned a certificate for another key (%s)", identity)
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != identity {
		return nil, nil, fmt.Errorf("identity: CA returned a certificate for %v, asked for %s", leaf.URIs, identity)
	}
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth}}); err != nil {
		return nil, nil, fmt.Errorf("identity: certificate for %s does not verify against the CA's roots: %w", identity, err)
	}
	tc := &tls.Certificate{PrivateKey: key, Leaf: leaf}
	for _, c := range chain {
		tc.Certificate = append(tc.Certificate, c.Raw)
	}
	return tc, roots, nil
}

func (m *Manager) wake() {
	select {
	case m.wakeCh <- struct{}{}:
	default:
	}
}

func (m *Manager) valid() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	now, n := time.Now(), 0
	for _, e := range m.entries {
		if e.cert != nil && now.Before(e.notAfter) {
			n++
		}
	}
	return n
}

// Run rotates pinned certificates at half life (retrying with backoff),
// drops unpinned ones once expired, and refreshes the trust bundle every
// RootsRefresh, until ctx ends.
func (m *Manager) Run(ctx context.Context) error {
	timer := time.NewTimer(0)
	defer timer.Stop()
	nextRoots := time.Now().Add(m.cfg.RootsRefresh)
	for {
		// Wall clock only (Round(0) drops the monotonic reading, and a
		// comparison with a time that has none uses the wall clock):
		// Go's monotonic clock stops while the machine is suspended, so
		// after a night in suspend a certificate past half-life, even
		// past its end, looked hours from due. Certificates expire by
		// the wall clock.
		now := m.now().Round(0)
		next := nextRoots
		m.mu.Lock()
		for id, e := range m.entries {
			if e.inflight != nil {
				continue
			}
			due := e.due
			if e.refs <= 0 {
				if e.cert == nil || !now.Before(e.notAfter) {
					delete(m.entries, id)
					continue
				}
				// Not rotated (fetched on demand), but a renewal held
				// back for a bundle change is due.
				if e.renewAt.IsZero() {
					continue
				}
				due = e.renewAt
			} else if !e.renewAt.IsZero() && e.renewAt.Before(due) {
				due = e.renewAt
			}
			if !due.After(now) {
				m.startLocked(e)
				continue
			}
			if due.Before(next) {
				next = due
			}
		}
		m.mu.Unlock()
		if !nextRoots.After(now) {
			nextRoots = now.Add(m.cfg.RootsRefresh)
			go m.refreshRoots(ctx)
			if nextRoots.Before(next) {
				next = nextRoots
			}
		}
		// The sleep is measured on the clock the due times were judged
		// by: time.Until(next) would use next's monotonic reading, and
		// after the wall clock stepped back the timer would fire with
		// nothing due by the wall clock, and again at once, in a loop.
		sleep := next.Sub(now)
		if m.cfg.OnTurn != nil {
			m.cfg.OnTurn(time.Now().Add(sleep))
		}
		timer.Reset(sleep)
		select {
		case <-ctx.Done():
			return nil
		case <-timer.C:
		case <-m.wakeCh:
			if !timer.Stop() {
				select {
				case <-timer.C:
				default:
				}
			}
		}
	}
}

func (m *Manager) refreshRoots(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, m.cfg.FetchTimeout)
	defer cancel()
	roots, err := m.signer.Roots(ctx)
	if err != nil {
		m.log.Warn("trust bundle refresh failed; keeping the current one", "err", err)
		return
	}
	m.setRoots(roots)
}
