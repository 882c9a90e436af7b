package tunnel

import (
	"context"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/tunnel/hbone"
)

// TestShutdownIdleSparesAStreamOpenedMeanwhile: at a pod's DEL (or its
// unenrollment, when the pod and its network stay) shutdownIdle takes
// the pooled connections that carry no stream and shuts them down,
// bounded by its context (the agent's 500 ms). A caller whose pick
// returned one of them just before may open a stream on it after the
// selection and before the GOAWAY: that stream is spared by the GOAWAY
// and must run to its end. Shutdown(ctx) closed the connection at the
// bound, and the stream (an app's new connection, on a pod that stays
// when it is only unenrolled) was cut 500 ms after it opened.
// testEvictSelected holds the window open; real sockets and TLS on
// loopback, our HBONE on both sides.
func TestShutdownIdleSparesAStreamOpenedMeanwhile(t *testing.T) {
	_, pl, c, opened := pickedThenOpened(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	bound, stop := context.WithTimeout(context.Background(), 100*time.Millisecond)
	pl.shutdownIdle(bound)
	<-bound.Done() // past the bound, whenever shutdownIdle returned
	stop()
	s := opened()
	if s == nil {
		t.Fatal("no stream opened in the window: the test did not set up its case")
	}
	if st, _, err := s.Response(ctx); err != nil || st != 200 {
		t.Fatalf("response %d, %v", st, err)
	}
	if _, err := s.Write([]byte("after the bound")); err != nil {
		t.Fatalf("write on the spared stream after shutdownIdle's bound: %v (the connection was cut)", err)
	}
	if err := s.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(s)
	if err != nil || string(got) != "after the bound" {
		t.Fatalf("echo %q, %v; want %q (the connection was cut)", got, err, "after the bound")
	}
	// Once its stream is done, the connection closes (the GOAWAY went
	// out): nothing stays for the peer to time out.
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the connection did not close after its last stream ended")
	}
	if pl.size() != 0 {
		t.Errorf("pool holds %d connections, want 0", pl.size())
	}
}

// TestSweepGoesOnPastAStreamOpenedMeanwhile: the janitor's sweep shuts
// down connections idle past PoolIdleTimeout; a caller whose pick
// returned one just before may open a stream on it in between. The
// GOAWAY spares that stream, and the sweep must not wait for it: it shut
// the connections down one after the other, in the janitor, so one
// long-lived stream (a database session) stopped every later round for
// the pod while it lived, and its other idle connections stayed.
func TestSweepGoesOnPastAStreamOpenedMeanwhile(t *testing.T) {
	p, pl, c, opened := pickedThenOpened(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	swept := make(chan struct{})
	go func() { pl.sweep(time.Now().Add(2*time.Hour), p.poolIdle); close(swept) }()
	select {
	case <-swept:
	case <-time.After(10 * time.Second):
		t.Fatal("the sweep waits for a stream opened on a connection it evicts: the janitor is held while the stream lives")
	}
	s := opened()
	if s == nil {
		t.Fatal("no stream opened in the window: the test did not set up its case")
	}
	if st, _, err := s.Response(ctx); err != nil || st != 200 {
		t.Fatalf("response %d, %v", st, err)
	}
	if _, err := s.Write([]byte("spared")); err != nil {
		t.Fatal(err)
	}
	s.CloseWrite()
	if got, err := io.ReadAll(s); err != nil || string(got) != "spared" {
		t.Fatalf("echo %q, %v; want %q", got, err, "spared")
	}
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the connection did not close after its last stream ended")
	}
}

// pickedThenOpened is both tests' case: a pool holding one idle
// connection c to an echoing peer, and testEvictSelected opening a
// stream on c in the window between takeIdle's selection and the
// shutdown; opened returns that stream once the hook has run (nil if it
// has not).
func pickedThenOpened(t *testing.T) (p *Proxy, pl *pool, c *hbone.Conn, opened func() *hbone.Stream) {
	p, _, _ = newTestProxy(t, Config{Directory: noDirectory{}, Certificates: testPeerCerts(t),
		PoolIdleTimeout: time.Hour, ConnectTimeout: 10 * time.Second})
	key := loopPeer(t, p, uploadOrEcho(nil), nil)
	pl = newPool(p, &loopNet{})
	t.Cleanup(pl.close)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := pl.conn(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var s *hbone.Stream
	testEvictSelected = func(idle []*hbone.Conn) {
		if len(idle) != 1 || idle[0] != c {
			t.Errorf("%d connections selected, want the idle pooled one", len(idle))
			return
		}
		st, err := c.OpenStream("echo", nil)
		if err != nil {
			t.Errorf("a stream on the connection just picked: %v", err)
			return
		}
		mu.Lock()
		s = st
		mu.Unlock()
	}
	t.Cleanup(func() { testEvictSelected = nil })
	return p, pl, c, func() *hbone.Stream { mu.Lock(); defer mu.Unlock(); return s }
}
