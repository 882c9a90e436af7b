package hbone

import (
	"context"
	"encoding/binary"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
)

// tap relays one TCP connection to dst and keeps what each side sent.
type tap struct {
	ln   net.Listener
	mu   sync.Mutex
	sent [2][]byte // [0] dialer → dst, [1] dst → dialer
	done chan struct{}
}

func newTap(t *testing.T, dst string) *tap {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	tp := &tap{ln: ln, done: make(chan struct{})}
	go func() {
		a, err := ln.Accept()
		if err != nil {
			return
		}
		b, err := net.Dial("tcp", dst)
		if err != nil {
			a.Close()
			return
		}
		var wg sync.WaitGroup
		pipe := func(dir int, from, to *net.TCPConn) {
			defer wg.Done()
			buf := make([]byte, 32<<10)
			for {
				n, err := from.Read(buf)
				if n > 0 {
					tp.mu.Lock()
					tp.sent[dir] = append(tp.sent[dir], buf[:n]...)
					tp.mu.Unlock()
					to.Write(buf[:n])
				}
				if err != nil {
					to.CloseWrite()
					return
				}
			}
		}
		wg.Add(2)
		go pipe(0, a.(*net.TCPConn), b.(*net.TCPConn))
		go pipe(1, b.(*net.TCPConn), a.(*net.TCPConn))
		wg.Wait()
		a.Close()
		b.Close()
		close(tp.done)
	}()
	return tp
}

// lastRecord is the type and length of the last TLS record in b.
func lastRecord(t *testing.T, b []byte) (typ byte, n int) {
	t.Helper()
	for len(b) > 0 {
		if len(b) < 5 {
			t.Fatalf("%d bytes of a torn record header at the end", len(b))
		}
		typ, n = b[0], int(binary.BigEndian.Uint16(b[3:5]))
		if len(b) < 5+n {
			t.Fatalf("last record torn: %d of %d bytes", len(b)-5, n)
		}
		b = b[5+n:]
	}
	return typ, n
}

// TestGracefulCloseSendsCloseNotify: a graceful close (Close, and the
// server's two-step Shutdown) ends the TLS session with close_notify
// before the FIN, so the peer can tell the end of the connection from a
// cut (a truncation attack, or a crash). In TLS 1.3 the alert is
// encrypted: an application_data record of 2 bytes of alert, 1 of inner
// content type and a 16-byte AEAD tag, 19 bytes, shorter than any
// record that carries HTTP/2 (a frame header alone is 9 bytes). The
// abort path (abortConn in tunnel) closes the TCP socket under TLS and
// sends none: it is for peers that stopped reading.
func TestGracefulCloseSendsCloseNotify(t *testing.T) {
	const closeNotifyLen = 2 + 1 + 16
	for _, tc := range []struct {
		name  string
		close func(client *Conn, server func() *Conn) (dir int)
	}{
		{"client Close", func(c *Conn, _ func() *Conn) int { c.Close(); return 0 }},
		{"server Shutdown", func(_ *Conn, srv func() *Conn) int {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			srv().Shutdown(ctx)
			return 1
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var tp *tap
			c, srv := serveVia(t, Config{}, echoHandler, func(addr string) string {
				tp = newTap(t, addr)
				return tp.ln.Addr().String()
			})
			// One stream end to end, so both sides have written records.
			echoOnce(t, c, context.Background())
			srv()
			dir := tc.close(c, srv)
			// The other side sees the end and closes too.
			select {
			case <-tp.done:
			case <-time.After(10 * time.Second):
				t.Fatal("the connection did not end after the close")
			}
			tp.mu.Lock()
			b := tp.sent[dir]
			tp.mu.Unlock()
			typ, n := lastRecord(t, b)
			if typ != 23 || n != closeNotifyLen {
				t.Fatalf("last record before the FIN: type %d, %d bytes; want the encrypted close_notify (type 23, %d bytes)", typ, n, closeNotifyLen)
			}
		})
	}
}

// gateConn holds the first write after arm, as a socket too full to
// take it would, and tells held. The write goes on once a write
// deadline is set (closeWith bounding its wait for the writer: a peer
// that drains) or the socket closes; with dead, only when that deadline
// passes, and then it fails, as toward a peer that stopped reading.
type gateConn struct {
	net.Conn
	dead bool
	mu   sync.Mutex
	// armed: the next write waits; waiting: one does, until open.
	armed, waiting bool
	held, open     chan struct{}
	timedOut       bool
}

func (g *gateConn) arm() {
	g.mu.Lock()
	g.armed = true
	g.held, g.open = make(chan struct{}), make(chan struct{})
	g.mu.Unlock()
}

func (g *gateConn) Write(b []byte) (int, error) {
	g.mu.Lock()
	if !g.armed {
		g.mu.Unlock()
		return g.Conn.Write(b)
	}
	g.armed, g.waiting = false, true
	close(g.held)
	g.mu.Unlock()
	<-g.open
	g.mu.Lock()
	timedOut := g.timedOut
	g.mu.Unlock()
	if timedOut {
		return 0, os.ErrDeadlineExceeded
	}
	return g.Conn.Write(b)
}

