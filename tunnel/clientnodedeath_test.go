package tunnel_test

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/tunnel"
	"github.com/ambit-mesh/ambit/tunnel/hbone"
	"github.com/ambit-mesh/ambit/tunnel/internal/meshtest"
)

// TestClientNodeDeathResetsServerApps: A's node goes dark (every packet
// in and out of A's pod dropped: no FIN, no RST) while A's apps have two
// connections open to B's app, one idle and one that B's app streams an
// answer into. B's agent pings the HBONE connection, gets no answer, and
// closes it; both of B's app connections are reset (the client never
// ended its side: an EOF would pass for a complete request), the idle
// one's read and the streaming one's write fail with ECONNRESET. Before,
// only clients pinged: B held the HBONE connection, and B's app its
// sockets, until TCP keepalive gave up on the idle connection (15 s idle
// + 9 probes 15 s apart) or, with bytes in flight, the kernel's
// retransmissions did (~15 min): here, past the 10 s bound.
func TestClientNodeDeathResetsServerApps(t *testing.T) {
	testenv.RequireRoot(t)
	// Closed 1.0 to 1.2 s after the last frame (+1 s when a writer is
	// blocked on the full socket: closeWith's write deadline).
	m := meshtest.New(t, meshtest.Options{Config: tunnel.Config{
		HBONE: hbone.Config{PingInterval: 200 * time.Millisecond, PingTimeout: 800 * time.Millisecond},
	}})
	ln := m.B.Listen(t, "[::]:8080")
	accepted := make(chan net.Conn, 2)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	dst := netip.AddrPortFrom(m.B.Pod.IP4, 8080)
	open := func() (client, app net.Conn) {
		t.Helper()
		c, err := m.A.Dial(dst)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		if _, err := c.Write([]byte("hi")); err != nil {
			t.Fatal(err)
		}
		var a net.Conn
		select {
		case a = <-accepted:
		case <-time.After(10 * time.Second):
			t.Fatal("B's app accepted no connection")
		}
		t.Cleanup(func() { a.Close() })
		a.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.ReadFull(a, make([]byte, 2)); err != nil {
			t.Fatal(err)
		}
		a.SetDeadline(time.Time{})
		return c, a
	}
	_, idle := open()
	_, streaming := open()

	revive := killNode(t, m.A.Pod)
	defer revive()
	dead := time.Now()
	const bound = 10 * time.Second
	writeErr := make(chan error, 1)
	go func() {
		streaming.SetWriteDeadline(dead.Add(bound))
		b := make([]byte, 64<<10)
		for {
			if _, err := streaming.Write(b); err != nil {
				writeErr <- err
				return
			}
		}
	}()
	idle.SetReadDeadline(dead.Add(bound))
	_, err := idle.Read(make([]byte, 1))
	took := time.Since(dead)
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		t.Errorf("B's idle app connection still open %v after A's node died", bound)
	case !errors.Is(err, syscall.ECONNRESET):
		t.Errorf("B's idle app connection after A's node died: %v, want a reset", err)
	default:
		t.Logf("idle app connection reset %v after A's node died", took.Round(10*time.Millisecond))
	}
	err = <-writeErr
	took = time.Since(dead)
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		t.Errorf("B's streaming app connection still open %v after A's node died", bound)
	case !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.EPIPE):
		t.Errorf("B's streaming app connection after A's node died: %v, want a reset", err)
	default:
		t.Logf("streaming app connection reset %v after A's node died: %v", took.Round(10*time.Millisecond), err)
	}
}
