package hbone

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/tunnel/internal/panicpoint"
)

var errTestStreamPanic = errors.New("test: the stream's own code panics")

// streamPanicAt installs panicpoint.StreamHook for the test: it panics with
// errTestStreamPanic once at, armed, fires, and only for streams when
// only says so (nil: any). Removed with the test.
func streamPanicAt(t *testing.T, at *panicpoint.Point, only func(*Stream) bool) {
	h := func(s any) {
		if only == nil || only(s.(*Stream)) {
			at.Check(errTestStreamPanic)
		}
	}
	panicpoint.StreamHook.Store(&h)
	t.Cleanup(func() { panicpoint.StreamHook.Store(nil) })
}

// TestDrainPanicResetsStream: a panic on a spliced stream's drain
// goroutine (it writes received bytes to the app while they wait for
// its socket) resets that stream, closes the app's socket with a reset,
// and ends Splice with a *PanicError carrying the panic and its stack:
// told once, to Splice's caller, not to Config.OnPanic (the agent
// counted it twice when both heard of it); the connection goes on, with
// all its receive window, and carries the next stream. Before session
// 14, nothing recovered on that goroutine: the panic ended the process
// (the test binary).
func TestDrainPanicResetsStream(t *testing.T) {
	var at panicpoint.Point
	streamPanicAt(t, &at, nil)
	panics := make(chan any, 2)
	peers := make(chan net.Conn, 2)
	spliced := make(chan SpliceResult, 2)
	cfg := Config{PingInterval: -1, OnPanic: func(_ *Conn, v any, _ []byte) { panics <- v }}
	c, srv := serve(t, cfg, func(s *Stream) {
		app, peer := appPair(t)
		// Small socket buffers: the app's takes little of what comes,
		// the rest waits in the stream for a drain goroutine.
		app.SetWriteBuffer(4 << 10)
		peer.(*net.TCPConn).SetReadBuffer(4 << 10)
		peers <- peer
		if s.Respond(200, nil) == nil {
			spliced <- s.Splice(app)
		}
	})
	open := func() (*Stream, net.Conn) {
		t.Helper()
		s := openAnswered(t, c, "10.0.0.1:80")
		return s, <-peers
	}
	at.Arm("hbone.(*Stream).drain")
	s, peer := open()
	// 1 MiB the app does not read yet: within the stream's window.
	go s.Write(make([]byte, 1<<20))
	select {
	case res := <-spliced:
		wantPanicError(t, res.Err, "hbone.(*Stream).drain")
	case <-time.After(10 * time.Second):
		t.Fatalf("Splice has not returned 10 s after its drain was armed (armed %v)", at.Armed())
	}
	peer.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.Copy(io.Discard, peer); !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("the app's end: %v, want a reset", err)
	}
	var se StreamError
	if _, err := io.Copy(io.Discard, s); !errors.As(err, &se) || se.Code != ErrCodeInternal {
		t.Errorf("the client's stream: %v, want a reset with INTERNAL_ERROR", err)
	}
	// The connection's books: what the stream held given back, the
	// stream gone.
	waitWindowBack(t, srv())
	deadline := time.Now().Add(5 * time.Second)
	for srv().ActiveStreams() != 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if n := srv().ActiveStreams(); n != 0 {
		t.Errorf("%d streams open on the server after the only one was reset", n)
	}
	// It goes on: the next stream reaches its app.
	s2, peer2 := open()
	if _, err := s2.Write([]byte("after")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 5)
	peer2.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(peer2, got); err != nil || string(got) != "after" {
		t.Fatalf("the next stream's app read %q, %v", got, err)
	}
	select {
	case v := <-panics:
		t.Errorf("OnPanic called (%v): Splice's caller is told", v)
	default:
	}
}

