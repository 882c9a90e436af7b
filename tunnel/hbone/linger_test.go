package hbone

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambit-mesh/ambit/internal/testenv"
)

// closeReadGate holds the reads of the connection it wraps while armed, as
// a read loop busy elsewhere would, until a read deadline is set or the
// connection closes (not when a deadline is cleared). It hides the socket's SyscallConn (so the reads
// come through it) but keeps its half-close.
type closeReadGate struct {
	net.Conn
	tcp     *net.TCPConn
	mu      sync.Mutex
	armed   bool
	holding chan struct{} // closed once a read waits at the gate
	open    chan struct{}
}

func (g *closeReadGate) arm() {
	g.mu.Lock()
	g.armed, g.holding, g.open = true, make(chan struct{}), make(chan struct{})
	g.mu.Unlock()
}

func (g *closeReadGate) let() {
	g.mu.Lock()
	if g.armed {
		g.armed = false
		close(g.open)
	}
	g.mu.Unlock()
}

func (g *closeReadGate) Read(p []byte) (int, error) {
	g.mu.Lock()
	armed, holding, open := g.armed, g.holding, g.open
	g.mu.Unlock()
	if armed {
		select {
		case <-holding:
		default:
			close(holding)
		}
		<-open
	}
	return g.Conn.Read(p)
}

// A deadline opens the gate; clearing one (the read loop's, once the
// preface's wait is over) does not.
func (g *closeReadGate) SetReadDeadline(t time.Time) error {
	if !t.IsZero() {
		g.let()
	}
	return g.Conn.SetReadDeadline(t)
}

func (g *closeReadGate) SetDeadline(t time.Time) error {
	if !t.IsZero() {
		g.let()
	}
	return g.Conn.SetDeadline(t)
}

func (g *closeReadGate) Close() error {
	g.let()
	return g.Conn.Close()
}

func (g *closeReadGate) CloseWrite() error { return g.tcp.CloseWrite() }

// unread is how many bytes wait in the socket's receive queue.
func unread(t *testing.T, c *net.TCPConn) int {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var n int
	var ierr error
	if err := rc.Control(func(fd uintptr) { n, ierr = unix.IoctlGetInt(int(fd), unix.SIOCINQ) }); err != nil {
		t.Fatal(err)
	}
	if ierr != nil {
		t.Fatal(ierr)
	}
	return n
}

// TestCloseNeverResetsThePeer: a connection closed while its peer's
// last frames wait unread in the socket ends with close_notify and a
// FIN, not a reset. close(2) on a socket with unread bytes makes the
// kernel send a RST and drop what the socket had not sent yet: at an
// agent's upgrade the server's Shutdown closed under the client's own
// GOAWAY (sent when it saw the server's first one) and threw away the
// last DATA of a stream the final GOAWAY had promised to serve
// (TestShutdownRefusesNoOpenedStream failed 4 runs in 120 under -race).
// Now the socket half-closes and goes on reading until the peer's end.
func TestCloseNeverResetsThePeer(t *testing.T) {
	ccfg, scfg := testTLS(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	type served struct {
		c    *Conn
		gate *closeReadGate
	}
	srvc := make(chan served, 1)
	go func() {
		raw, err := ln.Accept()
		if err != nil {
			return
		}
		g := &closeReadGate{Conn: raw, tcp: raw.(*net.TCPConn)}
		c, err := Server(context.Background(), g, scfg, Config{PingInterval: -1}, nil, echoHandler)
		if err != nil {
			t.Error(err)
			raw.Close()
			return
		}
		srvc <- served{c, g}
	}()
	raw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { raw.Close() })
	tc := tls.Client(raw, ccfg)
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	if _, err := tc.Write(append([]byte(clientPreface), appendSettings(nil)...)); err != nil {
		t.Fatal(err)
	}
	var s served
	select {
	case s = <-srvc:
	case <-time.After(5 * time.Second):
		t.Fatal("no server connection")
	}
	t.Cleanup(func() { s.c.Close() })
	// The server's read loop waits at the gate; the client's next
	// frame (a PING) stays in the server's socket, unread.
	testenv.Eventually(t, "the server's SETTINGS read", func() bool {
		s.c.mu.Lock()
		defer s.c.mu.Unlock()
		return s.c.peerMaxFrame != 0
	})
	// The loop already waits in a read: a first PING ends that one, the
	// next read stops at the gate, and the second PING stays unread.
	s.gate.arm()
	ping := appendFrame(nil, framePing, 0, 0, make([]byte, 8))
	if _, err := tc.Write(ping); err != nil {
		t.Fatal(err)
	}
	select {
	case <-s.gate.holding:
	case <-time.After(5 * time.Second):
		t.Fatal("the server's read loop never came back to the socket")
	}
	if _, err := tc.Write(ping); err != nil {
		t.Fatal(err)
	}
	srvTCP := s.gate.tcp
	testenv.Eventually(t, "the client's PING in the server's socket", func() bool { return unread(t, srvTCP) > 0 })

	s.c.Close()

	// The client reads the server's frames and close_notify, then what
	// the socket says after them: the FIN (EOF), or a reset.
	_ = raw.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.Copy(io.Discard, tc); err != nil {
		t.Fatalf("reading up to the server's close_notify: %v", err)
	}
	var b [512]byte
	n, err := raw.Read(b[:])
	switch {
	case errors.Is(err, syscall.ECONNRESET):
		t.Fatalf("the server's close reset the connection (%d bytes, %v); want close_notify and a FIN", n, err)
	case err != io.EOF:
		t.Fatalf("after close_notify: %d bytes, %v; want the FIN (EOF)", n, err)
	}
	// The client ends its side: the server's socket closes then, not
	// at lingerWait.
	raw.Close()
	select {
	case <-s.c.readDone:
	case <-time.After(lingerWait / 2):
		t.Fatal("the server went on reading after the client's FIN")
	}
}
