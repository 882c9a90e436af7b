package tunnel_test

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"
)

// appEnd is how a client app's connection ended: the error of its write
// (nil if the write went through) and of its read to the end.
type appEnd struct {
	got        []byte
	werr, rerr error
}

// reset reports whether the app was told its connection was reset. On
// Linux the reset is reported once: to a write if one comes after it
// (ECONNRESET, then EPIPE), the reads after that see a plain EOF; so a
// write error counts, as it does for the app.
func (e appEnd) reset() bool {
	isReset := func(err error) bool {
		return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
	}
	return len(e.got) == 0 && (isReset(e.werr) || isReset(e.rerr))
}

func (e appEnd) String() string {
	return fmt.Sprintf("read %q (%v), write %v", e.got, e.rerr, e.werr)
}

// TestRefusedConnectResetsApp: A's app connects to a port of meshed pod
// B where nothing listens. B's agent answers the CONNECT with 503 (its
// dial of the app was refused), END_STREAM on the response, then
// RST_STREAM(NO_ERROR); A's app must see a reset, as it would connecting
// to the port without the mesh, never a clean EOF (which an HTTP client
// reports as an empty reply from a server that accepted). Both orders of
// an app: one that waits for the server to speak first, one that sends
// its request at once.
func TestRefusedConnectResetsApp(t *testing.T) {
	m := newMesh(t)
	dst := netip.AddrPortFrom(m.B.Pod.IP4, 8099) // nothing listens
	const N = 20
	for _, tc := range []struct {
		name  string
		write bool
	}{{"silent", false}, {"writes first", true}} {
		t.Run(tc.name, func(t *testing.T) {
			eofs, resetAtConnect, resetAtWrite := 0, 0, 0
			for i := 0; i < N; i++ {
				c, err := m.A.Dial(dst)
				if errors.Is(err, syscall.ECONNRESET) {
					// The agent accepted, and the refusal came back
					// before connect(2) returned: a reset all the same.
					resetAtConnect++
					continue
				}
				if err != nil {
					t.Fatal(err)
				}
				var e appEnd
				if tc.write {
					_, e.werr = c.Write([]byte("GET / HTTP/1.0\r\n\r\n"))
				}
				c.SetReadDeadline(time.Now().Add(10 * time.Second))
				e.got, e.rerr = io.ReadAll(c)
				c.Close()
				if e.werr != nil {
					resetAtWrite++
				}
				if !e.reset() {
					eofs++
					if eofs <= 3 {
						t.Errorf("connection %d: %v, want a reset", i, e)
					}
				}
			}
			if eofs > 0 {
				t.Errorf("%d of %d refused connections ended without a reset", eofs, N)
			}
			// A reset a write reported leaves the reads a plain EOF: a
			// test that ignores the write's error sees that EOF.
			t.Logf("%d of %d reset before connect(2) returned, %d reported to the write", resetAtConnect, N, resetAtWrite)
		})
	}
	// Each was refused by B's agent (its dial of the app) and counted by
	// A's as the 503 it got.
	want := float64(2 * N)
	waitMetric(t, m.B, "ambit_tunnel_connections_failed_total", map[string]string{"direction": "inbound", "reason": "upstream_unreachable"}, want)
	waitMetric(t, m.A, "ambit_tunnel_connections_failed_total", map[string]string{"direction": "outbound", "reason": "upstream_unavailable"}, want)
}

// TestAppResetCarriedToClient: the inverse direction. B's app accepts,
// reads the request and resets (SO_LINGER 0); A's app must see a reset,
// 20 of 20, whether it reads only or has just written more.
// (TestResetCarried in mesh_test.go checks one such connection.)
func TestAppResetCarriedToClient(t *testing.T) {
	m := newMesh(t)
	ln := m.B.Listen(t, "[::]:8098")
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				b := make([]byte, 64)
				c.Read(b)
				c.(*net.TCPConn).SetLinger(0)
				c.Close()
			}()
		}
	}()
	const N = 20
	clean := 0
	for i := 0; i < N; i++ {
		c, err := m.A.Dial(netip.AddrPortFrom(m.B.Pod.IP4, 8098))
		if err != nil {
			t.Fatal(err)
		}
		var e appEnd
		_, e.werr = c.Write([]byte("hello\n"))
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		e.got, e.rerr = io.ReadAll(c)
		c.Close()
		if !e.reset() {
			clean++
			if clean <= 3 {
				t.Errorf("connection %d: %v, want a reset", i, e)
			}
		}
	}
	if clean > 0 {
		t.Errorf("%d of %d connections the server app reset ended without a reset", clean, N)
	}
}
