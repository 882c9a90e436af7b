package hbone

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// readGate holds a socket's reads while closed: the peer's agent alive
// but not draining its socket (CPU-starved, or the path congested).
type readGate struct {
	net.Conn
	mu   sync.Mutex
	open chan struct{} // closed while reads go on
}

func newReadGate(c net.Conn) *readGate {
	g := &readGate{Conn: c, open: make(chan struct{})}
	close(g.open)
	return g
}

// Read waits at the gate before and after the read: a read already
// under way when the gate closes keeps what it took until it opens.
func (g *readGate) Read(p []byte) (int, error) {
	g.wait()
	n, err := g.Conn.Read(p)
	g.wait()
	return n, err
}

func (g *readGate) wait() {
	g.mu.Lock()
	ch := g.open
	g.mu.Unlock()
	<-ch
}

func (g *readGate) stop() {
	g.mu.Lock()
	g.open = make(chan struct{})
	g.mu.Unlock()
}

func (g *readGate) resume() {
	g.mu.Lock()
	defer g.mu.Unlock()
	select {
	case <-g.open:
	default:
		close(g.open)
	}
}

// stallPair is a client and server whose client's send buffer is small
// (16 KiB asked, the kernel doubles it) and whose windows are large
// (64 MiB): the socket fills long before flow control stops a writer.
// The server's receive buffer is the kernel's: set to 16 KiB, a
// transfer sometimes took 50 s or more to resume once the server read
// again (the loopback's 64 KiB segments do not fit it).
// The server's reads pass through the returned gate; raw is the
// client's TCP socket. A first stream's round trip has been made (the
// peer's SETTINGS, its windows, are known); the stream stays open.
func stallPair(t *testing.T, handler func(*Stream)) (c *Conn, gate *readGate, raw *net.TCPConn) {
	t.Helper()
	gates := make(chan *readGate, 1)
	var mu sync.Mutex
	c, _ = serveWrapped(t, Config{PingInterval: -1, StreamWindow: 64 << 20, ConnWindow: 64 << 20, SendFrameSize: 1 << 20}, handler, func(a string) string { return a },
		func(r net.Conn, server bool) net.Conn {
			tc := r.(*net.TCPConn)
			if !server {
				if err := tc.SetWriteBuffer(16 << 10); err != nil {
					t.Error(err)
				}
				mu.Lock()
				raw = tc
				mu.Unlock()
				return tc
			}
			g := newReadGate(tc)
			gates <- g
			return g
		})
	gate = <-gates
	t.Cleanup(gate.resume)
	s, _, err := c.OpenStreamData("10.0.0.1:80", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if st, _, err := s.Response(context.Background()); err != nil || st != 200 {
		t.Fatalf("response %d %v", st, err)
	}
	mu.Lock()
	defer mu.Unlock()
	return c, gate, raw
}

// waitFor polls cond until it holds, failing the test after a minute
// (a bail for a hung test, not a timing assertion).
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(time.Minute); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("after a minute, still not: %s", what)
		}
	}
}

// TestWriteStalledWhileThePeerDoesNotDrain: a stream's writer blocked on
// a full socket (the peer stopped reading) makes WriteStalled true once
// writeStallAfter has passed, and false again once the peer reads and
// the write goes on; the stream's bytes all arrive. WriteStalled is what
// the pool checks before it puts a new stream on a connection.
func TestWriteStalledWhileThePeerDoesNotDrain(t *testing.T) {
	defer func(d time.Duration) { writeStallAfter = d }(writeStallAfter)
	writeStallAfter = 100 * time.Millisecond
	got := make(chan int64, 2)
	c, gate, _ := stallPair(t, func(s *Stream) {
		s.Respond(200, nil)
		n, _ := io.Copy(io.Discard, s)
		got <- n
	})
	s, _, err := c.OpenStreamData("10.0.0.1:80", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if st, _, err := s.Response(context.Background()); err != nil || st != 200 {
		t.Fatalf("response %d %v", st, err)
	}
	if c.WriteStalled(time.Now().Add(time.Hour)) {
		t.Fatal("an idle connection reports a stalled writer")
	}
	gate.stop()
	const total = 8 << 20
	wrote := make(chan error, 1)
	go func() {
		b := make([]byte, 256<<10)
		for n := 0; n < total; n += len(b) {
			if _, err := s.Write(b); err != nil {
				wrote <- err
				return
			}
		}
		wrote <- s.CloseWrite()
	}()
	t0 := time.Now()
	waitFor(t, "WriteStalled with the peer not reading", func() bool { return c.WriteStalled(time.Now()) })
	t.Logf("stalled after %v", time.Since(t0))
	gate.resume()
	if err := <-wrote; err != nil {
		t.Fatalf("the stalled stream's writes: %v", err)
	}
	t.Logf("written after %v", time.Since(t0))
	if n := <-got; n != total {
		t.Fatalf("the peer received %d bytes, want %d", n, total)
	}
	if c.WriteStalled(time.Now().Add(time.Hour)) {
		t.Fatal("still stalled after the writes ended")
	}
	if err := c.Err(); err != nil {
		t.Fatalf("the slow connection was closed: %v", err)
	}
}

// fillSocket writes garbage to raw until the socket takes no more (the
// peer is not reading): the write lock free, the socket buffer full.
func fillSocket(t *testing.T, raw *net.TCPConn) {
	t.Helper()
	rc, err := raw.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 64<<10)
	fill := func() (total int) {
		_ = rc.Write(func(fd uintptr) bool {
			for {
				n, err := unix.Write(int(fd), b)
				if err != nil || n <= 0 {
					return true
				}
				total += n
			}
		})
		return total
	}
	if fill() == 0 {
		t.Fatal("could not fill the socket")
	}
	// Again until it stays full: acknowledgements of the last
	// segments, and the kernel's buffer tuning, make some room after.
	for quiet := 0; quiet < 2; {
		time.Sleep(20 * time.Millisecond)
		if fill() == 0 {
			quiet++
		} else {
			quiet = 0
		}
	}
}

