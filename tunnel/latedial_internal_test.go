package tunnel

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// holdDial holds the pod's first pool dial in runDial once its
// handshake is done, before it takes the pool's lock (testDialDone):
// reached is closed once it is held there, release lets it go on.
func holdDial(t *testing.T) (reached <-chan struct{}, release func()) {
	r, rel := make(chan struct{}), make(chan struct{})
	var first, released sync.Once
	testDialDone = func() {
		first.Do(func() {
			close(r)
			<-rel
		})
	}
	release = func() { released.Do(func() { close(rel) }) }
	t.Cleanup(func() {
		release()
		testDialDone = nil
	})
	return r, release
}

// lateDial starts a dial of sv's pool to a pinger and holds it with its
// handshake done (holdDial): Close, closing the pool now, no longer
// cuts it short, and the dial's connection is discarded only when
// release lets it go on. dialed gets the caller's error.
func lateDial(t *testing.T) (p *Proxy, sv *Serving, pg *pinger, release func(), dialed <-chan error) {
	p, sv, key, peer := pingerPool(t)
	reached, release := holdDial(t)
	errs := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err := sv.pool.conn(ctx, key)
		errs <- err
	}()
	pg = peer()
	recv(t, reached, "the dial's handshake")
	return p, sv, pg, release, errs
}

// TestCloseWaitsForAPoolDialEndingAfterIt: a pool dial's handshake is
// done when the pod's Close closes the pool, but the dial has not yet
// taken the pool's lock to pool its connection. It then finds the pool
// closed and discards the connection with a clean close, which lingers
// while the peer sends. Close must wait for the dial and then for that
// linger: it saw no socket, returned, and the agent exiting then had
// the kernel reset the socket.
func TestCloseWaitsForAPoolDialEndingAfterIt(t *testing.T) {
	p, sv, pg, release, dialed := lateDial(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	res := closeInBackground(sv, ctx)
	if !pollUntil(true, sv.pool.closed) {
		t.Fatal("Close did not close the pod's pool within 10 s")
	}
	select {
	case err := <-res:
		release()
		got := pollUntil(1, func() float64 { return testutil.ToFloat64(p.m.lingering) })
		t.Fatalf("Close returned (%v) while the pool's dial was still to end; its connection, discarded once it did, lingers after Close (ambit_tunnel_lingering_connections = %v)", err, got)
	case <-time.After(holdWindow):
	}
	release()
	if err := <-dialed; !errors.Is(err, errPoolClosed) {
		t.Errorf("the dial's caller got %v, want %v", err, errPoolClosed)
	}
	closeWaitsForThePeer(t, p, sv, pg, res)
}

// TestCloseCutsAPoolDialEndingPastItsDeadline: the same dial ends only
// once Close's deadline has passed and Close has cut the pod's sockets.
// Its connection must be cut too, not closed cleanly: its linger, the
// peer sending, held Close (waiting unbounded for what it cut) until
// the linger's own bound, 10 x PingTimeout.
func TestCloseCutsAPoolDialEndingPastItsDeadline(t *testing.T) {
	p, sv, pg, release, dialed := lateDial(t)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	res := closeInBackground(sv, ctx)
	if !pollUntil(true, func() bool { cut, _ := sv.pool.socks.wasCut(); return cut }) {
		t.Fatal("Close did not cut the pod's sockets within 10 s")
	}
	release()
	select {
	case err := <-res:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Close = %v, want the deadline's error", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return 10 s after the dial's end: the dial's connection lingers past Close's deadline and Close waits for it")
	}
	if err := <-dialed; !errors.Is(err, errPoolClosed) {
		t.Errorf("the dial's caller got %v, want %v", err, errPoolClosed)
	}
	if got := testutil.ToFloat64(p.m.lingering); got != 0 {
		t.Errorf("ambit_tunnel_lingering_connections = %v once Close returned, want 0", got)
	}
	writeFails(t, pg, "the late dial's socket after Close's cut")
}
