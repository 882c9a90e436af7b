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
type Heartbeat struct {
	name  string
	grace time.Duration
	// last: unix nanoseconds of the last turn (0: never); due: by when
	// the next turn is due (0: none is).
	last, due atomic.Int64
}

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
	now := time.Now().UnixNano()
	h.last.Store(now)
	h.due.Store(now + int64(next))
}

// Rest records a turn now after which none is due: the loop waits for
// something that may never come, and waiting is not a stall.
func (h *Heartbeat) Rest() {
	h.last.Store(time.Now().UnixNano())
	h.due.Store(0)
}

// LastTurn is when the loop last turned (zero: never).
func (h *Heartbeat) LastTurn() time.Time {
	if n := h.last.Load(); n != 0 {
		return time.Unix(0, n)
	}
	return time.Time{}
}

// Check fails when the loop's turn was due more than Grace ago.
func (h *Heartbeat) Check() error {
	due := h.due.Load()
	if due == 0 {
		return nil
	}
	now := time.Now()
	late := now.Sub(time.Unix(0, due))
	if late <= h.grace {
		return nil
	}
	last := h.last.Load()
	return fmt.Errorf("stalled: last turned %s ago, %s past its due time (allowed %s)",
		round(now.Sub(time.Unix(0, last))), round(late), h.grace)
}

// round keeps an age readable: seconds, or milliseconds below ten
// seconds (tests use short bounds).
func round(d time.Duration) time.Duration {
	if d < 10*time.Second {
		return d.Round(time.Millisecond)
	}
	return d.Round(time.Second)
}