// let lets a waiting write go on; mu held.
func (g *gateConn) let(timedOut bool) {
	if g.waiting {
		g.waiting, g.timedOut = false, timedOut
		close(g.open)
	}
}

func (g *gateConn) SetWriteDeadline(t time.Time) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.waiting && !t.IsZero() {
		if !g.dead {
			g.let(false)
		} else {
			time.AfterFunc(time.Until(t), func() {
				g.mu.Lock()
				g.let(true)
				g.mu.Unlock()
			})
		}
	}
	return g.Conn.SetWriteDeadline(t)
}

func (g *gateConn) Close() error {
	g.mu.Lock()
	g.let(true)
	g.mu.Unlock()
	return g.Conn.Close()
}

// closeDuringWrite runs a connection through the tap with its client's
// socket behind a gateConn, holds a frame's tls.Write at the gate (with
// wmu, as a writer does), calls Close meanwhile, and returns the records
// the client sent, the last before the FIN last.
func closeDuringWrite(t *testing.T, dead bool) []int {
	var tp *tap
	var g *gateConn
	c, srv := serveWrapped(t, Config{PingInterval: -1}, echoHandler, func(addr string) string {
		tp = newTap(t, addr)
		return tp.ln.Addr().String()
	}, func(raw net.Conn, server bool) net.Conn {
		if server {
			return raw
		}
		g = &gateConn{Conn: raw, dead: dead}
		return g
	})
	srv()
	// One stream end to end first, and the control frames it leaves
	// queued written: the server's SETTINGS reaches the client whenever
	// it does, and its ACK (ctlLoop, under wmu) could otherwise be the
	// write the gate holds, or slip in between the PING and Close's
	// close_notify (both seen under -race: 3 runs in 16).
	echoOnce(t, c, context.Background())
	testenv.Eventually(t, "the client's control frames written", func() bool {
		c.wmu.Lock()
		defer c.wmu.Unlock()
		return c.ctlQueued.Load() == 0
	})
	wrote := make(chan error, 1)
	armed := make(chan struct{})
	go func() {
		c.wmu.Lock()
		// Armed under wmu: no other writer can reach the socket first.
		g.arm()
		close(armed)
		// Uncorked: straight through tls.Write to the socket.
		_, err := c.nc.Write(appendFrame(nil, framePing, 0, 0, make([]byte, 8)))
		c.wmu.Unlock()
		wrote <- err
	}()
	<-armed
	<-g.held
	closed := make(chan struct{})
	go func() { c.Close(); close(closed) }()
	for _, ch := range []chan struct{}{closed, tp.done} {
		select {
		case <-ch:
		case <-time.After(10 * time.Second):
			t.Fatal("the connection did not end after the close")
		}
	}
	<-wrote
	tp.mu.Lock()
	defer tp.mu.Unlock()
	var sizes []int
	for b := tp.sent[0]; len(b) >= 5; b = b[5+int(binary.BigEndian.Uint16(b[3:5])):] {
		sizes = append(sizes, int(binary.BigEndian.Uint16(b[3:5])))
	}
	lastRecord(t, tp.sent[0]) // whole records only
	return sizes
}

// TestCloseWaitsForWriteInFlight: Close while a frame's write is in
// flight waits for it (bounded, TestCloseAbortsAfterStuckWrite), then
// ends with close_notify. crypto/tls's Close sends none while a Write is
// in flight, so a writer (ctlLoop's SETTINGS ACK) still in tls.Write as
// Close ran cost the peer its close_notify: TestGracefulCloseSendsCloseNotify
// failed about 1 run in 300 on a busy host.
func TestCloseWaitsForWriteInFlight(t *testing.T) {
	const pingRecord, closeNotifyLen = 9 + 8 + 1 + 16, 2 + 1 + 16
	sizes := closeDuringWrite(t, false)
	if n := len(sizes); n < 2 || sizes[n-2] != pingRecord || sizes[n-1] != closeNotifyLen {
		t.Fatalf("client records %v; want the PING in flight (%d bytes), then close_notify (%d), last", sizes, pingRecord, closeNotifyLen)
	}
}

// TestCloseAbortsAfterStuckWrite: Close's wait for a writer stuck
// toward a peer that stopped reading ends with its write deadline; the
// write was cut, maybe mid-record, so nothing is written after it, not
// even close_notify (which could wait 5 s more on the full socket).
func TestCloseAbortsAfterStuckWrite(t *testing.T) {
	const closeNotifyLen = 2 + 1 + 16
	sizes := closeDuringWrite(t, true)
	if n := len(sizes); n > 0 && sizes[n-1] == closeNotifyLen {
		t.Fatalf("client records %v: close_notify written after a cut write", sizes)
	}
}
