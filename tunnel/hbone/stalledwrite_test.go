package hbone

import (
	"context"
	"errors"
	"testing"
	"time"
)

// TestOpenStreamWaitsForStalledWritesNoLongerThanItsContext: while
// another writer holds the connection's write lock (blocked in a write to
// a dead peer's full socket buffer), a new stream gives up when its
// context ends, sends nothing, and leaves the lock and the connection
// usable once the writer moves on. Before OpenStreamDataContext, a new
// stream waited for the lock until keepalive closed the connection (20 to
// 40 s; unbounded with keepalive off), past the tunnel's connect timeout.
func TestOpenStreamWaitsForStalledWritesNoLongerThanItsContext(t *testing.T) {
	c, _ := serve(t, Config{PingInterval: -1}, echoHandler)
	c.wmu.Lock() // the stalled writer
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	// (Before, this call waited for the lock: the test hung.)
	s, _, err := c.OpenStreamDataContext(ctx, "10.0.0.1:80", nil, []byte("x"))
	if err == nil || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("new stream while the writes are stalled: %v, %v; want the context's deadline", s, err)
	}
	c.wmu.Unlock() // the writer moves on
	s, _, err = c.OpenStreamDataContext(context.Background(), "10.0.0.1:80", nil, nil)
	if err != nil {
		t.Fatalf("a stream after the writer moved on: %v", err)
	}
	if st, _, err := s.Response(context.Background()); err != nil || st != 200 {
		t.Fatalf("its response: %d %v", st, err)
	}
	s.Close()
}
