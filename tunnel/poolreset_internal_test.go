package tunnel

import (
	"context"
	"testing"
	"time"
)

// TestResetReachesARetiringConnection: shutdownIdle (an unenrollment)
// took a connection out of the pool on which a caller had just opened a
// stream, so it is shutting down, spared until that stream ends, when
// the pod's network goes (its DEL: Abort, pool.reset). reset must reach
// it as it reaches the pooled ones: out of the pool, it was closed only
// once its stream ended, gracefully (close_notify, written under its own
// 5 s deadline to a peer that may not read, then a FIN), or not at all
// while the stream lived. Connections a recheck retires (ahead of a
// certificate's expiry) and the janitor's are out of the pool the same
// way.
func TestResetReachesARetiringConnection(t *testing.T) {
	_, pl, c, opened := pickedThenOpened(t)
	bound, stop := context.WithTimeout(context.Background(), 100*time.Millisecond)
	pl.shutdownIdle(bound)
	stop()
	s := opened()
	if s == nil {
		t.Fatal("no stream opened in the window: the test did not set up its case")
	}
	select {
	case <-c.Done():
		t.Fatal("the connection closed with its stream open: the test did not set up its case")
	default:
	}

	pl.reset()
	select {
	case <-c.Done():
	case <-time.After(3 * time.Second):
		t.Fatal("the connection shutting down with a stream is still open after the pool's reset")
	}
	// Its stream fails with it.
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if _, _, err := s.Response(ctx); err == nil {
		if _, err = s.Read(make([]byte, 1)); err == nil {
			t.Fatal("the stream still reads after the pool's reset")
		}
	}
}
