package hbone

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// darkConn is the socket of a peer whose node can go dark: once dark,
// what it reads is dropped and it never reads again (its read blocks
// until the socket closes), and its writes are dropped. The other side's
// socket stays open and accepts writes (into the kernel's buffer): no
// RST, no FIN, as when the peer's node powers off. Closing it once dark
// sends nothing either (a dead node's keepalive does not run, and a
// FIN from it would tell the other side what nothing tells it in life);
// the socket itself is closed at the test's end (serveDark).
type darkConn struct {
	net.Conn
	dark   chan struct{}
	once   sync.Once
	closed chan struct{}
	cOnce  sync.Once
}

func newDarkConn(c net.Conn) *darkConn {
	return &darkConn{Conn: c, dark: make(chan struct{}), closed: make(chan struct{})}
}

func (d *darkConn) goDark() { d.once.Do(func() { close(d.dark) }) }

func (d *darkConn) isDark() bool {
	select {
	case <-d.dark:
		return true
	default:
		return false
	}
}

func (d *darkConn) Read(p []byte) (int, error) {
	if !d.isDark() {
		n, err := d.Conn.Read(p)
		if !d.isDark() {
			return n, err
		}
	}
	<-d.closed
	return 0, net.ErrClosed
}

func (d *darkConn) Write(p []byte) (int, error) {
	if d.isDark() {
		return len(p), nil
	}
	return d.Conn.Write(p)
}

func (d *darkConn) Close() error {
	d.cOnce.Do(func() { close(d.closed) })
	if d.isDark() {
		return nil
	}
	return d.Conn.Close()
}

// serveDark is serve whose server side can go dark.
// answeredStream opens a stream on c with no deadline (no probe) and
// waits for its 200: a download already under way when the peer goes
// quiet. Closed at the test's end.
func answeredStream(t *testing.T, c *Conn) *Stream {
	t.Helper()
	long, _, err := c.OpenStreamDataContext(context.Background(), "10.0.0.1:80", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { long.Close() })
	if st, _, err := long.Response(context.Background()); err != nil || st != 200 {
		t.Fatalf("response: %d %v", st, err)
	}
	return long
}

