package health

import (
	"fmt"
	"sync/atomic"
	"time"
)

// Heartbeat is the pulse of one of the agent's loops, for /healthz: the
// loop beats each time it turns, saying when its next turn is due, and
// the check fails once that due time is more than Grace past. A loop
// waiting for something that may legitimately never come (an event) is
// not due until it beats again with a due time.
//
// A failed liveness check makes the kubelet restart the agent, which
// resets every connection the node carries, so Grace is generous: a loop
// that is merely slow (a busy node, an API server that does not answer
// and the time-outs that bound each wait on it) must turn within it, and
// only one that does not turn at all (a deadlock, a lost wake-up) fails.
//
// Every comparison is on the monotonic clock (monoNow): the wall clock
// steps (NTP correcting a node that booted with a wrong time, a VM or
// laptop resumed from suspend, where CLOCK_MONOTONIC stands still and
// the wall clock jumps by the time asleep) and a step of minutes would
// make every loop look that late at once, or hide a stall.
type Heartbeat struct {
	name  string
	grace time.Duration
	// last: monoNow of the last turn (0: never); due: the monoNow by
	// which the next turn is due (0: none is).
	last, due atomic.Int64
}

// epoch anchors monoNow; time.Since reads the monotonic clock.
var epoch = time.Now()

// monoNow is the monotonic time since epoch, plus one so that 0 can mean
// "never" in a Heartbeat's fields.
func monoNow() int64 { return int64(time.Since(epoch)) + 1 }

// wallNow is read only to say when something happened (LastTurn, the
// metric), never to decide whether a loop is late; a variable so tests
// can step it, as NTP does.
var wallNow = time.Now

// NewHeartbeat returns the heartbeat of the loop called name; it is not
// due before its first Beat.
func NewHeartbeat(name string, grace time.Duration) *Heartbeat {
	return &Heartbeat{name: name, grace: grace}
}

// Name is the loop's name (the check's in /healthz, the metric's label).
func (h *Heartbeat) Name() string { return h.name }

// Grace is how long past its due time the loop may be before it counts
// as stalled.
func (h *Heartbeat) Grace() time.Duration { return h.grace }

// Beat records a turn now; the next is due within next (0: the loop is
// working and beats again as it makes progress, so it may take at most
// Grace).
func (h *Heartbeat) Beat(next time.Duration) {
	now := monoNow()
	h.last.Store(now)
	// At least 1: 0 would mean "not due" (next may be negative, a
	// turn already late).
	h.due.Store(max(now+int64(next), 1))
}

// Rest records a turn now after which none is due: the loop waits for
// something that may never come, and waiting is not a stall.
func (h *Heartbeat) Rest() {
	h.last.Store(monoNow())
	h.due.Store(0)
}

// Expect makes the loop's next turn due within next without recording a
// turn: the loop has started work (or started it again after resting)
// whose first turn has not come yet, and one that never comes is a
// stall too. Beat before the first turn would say the loop turned when
// it has not; waiting for the first turn to make it due would never
// catch a loop broken from the start.
func (h *Heartbeat) Expect(next time.Duration) {
	h.due.Store(max(monoNow()+int64(next), 1))
}

// LastTurn is when the loop last turned (zero: never): now on the wall
// clock less its age on the monotonic one, so that now minus it is the
// loop's real age even after the wall clock stepped.
func (h *Heartbeat) LastTurn() time.Time {
	if n := h.last.Load(); n != 0 {
		return wallNow().Add(-time.Duration(monoNow() - n))
	}
	return time.Time{}
}

// Age is how long ago the loop last turned (ok false: never).
func (h *Heartbeat) Age() (d time.Duration, ok bool) {
	if n := h.last.Load(); n != 0 {
		return time.Duration(monoNow() - n), true
	}
	return 0, false
}

// Check fails when the loop's turn was due more than Grace ago.
func (h *Heartbeat) Check() error {
	due := h.due.Load()
	if due == 0 {
		return nil
	}
	now := monoNow()
	late := time.Duration(now - due)
	if late <= h.grace {
		return nil
	}
	last := h.last.Load()
	if last == 0 {
		return fmt.Errorf("stalled: never turned, %s past its due time (allowed %s)", round(late), h.grace)
	}
	return fmt.Errorf("stalled: last turned %s ago, %s past its due time (allowed %s)",
		round(time.Duration(now-last)), round(late), h.grace)
}

// round keeps an age readable: seconds, or milliseconds below ten
// seconds (tests use short bounds).
func round(d time.Duration) time.Duration {
	if d < 10*time.Second {
		return d.Round(time.Millisecond)
	}
	return d.Round(time.Second)
}