// TestOpenStreamWriteEndsWithItsContext: with the write lock free but
// the socket full (the peer alive, not reading), an open's HEADERS
// write gives up when the opener's context ends, with its error, and
// the connection is closed (the write may have been cut mid-frame).
// Before, the write had no bound: the open hung as long as the peer did
// not read (the test's minute bail).
func TestOpenStreamWriteEndsWithItsContext(t *testing.T) {
	c, gate, raw := stallPair(t, echoHandler)
	// Small here (no transfer resumes after): the socket stays full.
	if err := gate.Conn.(*net.TCPConn).SetReadBuffer(16 << 10); err != nil {
		t.Fatal(err)
	}
	gate.stop()
	fillSocket(t, raw)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	type result struct {
		s   *Stream
		err error
	}
	done := make(chan result, 1)
	go func() {
		// 1 MiB of first bytes with the HEADERS: more than whatever
		// room the socket gains as its last segments are acknowledged.
		s, _, err := c.OpenStreamDataContext(ctx, "10.0.0.1:80", nil, make([]byte, 1<<20))
		done <- result{s, err}
	}()
	var r result
	select {
	case r = <-done:
	case <-time.After(time.Minute):
		t.Fatal("the open's write to a full socket had no bound: still blocked after a minute")
	}
	if r.err == nil || !errors.Is(r.err, context.DeadlineExceeded) {
		t.Fatalf("open on a full socket: %v, %v; want the context's deadline", r.s, r.err)
	}
	select {
	case <-c.Done():
	case <-time.After(time.Minute):
		t.Fatal("the connection whose write was cut stayed open")
	}
	if !errors.Is(c.Err(), ErrConnClosed) {
		t.Fatalf("the connection's error: %v", c.Err())
	}
	// Another opener of the cut connection is sent to another one
	// (ErrConnClosed), not failed as if its own connect timeout had
	// passed: the tunnel's pool tests DeadlineExceeded first.
	_, _, err := c.OpenStreamDataContext(context.Background(), "10.0.0.1:80", nil, nil)
	if !errors.Is(err, ErrConnClosed) || errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("an open on the cut connection: %v; want ErrConnClosed, not the cut opener's deadline", err)
	}
}

// TestOpenStreamSlowWriteThatDrainsIsNotCut: an open whose write waits
// on a full socket and completes before its context ends opens normally,
// and the context's end afterwards does not touch the connection (the
// cut is disarmed once the write is done).
func TestOpenStreamSlowWriteThatDrainsIsNotCut(t *testing.T) {
	c, gate, _ := stallPair(t, echoHandler)
	gate.stop()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	done, first := openBlocked(t, ctx, c)
	gate.resume()
	r := <-done
	if r.err != nil || r.sent != len(first) {
		t.Fatalf("the open whose write drained: sent %d of %d, %v", r.sent, len(first), r.err)
	}
	cancel()
	if st, _, err := r.s.Response(context.Background()); err != nil || st != 200 {
		t.Fatalf("response %d %v", st, err)
	}
	r.s.CloseWrite()
	n, err := io.Copy(io.Discard, r.s)
	if err != nil || n != int64(len(first)) {
		t.Fatalf("echoed %d bytes (%v), want %d", n, err, len(first))
	}
	if err := c.Err(); err != nil {
		t.Fatalf("the connection closed: %v", err)
	}
}

