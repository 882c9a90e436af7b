package ca_test

import (
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/node-agent/ca"
	"github.com/ambit-mesh/ambit/node-agent/ca/catest"
)

// The TokenReview cache (one minute) must not outlive the token: a
// token that expired is refused at once, as the API server would refuse
// it, even when it was reviewed a moment before its expiry.
func TestCachedTokenRefusedOnceExpired(t *testing.T) {
	e := newEnv(t, nil)
	web := "spiffe://cluster.local/ns/shop/sa/web"
	tok := e.cluster.Token(t, "node-1", catest.TokenOptions{Lifetime: 2 * time.Second})
	// The exp claim is whole seconds, at most this.
	exp := time.Unix(time.Now().Add(2*time.Second).Unix(), 0)
	if r := e.ask(t, tok, web, 0); r.status != 200 {
		t.Fatalf("fresh token: %d %s", r.status, r.err.Error)
	}
	// Wait for the expiry itself (the condition, not a guess).
	for time.Now().Before(exp) {
		time.Sleep(50 * time.Millisecond)
	}
	r := e.ask(t, tok, web, 0)
	if r.status != 401 || r.err.Reason != ca.ReasonUnauthenticated {
		t.Fatalf("expired token within the cache minute: got %d %q, want 401 %q", r.status, r.err.Reason, ca.ReasonUnauthenticated)
	}
}
