package identity_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/node-agent/identity"
)

// replicas is a CA of several replicas behind one address that disagree
// for a moment, as the Kubernetes CA's replicas do for up to a minute
// after its Secret changed (each re-reads it every minute): each request
// goes to the next replica in turn.
type replicas struct {
	signers []*identity.LocalSigner
	n       atomic.Int64 // requests
	signs   atomic.Int64
}

func (r *replicas) next() *identity.LocalSigner {
	return r.signers[int(r.n.Add(1))%len(r.signers)]
}

func (r *replicas) Sign(ctx context.Context, csr []byte, ttl time.Duration) ([]*x509.Certificate, []*x509.Certificate, error) {
	r.signs.Add(1)
	return r.next().Sign(ctx, csr, ttl)
}

func (r *replicas) Roots(ctx context.Context) ([]*x509.Certificate, error) {
	return r.next().Roots(ctx)
}

func authority(t *testing.T) *identity.LocalSigner {
	t.Helper()
	return &identity.LocalSigner{Authority: newAuthority(t)}
}

// Two CA replicas, one on the old root and one on the new (a root
// replaced at once; the Secret re-read by one replica and not yet by the
// other): every answer flips the bundle, and each flip leaves the
// certificates issued by the other replica not chaining to it. Renewing
// them at every flip fetched in a loop, as fast as the CA answered, for
// as long as the replicas disagreed.
func TestDisagreeingReplicasNoFetchLoop(t *testing.T) {
	r := &replicas{signers: []*identity.LocalSigner{authority(t), authority(t)}}
	m := startManager(t, identity.Config{TrustDomain: td, TTL: time.Hour, Signer: r})
	ids := []string{webID, dbID, "spiffe://cluster.local/ns/shop/sa/cache"}
	for _, id := range ids {
		if err := m.Prefetch(id); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range ids {
		if _, err := m.Certificate(context.Background(), id); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(2 * time.Second)
	// Three first fetches, then at most one renewal each for a bundle
	// that dropped its root: a few, not a loop.
	if n := r.signs.Load(); n > 4*int64(len(ids)) {
		t.Fatalf("%d certificate requests in 2 s for %d identities of 1 h: fetching in a loop", n, len(ids))
	} else {
		t.Logf("%d certificate requests", n)
	}
}

// switchable signs with old until the bundle is switched: then Roots
// answers new's bundle and every Sign waits for hold (signalling entered)
// and fails, or hangs until its context ends when hold is nil: a CA that
// publishes the new bundle but cannot sign, or signs slowly.
type switchable struct {
	old, new *identity.LocalSigner
	switched atomic.Bool
	entered  chan struct{}
	hold     chan error
	stop     chan struct{}
}

func newSwitchable(t *testing.T, hold chan error) *switchable {
	s := &switchable{old: authority(t), new: authority(t), entered: make(chan struct{}, 16), hold: hold, stop: make(chan struct{})}
	t.Cleanup(func() { close(s.stop) })
	return s
}

func (s *switchable) Sign(ctx context.Context, csr []byte, ttl time.Duration) ([]*x509.Certificate, []*x509.Certificate, error) {
	if !s.switched.Load() {
		return s.old.Sign(ctx, csr, ttl)
	}
	s.entered <- struct{}{}
	if s.hold == nil {
		select {
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		case <-s.stop:
			return nil, nil, context.Canceled
		}
	}
	select {
	case err := <-s.hold:
		return nil, nil, err
	case <-s.stop:
		return nil, nil, context.Canceled
	}
}

func (s *switchable) Roots(ctx context.Context) ([]*x509.Certificate, error) {
	if s.switched.Load() {
		return s.new.Roots(ctx)
	}
	return s.old.Roots(ctx)
}

// runManager starts a Manager on s (the bundle re-read every 50 ms) and
// returns it with webID's first certificate.
func runManager(t *testing.T, s identity.Signer, mod func(*identity.Config)) (*identity.Manager, *tls.Certificate) {
	t.Helper()
	cfg := identity.Config{TrustDomain: td, TTL: time.Hour, Signer: s, RootsRefresh: 50 * time.Millisecond}
	if mod != nil {
		mod(&cfg)
	}
	m := startManager(t, cfg)
	if err := m.Prefetch(webID); err != nil {
		t.Fatal(err)
	}
	c0, err := m.Certificate(context.Background(), webID)
	if err != nil {
		t.Fatal(err)
	}
	return m, c0
}

func waitEntered(t *testing.T, s *switchable, what string) {
	t.Helper()
	select {
	case <-s.entered:
	case <-time.After(10 * time.Second):
		t.Fatalf("no certificate request: %s", what)
	}
}

// The fetch started because the bundle dropped our certificate's root
// failed: the old certificate is served (peers that still trust its root
// accept it) and retried with backoff. A retry must not make callers wait
// again: they did, for every retry, as long as it took (the CA's timeout
// when it hangs), so a CA that keeps failing held every handshake of the
// identity most of the time.
func TestFailedRenewalRetriesDoNotBlock(t *testing.T) {
	s := newSwitchable(t, make(chan error))
	m, c0 := runManager(t, s, nil)
	s.switched.Store(true)
	waitEntered(t, s, "renewal at the bundle change")
	s.hold <- errors.New("CA unavailable")
	// Run retries after 0.5-1 s (backoff of a 1 h certificate).
	waitEntered(t, s, "retry")
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	c, err := m.Certificate(ctx, webID)
	if err != nil {
		t.Fatalf("Certificate during a retry of a failed renewal: %v (want the old certificate at once)", err)
	}
	if c != c0 {
		t.Fatal("not the old certificate")
	}
	s.hold <- errors.New("CA unavailable")
}

// A renewal at a bundle change that takes long (a CA that hangs, or 250
// identities renewed at once, 8 at a time, behind this one): Certificate
// waits for it only briefly, then serves the old certificate. It waited
// until the caller gave up: the tunnel's handshake (10 s) fails well before
// the fetch's timeout (30 s) ends, so the identity's every new connection
// failed, to peers that still trust the old root too.
func TestSlowRenewalBoundsTheWait(t *testing.T) {
	s := newSwitchable(t, nil)
	m, c0 := runManager(t, s, nil)
	s.switched.Store(true)
	waitEntered(t, s, "renewal at the bundle change")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	c, err := m.Certificate(ctx, webID)
	if err != nil {
		t.Fatalf("Certificate while the renewal hangs: %v after %s (want the old certificate)", err, time.Since(start).Round(time.Millisecond))
	}
	if c != c0 {
		t.Fatal("not the old certificate")
	}
	t.Logf("old certificate after %s", time.Since(start).Round(time.Millisecond))
}
