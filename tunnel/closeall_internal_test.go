package tunnel

import (
	"context"
	"testing"

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

	closesByItsDeadline(t, "the pool's close", stalled, func(ctx context.Context) error {
		if pl.closeWithin(ctx) {
			return nil // said in time: wrong, each waited past the deadline
		}
		return ctx.Err()
	})
}
