package tunnel

import (
	"context"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/tunnel/hbone"
)

// A pool's clean close keeps its deadline however many of its
// connections wait on their peers. Three pooled connections each carry
// an upload whose writer is blocked on a full socket, their peer alive
// but not reading: each clean close waits a second for that write
// (hbone's close write wait, no link progress). One after another, and
// with no deadline, the pool's close took three seconds and more, which
// at an agent's drain ran past DrainTimeout; now they close at once and
// what is still closing at the deadline is cut.
func TestPoolCloseKeepsItsDeadline(t *testing.T) {
	p := stallProxy(t)
	pl := newPool(p, &smallSendNet{})
	defer pl.close()
	const n = 3
	var stalled []*hbone.Conn
	for i := 0; i < n; i++ {
		stalled = append(stalled, stallPooledUpload(t, p, pl))
	}

	const deadline = 300 * time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()
	start := time.Now()
	inTime := pl.closeWithin(ctx)
	took := time.Since(start)
	t.Logf("the pool's close took %v with a %v deadline", took.Round(time.Millisecond), deadline)
	if inTime {
		t.Error("closeWithin said every close ended in time, though each waited on a stalled write past the deadline")
	}
	for i, c := range stalled {
		select {
		case <-c.Done():
		default:
			t.Errorf("connection %d still open when the pool's close returned", i)
		}
	}
	// Well under one close's own second of waiting: a bound on the cut
	// running late, not a measure of speed.
	if took > deadline+500*time.Millisecond {
		t.Errorf("the pool's close took %v with a %v deadline and %d connections each waiting on a stalled write: not held to its deadline", took.Round(time.Millisecond), deadline, n)
	}
}
