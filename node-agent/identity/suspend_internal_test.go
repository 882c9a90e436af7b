package identity

import (
	"context"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"
)

// afterSuspend returns t as time.Now returns it after the machine slept
// for d: the wall clock d later, the monotonic reading unchanged (Go
// reads CLOCK_MONOTONIC on Linux, which stops during suspend). No API
// builds such a time, so it is written into time.Time's fields; the
// checks below catch a change of their layout.
func afterSuspend(t *testing.T, now time.Time, d time.Duration) time.Time {
	t.Helper()
	later := now.Add(d) // wall and monotonic reading both d later
	(*struct {
		wall uint64
		ext  int64 // the monotonic reading, when there is one
		loc  *time.Location
	})(unsafe.Pointer(&later)).ext -= int64(d)
	if later.Sub(now) != 0 || later.Round(0).Sub(now.Round(0)) != d {
		t.Fatalf("time.Time layout changed: cannot model a suspend (monotonic %s, wall %s)",
			later.Sub(now), later.Round(0).Sub(now.Round(0)))
	}
	return later
}

// A node suspended for 20 hours wakes with its 24 h certificates past
// half-life (4 h left): they must be renewed at Run's next turn, not once
// the monotonic clock, which did not move during the suspend, reaches
// their half-life, 12 h after the certificates expired.
func TestRenewalAfterSuspend(t *testing.T) {
	m, err := NewManager(Config{LocalCADir: t.TempDir(), TTL: 24 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	var slept atomic.Int64
	m.now = func() time.Time {
		now := time.Now()
		if d := time.Duration(slept.Load()); d > 0 {
			return afterSuspend(t, now, d)
		}
		return now
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = m.Run(ctx) }()
	defer func() { cancel(); <-done }()

	id, err := m.IdentityFor("shop", "web")
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Prefetch(id); err != nil {
		t.Fatal(err)
	}
	first, err := m.Certificate(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	slept.Store(int64(20 * time.Hour))
	m.wake() // the loop's next turn after the resume
	waitUntil(t, "the certificate to be renewed after the suspend", func() bool {
		m.mu.Lock()
		defer m.mu.Unlock()
		e := m.entries[id]
		return e.cert != nil && e.cert != first && e.inflight == nil
	})
	// Renewed once, not in a loop: the next rotation is ahead by the wall
	// clock too.
	m.mu.Lock()
	due := m.entries[id].due
	m.mu.Unlock()
	if !due.Round(0).After(m.now().Round(0)) {
		t.Fatalf("next rotation %s is not ahead of the resumed clock %s", due.Round(0), m.now().Round(0))
	}
}
