package identity

import (
	"context"
	"sync/atomic"
	"testing"
	"time"
)

// An NTP step puts the wall clock back an hour after a certificate's
// rotation was scheduled. Run judges rotation by the wall clock, so the
// certificate is not due for another hour; the loop must sleep until
// then, not wake on the monotonic clock's schedule and, finding nothing
// due, turn again at once, spinning a core for the hour.
func TestNoSpinAfterClockStepsBack(t *testing.T) {
	var turns atomic.Int64
	m, err := NewManager(Config{LocalCADir: t.TempDir(), TTL: 24 * time.Hour,
		OnTurn: func(time.Time) { turns.Add(1) }})
	if err != nil {
		t.Fatal(err)
	}
	id, err := m.IdentityFor("shop", "web")
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Prefetch(id); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := m.Certificate(ctx, id); err != nil {
		t.Fatal(err)
	}
	// Scheduled (by the clock before the step) 200 ms from now.
	due := time.Now().Add(200 * time.Millisecond)
	m.mu.Lock()
	m.entries[id].due = due
	m.mu.Unlock()
	m.now = func() time.Time { return afterSuspend(t, time.Now(), -time.Hour) }

	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); _ = m.Run(ctx) }()
	defer func() { cancel(); <-done }()
	waitUntil(t, "the first turn", func() bool { return turns.Load() > 0 })
	// Past the monotonic schedule: a loop keyed to it has woken and,
	// nothing being due by the wall clock, turned again and again.
	waitUntil(t, "the old schedule to pass", func() bool { return time.Since(due) > 300*time.Millisecond })
	if n := turns.Load(); n > 3 {
		t.Fatalf("Run turned %d times in half a second with nothing due for an hour", n)
	}
	m.mu.Lock()
	renewed := m.entries[id].inflight != nil || m.entries[id].due != due
	m.mu.Unlock()
	if renewed {
		t.Fatal("renewed an hour early by the wall clock")
	}
}
