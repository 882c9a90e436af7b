package hbone

import (
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
			c, server := serveWrapped(t, Config{PingInterval: -1}, func(s *Stream) {
				streams <- s
				<-done
			}, func(a string) string { return a }, func(raw net.Conn, server bool) net.Conn {
				if server != tc.server {
					return raw
				}
				return &writePanicConn{Conn: raw, at: &at}
			})
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
			select {
			case <-pc.Done():
			case <-time.After(5 * time.Second):
				t.Fatal("the connection is still open 5 s after a write panicked under its write lock")
			}
			if !pc.wmu.TryLock() {
				t.Fatal("the write lock is still held after the panicked write")
			}
			pc.wmu.Unlock()
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
			if !tc.server {
				if _, err := pc.OpenStream("10.0.0.1:80", nil); err == nil {
					t.Error("a new stream opened on the closed connection")
				}
			}
			// The peer sees the connection end too.
			peer := server()
			if tc.server {
				peer = c
			}
			select {
			case <-peer.Done():
			case <-time.After(10 * time.Second):
				t.Error("the peer's connection is still open 10 s after the panicked side closed")
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
	c, server := serveWrapped(t, cfg, func(s *Stream) { s.Respond(200, nil); io.Copy(io.Discard, s) },
		func(a string) string { return a }, func(raw net.Conn, server bool) net.Conn {
			if server {
				return raw
			}
			return &writePanicConn{Conn: raw, at: &at}
		})
	s, err := c.OpenStream("10.0.0.1:80", nil)
	if err != nil {
		t.Fatal(err)
	}
	at.Arm("hbone.(*Conn).ctlLoop")
	s.Reset(ErrCodeCancel)
	select {
	case v := <-panics:
		if v != errTestWritePanic {
			t.Errorf("OnPanic heard %v, want the socket's panic", v)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("OnPanic not called 10 s after the reset (armed %v)", at.Armed())
	}
	select {
	case <-c.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the connection is still open 5 s after its control-frame writer panicked")
	}
	if !c.wmu.TryLock() {
		t.Fatal("the write lock is still held after the control-frame writer panicked")
	}
	c.wmu.Unlock()
	if _, err := c.OpenStream("10.0.0.1:80", nil); err == nil {
		t.Error("a new stream opened on the closed connection")
	}
	select {
	case <-server().Done():
	case <-time.After(10 * time.Second):
		t.Error("the server's connection is still open 10 s after the client's closed")
	}
	select {
	case v := <-panics:
		t.Errorf("OnPanic called a second time: %v", v)
	default:
	}
}
