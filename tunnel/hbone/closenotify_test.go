package hbone

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"sync"
	"testing"
	"time"
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
			s, err := c.OpenStream("10.0.0.1:80", nil)
			if err != nil {
				t.Fatal(err)
			}
			s.Write([]byte("hello"))
			s.CloseWrite()
			if got, err := io.ReadAll(s); err != nil || string(got) != "hello" {
				t.Fatalf("echo: %q %v", got, err)
			}
			s.Close()
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