// openDueSoon opens a stream on c as the tunnel does, with a deadline
// (300 ms here: the connect timeout's part), which arms the probe.
func openDueSoon(t *testing.T, c *Conn) *Stream {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	s, _, err := c.OpenStreamDataContext(ctx, "10.0.0.1:80", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func serveDark(t *testing.T, cfg Config, handler func(*Stream)) (*Conn, *darkConn) {
	t.Helper()
	dc := make(chan *darkConn, 1)
	c, _ := serveWrapped(t, cfg, handler, func(a string) string { return a }, func(raw net.Conn, server bool) net.Conn {
		if !server {
			return raw
		}
		d := newDarkConn(raw)
		dc <- d
		return d
	})
	d := <-dc
	t.Cleanup(func() { d.Close(); d.Conn.Close() })
	return c, d
}

// setProbeSilence lowers probeSilence for one test.
func setProbeSilence(t *testing.T, d time.Duration) {
	old := probeSilence
	probeSilence = d
	t.Cleanup(func() { probeSilence = old })
}

// echoOnce opens a stream on c and checks that it echoes.
func echoOnce(t *testing.T, c *Conn, ctx context.Context) {
	t.Helper()
	s, _, err := c.OpenStreamDataContext(ctx, "10.0.0.1:80", nil, []byte("ping"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if st, _, err := s.Response(context.Background()); err != nil || st != 200 {
		t.Fatalf("response: %d %v", st, err)
	}
	b := make([]byte, 4)
	if _, err := io.ReadFull(s, b); err != nil || string(b) != "ping" {
		t.Fatalf("echo: %q %v", b, err)
	}
}

// TestProbeClosesSilentConnection: a stream opened on a connection whose
// peer went dark while it was idle fails by its opener's deadline (the
// connect timeout), with ErrPeerSilent, and the connection is closed for
// the next opener (the pool dials afresh). Keepalive is off: only the
// probe can tell. Before, the stream waited for its response until the
// response timeout (here: the test's 20 s wait ran out).
func TestProbeClosesSilentConnection(t *testing.T) {
	setProbeSilence(t, 50*time.Millisecond)
	c, d := serveDark(t, Config{PingInterval: -1}, echoHandler)
	echoOnce(t, c, context.Background())
	d.goDark()
	time.Sleep(100 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	start := time.Now()
	s, _, err := c.OpenStreamDataContext(ctx, "10.0.0.1:80", nil, []byte("x"))
	cancel() // as the tunnel does once the stream is open
	if err != nil {
		t.Fatal(err)
	}
	rctx, rcancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer rcancel()
	st, _, err := s.Response(rctx)
	if !errors.Is(err, ErrPeerSilent) {
		t.Fatalf("a stream on the dead connection: %d %v after %v; want ErrPeerSilent", st, err, time.Since(start))
	}
	t.Logf("failed after %v: %v", time.Since(start).Round(time.Millisecond), err)
	if c.Usable() || !errors.Is(c.Err(), ErrPeerSilent) {
		t.Errorf("connection usable %v, error %v; want closed with ErrPeerSilent", c.Usable(), c.Err())
	}
	if n := c.LivenessProbes(); n != 1 {
		t.Errorf("%d probe PINGs, want 1", n)
	}
}

// TestProbeConcurrentOpensSendOnePing: streams opening together on a
// silent connection send one PING between them and all fail with its
// verdict. (Before, no probe ran: each waited for its response.)
func TestProbeConcurrentOpensSendOnePing(t *testing.T) {
	setProbeSilence(t, 50*time.Millisecond)
	c, d := serveDark(t, Config{PingInterval: -1}, echoHandler)
	echoOnce(t, c, context.Background())
	d.goDark()
	time.Sleep(100 * time.Millisecond)
	const N = 20
	var wg sync.WaitGroup
	var silent atomic.Int32
	for i := 0; i < N; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			s, _, err := c.OpenStreamDataContext(ctx, "10.0.0.1:80", nil, nil)
			cancel()
			if err != nil {
				t.Error(err)
				return
			}
			rctx, rcancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer rcancel()
			if _, _, err := s.Response(rctx); errors.Is(err, ErrPeerSilent) {
				silent.Add(1)
			} else {
				t.Errorf("stream: %v, want ErrPeerSilent", err)
			}
		}()
	}
	wg.Wait()
	if n := c.LivenessProbes(); n != 1 {
		t.Errorf("%d probe PINGs for %d streams opened together, want 1", n, N)
	}
	if silent.Load() != N {
		t.Errorf("%d of %d streams failed with ErrPeerSilent", silent.Load(), N)
	}
}

// TestProbeNoPingOnBusyConnection: a connection that keeps receiving
// frames (a stream moving data) opens new streams without a PING.
func TestProbeNoPingOnBusyConnection(t *testing.T) {
	// Far above the busy stream's 20 ms between round trips: a
	// noisy machine's scheduling gaps must not look like silence.
	setProbeSilence(t, 500*time.Millisecond)
	c, _ := serve(t, Config{PingInterval: -1}, echoHandler)
	busy, _, err := c.OpenStreamDataContext(context.Background(), "10.0.0.1:80", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		b := make([]byte, 64)
		for {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			if _, err := busy.Write(b); err != nil {
				return
			}
			if _, err := io.ReadFull(busy, b); err != nil {
				return
			}
		}
	}()
	for i := 0; i < 20; i++ {
		time.Sleep(50 * time.Millisecond)
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		echoOnce(t, c, ctx)
		cancel()
	}
	close(stop)
	<-done
	if n := c.LivenessProbes(); n != 0 {
		t.Errorf("%d probe PINGs on a busy connection, want 0", n)
	}
}

// TestProbeKeepsLivePeerThatAnswersLate: a live peer, idle for a while,
// that takes longer than the opener's deadline (and the probe's least
// wait) to answer the CONNECT (its own dial is slow): the probe's PING
// is answered, the connection stays, and the stream gets its 200. A
// peer that answers PINGs but never HEADERS is left to the response
// timeout, as before.
func TestProbeKeepsLivePeerThatAnswersLate(t *testing.T) {
	setProbeSilence(t, 50*time.Millisecond)
	slow := func(s *Stream) {
		time.Sleep(probeMinWait + 500*time.Millisecond)
		echoHandler(s)
	}
	c, _ := serve(t, Config{PingInterval: -1}, slow)
	time.Sleep(100 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	s, _, err := c.OpenStreamDataContext(ctx, "10.0.0.1:80", nil, nil)
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if st, _, err := s.Response(context.Background()); err != nil || st != 200 {
		t.Fatalf("slow but live peer: %d %v", st, err)
	}
	if n := c.LivenessProbes(); n != 1 {
		t.Errorf("%d probe PINGs, want 1", n)
	}
	if !c.Usable() {
		t.Errorf("live connection closed: %v", c.Err())
	}
}

// TestProbeSharesKeepalivePing: a keepalive PING outstanding when a
// stream opens serves as the probe's (one PING, not two), and the
// probe's PING keeps keepalive from sending its own.
func TestProbeSharesKeepalivePing(t *testing.T) {
	setProbeSilence(t, 50*time.Millisecond)
	c, d := serveDark(t, Config{PingInterval: time.Hour}, echoHandler)
	echoOnce(t, c, context.Background())
	d.goDark()
	time.Sleep(100 * time.Millisecond)
	c.pingSent.Store(nanotime()) // keepalive's, unanswered
	s := openDueSoon(t, c)
	rctx, rcancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer rcancel()
	if _, _, err := s.Response(rctx); !errors.Is(err, ErrPeerSilent) {
		t.Fatalf("stream: %v, want ErrPeerSilent", err)
	}
	if n := c.LivenessProbes(); n != 0 {
		t.Errorf("%d probe PINGs with keepalive's outstanding, want 0", n)
	}
}

// TestProbeCatchesStreamOpenedRightAfterAFrame: a stream opens moments
// after the connection's last frame, and the peer is dark by then: the
// connection was not silent at the open, so no PING goes with the
// HEADERS, but once it has been silent for probeSilence with the stream
// still unanswered, the probe sends one, and the stream fails with
// ErrPeerSilent. (Probed only at the open, it waited for its response:
// here the test's 20 s.)
func TestProbeCatchesStreamOpenedRightAfterAFrame(t *testing.T) {
	setProbeSilence(t, 300*time.Millisecond)
	c, d := serveDark(t, Config{PingInterval: -1}, echoHandler)
	echoOnce(t, c, context.Background())
	d.goDark()
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	start := time.Now()
	s, _, err := c.OpenStreamDataContext(ctx, "10.0.0.1:80", nil, []byte("x"))
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	if n := c.LivenessProbes(); n != 0 {
		t.Errorf("%d probe PINGs at the open, right after a frame; want 0", n)
	}
	rctx, rcancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer rcancel()
	if st, _, err := s.Response(rctx); !errors.Is(err, ErrPeerSilent) {
		t.Fatalf("a stream on the dead connection: %d %v after %v; want ErrPeerSilent", st, err, time.Since(start))
	}
	t.Logf("failed after %v", time.Since(start).Round(time.Millisecond))
	if n := c.LivenessProbes(); n != 1 {
		t.Errorf("%d probe PINGs, want 1", n)
	}
}

// pausedConn is the server's socket of a peer whose agent can be paused
// (SIGSTOPped, CPU-starved): while paused it neither reads (what it is
// sent waits in the kernel's buffer) nor writes; resumed, it goes on
// where it stopped, nothing lost.
type pausedConn struct {
	net.Conn
	mu   sync.Mutex
	gate chan struct{} // closed while running
}

func newPausedConn(c net.Conn) *pausedConn {
	g := make(chan struct{})
	close(g)
	return &pausedConn{Conn: c, gate: g}
}

func (p *pausedConn) wait() {
	p.mu.Lock()
	g := p.gate
	p.mu.Unlock()
	<-g
}

func (p *pausedConn) pause() {
	p.mu.Lock()
	p.gate = make(chan struct{})
	p.mu.Unlock()
}

func (p *pausedConn) resume() {
	p.mu.Lock()
	close(p.gate)
	p.mu.Unlock()
}

func (p *pausedConn) Read(b []byte) (int, error) {
	p.wait()
	n, err := p.Conn.Read(b)
	p.wait() // a read under way when the pause began returns after it
	return n, err
}

func (p *pausedConn) Write(b []byte) (int, error) {
	p.wait()
	return p.Conn.Write(b)
}

// TestProbeSparesAnsweredStreamsOfAPausedPeer: the peer's agent pauses
// (CPU-starved, stopped) for longer than a new stream's deadline while a
// long-lived stream on the connection is open (a download, answered long
// ago). The new stream fails with ErrPeerSilent (a dial to that peer
// would have failed as well) and the connection takes no more streams,
// but the answered stream lives on once the peer is back: a pause is
// not a death, keepalive's PingTimeout (ztunnel's 20 s) is the bound for
// established streams, as before the probe. Before, the probe's verdict
// closed the whole connection: the download failed with ErrPeerSilent.
func TestProbeSparesAnsweredStreamsOfAPausedPeer(t *testing.T) {
	setProbeSilence(t, 50*time.Millisecond)
	pc := make(chan *pausedConn, 1)
	c, _ := serveWrapped(t, Config{PingInterval: time.Hour}, echoHandler, func(a string) string { return a }, func(raw net.Conn, server bool) net.Conn {
		if !server {
			return raw
		}
		p := newPausedConn(raw)
		pc <- p
		return p
	})
	p := <-pc
	long := answeredStream(t, c)
	roundTrip := func() error {
		b := []byte("download")
		if _, err := long.Write(b); err != nil {
			return err
		}
		_, err := io.ReadFull(long, b)
		return err
	}
	if err := roundTrip(); err != nil {
		t.Fatal(err)
	}
	p.pause()
	time.Sleep(100 * time.Millisecond)
	s := openDueSoon(t, c)
	rctx, rcancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer rcancel()
	_, _, err := s.Response(rctx)
	if !errors.Is(err, ErrPeerSilent) {
		t.Errorf("the stream opened on the paused peer: %v, want ErrPeerSilent", err)
	}
	if c.Usable() {
		t.Errorf("the connection still takes streams after its probe went unanswered")
	}
	time.Sleep(200 * time.Millisecond) // the pause: 1.5 s in all
	p.resume()
	if err := roundTrip(); err != nil {
		t.Fatalf("the download after the peer's pause: %v (connection: %v)", err, c.Err())
	}
	long.Close()
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Errorf("the connection, drained, was not closed")
	}
}

// TestProbeLeavesAnsweredStreamsOfADeadPeerToKeepalive: the same as a
// pause, but the peer never comes back: the answered stream fails when
// keepalive gives up on the probe's PING (PingTimeout after it), not
// later, and the connection closes.
func TestProbeLeavesAnsweredStreamsOfADeadPeerToKeepalive(t *testing.T) {
	setProbeSilence(t, 50*time.Millisecond)
	// PingTimeout past the probe's least wait (probeMinWait, 1 s): with
	// both at 1 s, keepalive's tick (every 200 ms) could close the
	// connection before the verdict failed the new stream (a make test
	// saw keepalive's error on it, at 0.9 s).
	c, d := serveDark(t, Config{PingInterval: 200 * time.Millisecond, PingTimeout: 2 * time.Second}, echoHandler)
	long := answeredStream(t, c)
	d.goDark()
	time.Sleep(100 * time.Millisecond)
	start := time.Now()
	s := openDueSoon(t, c)
	if _, _, err := s.Response(context.Background()); !errors.Is(err, ErrPeerSilent) {
		t.Errorf("the stream opened on the dead peer: %v, want ErrPeerSilent", err)
	}
	select {
	case <-c.Done():
		t.Logf("closed %v after the probe's PING: %v", time.Since(start).Round(time.Millisecond), c.Err())
	case <-time.After(20 * time.Second):
		t.Fatalf("the connection to the dead peer is still open")
	}
	if _, err := long.Read(make([]byte, 1)); err == nil {
		t.Errorf("the answered stream on the dead connection read no error")
	}
}

// TestKeepaliveCountsFromTheProbesPing: the probe's PING is keepalive's
// outstanding one, so a dead peer's connection (kept for its answered
// streams) closes PingTimeout after that PING, at keepalive's next tick.
// Before, keepalive's tick that followed the PING saw the frames read
// before it (the answered stream's), took them for an answer and forgot
// the PING: it sent its own a tick later, and the connection lived a
// PingInterval or two longer (40 s with the defaults in
// BenchmarkNodeDeath, where the PING went 0 s after B died; here the
// test's bound, PingTimeout + PingInterval after the PING, ran out).
func TestKeepaliveCountsFromTheProbesPing(t *testing.T) {
	setProbeSilence(t, 50*time.Millisecond)
	cfg := Config{PingInterval: time.Second, PingTimeout: 4 * time.Second}
	c, d := serveDark(t, cfg, echoHandler)
	answeredStream(t, c) // kept open: keepalive, not the probe, closes the connection
	d.goDark()
	time.Sleep(100 * time.Millisecond)
	ping := time.Now()
	s := openDueSoon(t, c)
	defer s.Close()
	if n := c.LivenessProbes(); n != 1 {
		t.Fatalf("%d probe PINGs, want 1", n)
	}
	// Keepalive closes at its first tick PingTimeout-PingInterval/2
	// after the PING: 3.5 to 4.5 s here. Counting from a PING of its own
	// at its second tick, it closed at its sixth: 5.4 s or more after.
	bound := cfg.PingTimeout + cfg.PingInterval
	select {
	case <-c.Done():
		t.Logf("closed %v after the probe's PING: %v", time.Since(ping).Round(time.Millisecond), c.Err())
	case <-time.After(bound):
		<-c.Done()
		t.Errorf("closed %v after the probe's PING, want within %v (keepalive counted from a PING of its own)", time.Since(ping).Round(time.Millisecond), bound)
	}
}