// openAnswered opens a stream to authority on c and waits up to 10 s
// for its 200: the server's handler has taken it by then.
func openAnswered(t *testing.T, c *Conn, authority string) *Stream {
	t.Helper()
	s, err := c.OpenStream(authority, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if st, _, err := s.Response(ctx); st != 200 {
		t.Fatalf("response %d, %v", st, err)
	}
	return s
}

// wantPanicError fails the test unless err is the *PanicError of the
// armed panic, with a stack that shows where.
func wantPanicError(t *testing.T, err error, where string) {
	t.Helper()
	pe, ok := err.(*PanicError)
	if !ok {
		t.Fatalf("Splice's error %v (%T), want a *PanicError", err, err)
	}
	if pe.Value != errTestStreamPanic || !strings.Contains(pe.Error(), errTestStreamPanic.Error()) {
		t.Errorf("PanicError %v (value %v), want the armed panic", pe, pe.Value)
	}
	if !strings.Contains(string(pe.Stack), where) {
		t.Errorf("the PanicError's stack does not show %s:\n%s", where, pe.Stack)
	}
}

// TestOnResponsePanicResetsStream: a panic in a client stream's
// OnResponse callback (the agent's code: it counts the connection open
// there), run on the connection's read loop when the response comes
// after Splice, ends that stream alone: the app's socket reset, the
// server's stream reset with INTERNAL_ERROR, Splice's error a
// *PanicError, Config.OnPanic not told; the connection goes on and
// carries the next stream. Before, the read loop's recover closed the
// connection, failing every stream on it, and OnPanic heard of it while
// the stream failed with the panic as its error: the agent counted the
// one panic twice.
func TestOnResponsePanicResetsStream(t *testing.T) {
	panics := make(chan any, 2)
	cfg := Config{PingInterval: -1, OnPanic: func(_ *Conn, v any, _ []byte) { panics <- v }}
	served := make(chan error, 2)
	c, _ := serve(t, cfg, func(s *Stream) {
		// The response goes once the app's first byte is here. Splice's
		// pump sent it (optimistic send), and the pump starts only after
		// Splice looked for a response and found none: the response is
		// then handled on the client's read loop. Released as soon as
		// Splice was started, or once Splice had set its app, the
		// response could still beat Splice's own look (a Splice
		// goroutine descheduled in between, on a loaded host), and
		// OnResponse ran on Splice's goroutine: 1 run in ~100 under -race.
		first := make([]byte, 1)
		if _, err := io.ReadFull(s, first); err != nil {
			served <- err
			return
		}
		s.Respond(200, nil)
		s.Write(first)
		_, err := io.Copy(s, s)
		s.CloseWrite()
		served <- err
	})
	open := func(onResp func(int)) (chan SpliceResult, net.Conn) {
		t.Helper()
		s, err := c.OpenStream("10.0.0.1:80", nil)
		if err != nil {
			t.Fatal(err)
		}
		s.OnResponse(onResp)
		app, peer := appPair(t)
		spliced := make(chan SpliceResult, 1)
		go func() { spliced <- s.Splice(app) }()
		if _, err := io.WriteString(peer, "n"); err != nil {
			t.Fatal(err)
		}
		return spliced, peer
	}
	spliced, peer := open(func(int) { panic(errTestStreamPanic) })
	select {
	case res := <-spliced:
		wantPanicError(t, res.Err, "hbone.(*Conn).readLoop")
	case <-time.After(10 * time.Second):
		t.Fatal("Splice has not returned 10 s after its OnResponse panicked")
	}
	peer.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.Copy(io.Discard, peer); !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("the app's end: %v, want a reset", err)
	}
	var se StreamError
	select {
	case err := <-served:
		if !errors.As(err, &se) || se.Code != ErrCodeInternal {
			t.Errorf("the server's stream ended with %v, want a reset with INTERNAL_ERROR", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the server's stream still open 10 s after the client's OnResponse panicked")
	}
	if !c.Usable() {
		t.Fatalf("the connection closed: %v", c.Err())
	}
	// It goes on: the next stream reaches its app.
	_, peer = open(func(int) {})
	io.WriteString(peer, "ext")
	got := make([]byte, 4)
	peer.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(peer, got); err != nil || string(got) != "next" {
		t.Fatalf("the next stream's echo %q, %v", got, err)
	}
	select {
	case v := <-panics:
		t.Errorf("OnPanic called (%v): Splice's caller is told", v)
	default:
	}
}

// TestPumpPanicFreesBigRead: a panic in Splice's pump while its read
// holds one of the connection's big-read slots (reads of more than a
// frame, maxBigReads per connection), in the read of the app or in
// sendFrom's reserve (outside the write lock, so the connection stays
// open), gives the slot back. Before, each such panic kept one; after
// maxBigReads of them no stream of that connection, pooled and taking
// streams, read more than a frame again.
func TestPumpPanicFreesBigRead(t *testing.T) {
	for _, tc := range []struct{ name, where string }{
		{"read", "hbone.(*Stream).pumpFrom"},
		{"reserve", "hbone.(*Stream).reserve"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var at panicpoint.Point
			// Only while a slot is taken: the panic must find one to
			// leave behind (one stream at a time: its own).
			streamPanicAt(t, &at, func(s *Stream) bool { return s.c.client && s.c.bigReads.Load() > 0 })
			c, _ := serve(t, Config{PingInterval: -1}, func(s *Stream) {
				s.Respond(200, nil)
				io.Copy(io.Discard, s)
			})
			chunk := make([]byte, 1<<20)
			for i := 1; i <= maxBigReads+1; i++ {
				s, err := c.OpenStream("10.0.0.1:80", nil)
				if err != nil {
					t.Fatal(err)
				}
				app, peer := appPair(t)
				// The app streams: its pump's reads fill their buffer,
				// and the next ones take a slot.
				go func() {
					for {
						if _, err := peer.Write(chunk); err != nil {
							return
						}
					}
				}()
				at.Arm(tc.where)
				recovered := make(chan any, 1)
				go func() {
					defer func() { recovered <- recover() }()
					s.Splice(app)
				}()
				select {
				case v := <-recovered:
					if v != errTestStreamPanic {
						t.Fatalf("round %d: Splice ended with %v, want the armed panic", i, v)
					}
				case <-time.After(10 * time.Second):
					t.Fatalf("round %d: no panic within 10 s: the pump took no big-read slot (%d of %d taken)", i, c.bigReads.Load(), maxBigReads)
				}
				// What the tunnel's recover does: reset both sides.
				s.Reset(ErrCodeCancel)
				app.SetLinger(0)
				app.Close()
				peer.Close()
				if n := c.bigReads.Load(); n != 0 {
					t.Fatalf("after %d panic(s) %d big-read slot(s) of %d taken with no pump running", i, n, maxBigReads)
				}
				select {
				case <-c.Done():
					t.Fatalf("the connection closed: %v", c.Err())
				default:
				}
			}
		})
	}
}
