package hbone

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/tunnel/internal/panicpoint"
)

// writePanicConn is a socket whose Write panics once, armed, when made
// from the armed function (panicpoint): a bug under the write lock, in
// the socket's write or in what leads to it. Writes from other
// goroutines (the control-frame writer, the read loop's) go through.
type writePanicConn struct {
	net.Conn
	at *panicpoint.Point
}

var errTestWritePanic = errors.New("test: the socket's write panics")

func (c *writePanicConn) Write(b []byte) (int, error) {
	c.at.Check(errTestWritePanic)
	return c.Conn.Write(b)
}

// servePanicky is serve with one side's socket (server: which) a
// writePanicConn armed by at.
func servePanicky(t *testing.T, cfg Config, handler func(*Stream), server bool, at *panicpoint.Point) (*Conn, func() *Conn) {
	return serveWrapped(t, cfg, handler, func(a string) string { return a }, func(raw net.Conn, srv bool) net.Conn {
		if srv != server {
			return raw
		}
		return &writePanicConn{Conn: raw, at: at}
	})
}

// lockFree reports whether c's write lock can be taken within 5 s: a
// writer that finds the connection closed lets it go at once, one left
// holding it never does.
func lockFree(c *Conn) bool {
	deadline := time.Now().Add(5 * time.Second)
	for !c.wmu.TryLock() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(time.Millisecond)
	}
	c.wmu.Unlock()
	return true
}

// wantClosedUnwedged fails the test unless c, whose write panicked
// (what), closes within 5 s with its write lock free and takes no new
// stream, and its peer sees the end within 10 s.
func wantClosedUnwedged(t *testing.T, c, peer *Conn, what string) {
	t.Helper()
	select {
	case <-c.Done():
	case <-time.After(5 * time.Second):
		t.Fatalf("the connection is still open 5 s after %s panicked", what)
	}
	if !lockFree(c) {
		t.Fatalf("the write lock is still held 5 s after %s panicked", what)
	}
	if c.client {
		if _, err := c.OpenStream("10.0.0.1:80", nil); err == nil {
			t.Error("a new stream opened on the closed connection")
		}
	}
	select {
	case <-peer.Done():
	case <-time.After(10 * time.Second):
		t.Errorf("the peer's connection is still open 10 s after %s panicked and closed ours", what)
	}
}

// TestWritePanicLeavesConnClosed: a panic in a socket write made under
// a connection's write lock (from Stream.Write / Splice, CloseWrite,
// OpenStream, Respond, or closeWith's GOAWAY) reaches the caller, and
// the connection is closed with the lock free: its other streams fail
// at once, and a pool sees it gone and dials anew. The frames the panic
// cut short may be half written, so it is not used again. Before, the
// lock stayed held (the unlocks were not deferred): every later write,
// on any stream of the connection, waited on it for ever, and the
// connection stayed open (a pooled one took new streams that hung).
func TestWritePanicLeavesConnClosed(t *testing.T) {
	for _, tc := range []struct {
		name   string
		server bool   // whose socket panics
		where  string // the writer that panics
		// do makes the panicking write; s is an open stream of the
		// panicking side's.
		do func(c *Conn, s *Stream)
	}{
		{"Stream.Write", false, "hbone.(*Stream).sendFrom", func(_ *Conn, s *Stream) { s.Write([]byte("boom")) }},
		{"CloseWrite", false, "hbone.(*Stream).CloseWrite", func(_ *Conn, s *Stream) { s.CloseWrite() }},
		{"OpenStream", false, "hbone.(*Conn).OpenStreamData", func(c *Conn, _ *Stream) { c.OpenStream("10.0.0.1:80", nil) }},
		{"Respond", true, "hbone.(*Stream).Respond", func(_ *Conn, s *Stream) { s.Respond(200, nil) }},
		{"closeWith's GOAWAY", false, "hbone.(*Conn).closeWith", func(c *Conn, _ *Stream) {
			c.closeWith(errors.New("test: closing with a reason"), ErrCodeInternal)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var at panicpoint.Point
			// The server's streams, answered by the test (Respond is
			// one of the writes that panics), each handler waiting
			// until the test is done with it.
			streams := make(chan *Stream, 4)
			done := make(chan struct{})
			defer close(done)
			c, server := servePanicky(t, Config{PingInterval: -1}, func(s *Stream) {
				streams <- s
				<-done
			}, tc.server, &at)
			open := func() (cs, ss *Stream) {
				t.Helper()
				cs, err := c.OpenStream("10.0.0.1:80", nil)
				if err != nil {
					t.Fatal(err)
				}
				select {
				case ss = <-streams:
				case <-time.After(10 * time.Second):
					t.Fatal("the server saw no stream")
				}
				return cs, ss
			}
			// Two streams: one for the panicking write, one that must
			// not be wedged by it.
			c1, s1 := open()
			c2, s2 := open()
			pc, ps, other := c, c1, c2
			if tc.server {
				pc, ps, other = server(), s1, s2
			}
			at.Arm(tc.where)
			var got any
			func() {
				defer func() { got = recover() }()
				tc.do(pc, ps)
			}()
			if got != errTestWritePanic {
				t.Fatalf("the write's panic: recovered %v, want the socket's (armed %v)", got, at.Armed())
			}
			peer := server()
			if tc.server {
				peer = c
			}
			wantClosedUnwedged(t, pc, peer, "a write under its write lock")
			// closeWith keeps the reason it was given.
			if !errors.Is(pc.Err(), ErrConnClosed) && tc.where != "hbone.(*Conn).closeWith" {
				t.Errorf("connection error %v, want one that is ErrConnClosed", pc.Err())
			}
			// The other stream's write fails, rather than waiting for
			// the lock (or going out after half a frame).
			wrote := make(chan error, 1)
			go func() { _, err := other.Write([]byte("after")); wrote <- err }()
			select {
			case err := <-wrote:
				if err == nil {
					t.Error("a write on another stream of the closed connection succeeded")
				}
			case <-time.After(5 * time.Second):
				t.Fatal("a write on another stream is wedged 5 s after the panic")
			}
		})
	}
}

