package identity

import (
	"context"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/node-agent/health"
)

// Run reports each turn of its loop (OnTurn) with when the next is due,
// so the agent's /healthz fails when the loop stops turning (here: it
// cannot take its lock) and passes again once it turns, while certificates
// would otherwise silently run out.
func TestRunReportsItsTurns(t *testing.T) {
	hb := health.NewHeartbeat("certificates", 200*time.Millisecond)
	m, err := NewManager(Config{LocalCADir: t.TempDir(), RootsRefresh: 50 * time.Millisecond,
		OnTurn: func(next time.Time) { hb.Beat(time.Until(next)) }})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); m.Run(ctx) }()
	defer func() { cancel(); <-done }()

	waitUntil(t, "the first turn", func() bool { return !hb.LastTurn().IsZero() })
	time.Sleep(400 * time.Millisecond) // turning every 50 ms: never late
	if err := hb.Check(); err != nil {
		t.Fatalf("a loop turning on time: %v", err)
	}
	m.mu.Lock()
	waitUntil(t, "the stalled loop to fail its check", func() bool { return hb.Check() != nil })
	m.mu.Unlock()
	waitUntil(t, "the loop to pass again", func() bool { return hb.Check() == nil })
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}