// TestOpenStreamLeavesALockHeldByAStalledWriter: an open that finds the
// write lock held by a writer that has only just blocked on a full
// socket (not yet WriteStalled, so a pool would have picked the
// connection) gives up with ErrNoCapacity once the writer has waited
// writeStallAfter, instead of waiting for the lock until its context
// ends (a minute here; the connect timeout in the tunnel): the pool
// then opens the stream elsewhere. Before, it waited the whole minute.
func TestOpenStreamLeavesALockHeldByAStalledWriter(t *testing.T) {
	defer func(d time.Duration) { writeStallAfter = d }(writeStallAfter)
	writeStallAfter = 300 * time.Millisecond
	c, gate, _ := stallPair(t, func(s *Stream) {
		s.Respond(200, nil)
		io.Copy(io.Discard, s)
	})
	s, _, err := c.OpenStreamData("10.0.0.1:80", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	gate.stop()
	// Bursts of a frame each (the peer's 1 MiB frame size), far more
	// than the sockets hold, each written under the lock.
	go s.Write(make([]byte, 4<<20))
	waitFor(t, "the writer blocked holding the lock", func() bool {
		if c.cork.blockedSince.Load() == 0 {
			return false
		}
		if c.wmu.TryLock() {
			c.wmu.Unlock()
			return false
		}
		return true
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, _, err = c.OpenStreamDataContext(ctx, "10.0.0.1:80", nil, nil)
	if !errors.Is(err, ErrNoCapacity) {
		t.Fatalf("open behind a stalled writer: %v, want ErrNoCapacity", err)
	}
	if ctx.Err() != nil {
		t.Fatal("the open waited until its context ended")
	}
	if cerr := c.Err(); cerr != nil {
		t.Fatalf("the connection was closed: %v", cerr)
	}
}

// TestOpenStreamBrieflyBlockedOutlivesItsContext: an open whose HEADERS
// write waits on a full socket only briefly (a busy connection: its bulk
// streams keep the socket full, so the next burst waits for room) when
// its context ends (in the tunnel: the app's client went away, which
// cancels the open 20 ms in) does not close the shared connection: the
// write is left to finish, and the connection's other streams go on.
// Only a write that has waited writeStallAfter (WriteStalled, a peer not
// draining) is cut. Before, the cancel closed the TCP socket at once
// under the open's write, the connection with every stream on it.
func TestOpenStreamBrieflyBlockedOutlivesItsContext(t *testing.T) {
	defer func(d time.Duration) { writeStallAfter = d }(writeStallAfter)
	// Far past the test: the write here is never stalled, only busy.
	writeStallAfter = time.Hour
	c, gate, _ := stallPair(t, echoHandler)
	other, _, err := c.OpenStreamData("10.0.0.1:80", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if st, _, err := other.Response(context.Background()); err != nil || st != 200 {
		t.Fatalf("response %d %v", st, err)
	}
	gate.stop()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done, first := openBlocked(t, ctx, c)
	cancel()
	// Room for a close the cancel would make (on its own goroutine)
	// before the peer reads again: not a bound on anything.
	time.Sleep(100 * time.Millisecond)
	gate.resume()
	r := <-done
	if cerr := c.Err(); cerr != nil {
		t.Fatalf("the busy connection was closed as an opener's context ended: %v (open: %v)", cerr, r.err)
	}
	if r.err != nil || r.sent != len(first) {
		t.Fatalf("the open whose write drained: sent %d of %d, %v", r.sent, len(first), r.err)
	}
	// The connection's other stream still makes its round trip.
	msg := []byte("still here")
	if _, err := other.Write(msg); err != nil {
		t.Fatalf("the other stream's write: %v", err)
	}
	other.CloseWrite()
	got, err := io.ReadAll(other)
	if err != nil || string(got) != string(msg) {
		t.Fatalf("the other stream's echo: %q, %v", got, err)
	}
}

// openResult is what an open started by openBlocked returned.
type openResult struct {
	s    *Stream
	sent int
	err  error
}

// openBlocked opens a stream on c under ctx with a first write larger
// than the sockets hold (the peer's reads stopped), and returns once
// that write is blocked; the open's result comes on the channel, first
// is what it writes.
func openBlocked(t *testing.T, ctx context.Context, c *Conn) (<-chan openResult, []byte) {
	t.Helper()
	done := make(chan openResult, 1)
	first := make([]byte, 512<<10) // more than the sockets hold
	go func() {
		s, sent, err := c.OpenStreamDataContext(ctx, "10.0.0.1:80", nil, first)
		done <- openResult{s, sent, err}
	}()
	waitFor(t, "the open's write blocked", func() bool { return c.cork.blockedSince.Load() != 0 })
	return done, first
}