// TestCtlLoopPanicClosesConn: a panic in the write of a queued control
// frame (here the RST_STREAM of a reset), made by the connection's
// control-frame writer on a goroutine of its own, closes that
// connection, its lock free, and Config.OnPanic hears of it once. Before,
// the panic ended the process (the test binary).
func TestCtlLoopPanicClosesConn(t *testing.T) {
	var at panicpoint.Point
	panics := make(chan any, 2)
	cfg := Config{PingInterval: -1, OnPanic: func(_ *Conn, v any, _ []byte) { panics <- v }}
	c, server := servePanicky(t, cfg, func(s *Stream) { s.Respond(200, nil); io.Copy(io.Discard, s) }, false, &at)
	s, err := c.OpenStream("10.0.0.1:80", nil)
	if err != nil {
		t.Fatal(err)
	}
	at.Arm("hbone.(*Conn).ctlLoop")
	s.Reset(ErrCodeCancel)
	wantClosedUnwedged(t, c, server(), "its control-frame writer")
	wantOnePanic(t, panics, &at)
}

// wantOnePanic fails the test unless Config.OnPanic (its calls sent on
// panics) heard the socket's panic within 10 s, and only that one.
func wantOnePanic(t *testing.T, panics <-chan any, at *panicpoint.Point) {
	t.Helper()
	select {
	case v := <-panics:
		if v != errTestWritePanic {
			t.Errorf("OnPanic heard %v, want the socket's panic", v)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("OnPanic not called within 10 s (armed %v)", at.Armed())
	}
	select {
	case v := <-panics:
		t.Errorf("OnPanic called a second time: %v", v)
	default:
	}
}

// TestOwnGoroutinePanicClosesConn: a panic in the GOAWAY write the read
// loop makes when the peer breaks the protocol (here a PING on a
// stream), or keepalive makes when the peer answers no PING, closes the
// connection, its lock free, and Config.OnPanic hears of it once.
// Before, those goroutines had nothing to recover the panic: the
// process (the test binary) ended.
func TestOwnGoroutinePanicClosesConn(t *testing.T) {
	for _, tc := range []struct {
		name, where string
		cfg         Config
		peer        func(tc *tls.Conn) // after the handshake and its SETTINGS
	}{
		{"read loop", "hbone.(*Conn).readLoop", Config{PingInterval: -1}, func(tc *tls.Conn) {
			tc.Write(appendFrame(nil, framePing, 0, 1, make([]byte, 8)))
			io.Copy(io.Discard, tc)
		}},
		{"keepalive", "hbone.(*Conn).keepalive", Config{PingInterval: 20 * time.Millisecond, PingTimeout: 60 * time.Millisecond},
			func(tc *tls.Conn) { io.Copy(io.Discard, tc) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var at panicpoint.Point
			at.Arm(tc.where)
			panics := make(chan any, 2)
			cfg := tc.cfg
			cfg.OnPanic = func(_ *Conn, v any, _ []byte) { panics <- v }
			peerDone := make(chan struct{})
			c := clientOf(t, cfg, func(addr string) (net.Conn, error) {
				raw, err := net.Dial("tcp", addr)
				if err != nil {
					return nil, err
				}
				return &writePanicConn{Conn: raw, at: &at}, nil
			}, func(raw net.Conn, scfg *tls.Config) {
				defer close(peerDone)
				defer raw.Close()
				tc2 := tls.Server(raw, scfg)
				if tc2.Handshake() != nil {
					return
				}
				tc2.Write(appendSettings(nil))
				tc.peer(tc2)
			})
			select {
			case <-c.Done():
			case <-time.After(10 * time.Second):
				t.Fatal("the connection is still open 10 s after it was armed to panic")
			}
			if !lockFree(c) {
				t.Fatal("the write lock is still held 5 s after the panic")
			}
			select {
			case <-peerDone:
			case <-time.After(10 * time.Second):
				t.Error("the peer's connection is still open 10 s after ours closed")
			}
			wantOnePanic(t, panics, &at)
		})
	}
}
