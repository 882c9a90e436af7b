package hbone

import (
	"context"
	"crypto/x509"
	"io"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestHandshakeReads: Config.HandshakeReads follows Server's handshake
// on its socket: reading (before each read), waiting while the client
// owes its ClientHello and its answer to our flight, on the socket
// Server was given, and nothing once the handshake is over (the
// tunnel's bound on pending handshakes tells whose turn it is from it).
// With reads into a buffer of ours (the default) and straight into
// crypto/tls's (SocketReadSize < 0).
func TestHandshakeReads(t *testing.T) {
	for _, tc := range []struct {
		name     string
		readSize int
	}{{"buffered", 0}, {"unbuffered", -1}} {
		t.Run(tc.name, func(t *testing.T) {
			ccfg, scfg := testTLS(t)
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			var mu sync.Mutex
			var events []string
			var srvRaw net.Conn
			note := func(e string) {
				mu.Lock()
				events = append(events, e)
				mu.Unlock()
			}
			// until waits for the server's n-th report of waiting.
			until := func(n int) {
				for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
					mu.Lock()
					waits := 0
					for _, e := range slices.Compact(slices.Clone(events)) {
						if e == "wait" {
							waits++
						}
					}
					mu.Unlock()
					if waits >= n {
						return
					}
					if time.Now().After(deadline) {
						t.Errorf("the server never reported its wait %d", n)
						return
					}
				}
			}
			cfg := Config{SocketReadSize: tc.readSize, HandshakeReads: func(raw net.Conn, waiting bool) {
				if raw != srvRaw {
					t.Errorf("HandshakeReads called with %v, not Server's socket", raw)
				}
				if waiting {
					note("wait")
				} else {
					note("read")
				}
			}}
			scfg.VerifyPeerCertificate = func([][]byte, [][]*x509.Certificate) error { note("cert"); return nil }
			srv := make(chan *Conn, 1)
			go func() {
				raw, err := ln.Accept()
				if err != nil {
					return
				}
				srvRaw = raw
				c, err := Server(context.Background(), raw, scfg, cfg, nil, echoHandler)
				if err != nil {
					t.Error(err)
					close(srv)
					return
				}
				note("done")
				srv <- c
			}()
			raw, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			// The client sends its ClientHello, and its answer to our
			// flight, only once the server waits for them.
			until(1)
			c, err := Client(context.Background(), &slowAnswer{Conn: raw, before: func() { until(2) }}, ccfg, Config{})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			sc := <-srv
			if sc == nil {
				t.FailNow()
			}
			defer sc.Close()
			// A stream after the handshake: its reads are not reported.
			s, err := c.OpenStream("10.0.0.1:80", nil)
			if err != nil {
				t.Fatal(err)
			}
			io.WriteString(s, "x")
			s.CloseWrite()
			if b, err := io.ReadAll(s); err != nil || string(b) != "x" {
				t.Fatalf("echo: %q, %v", b, err)
			}
			mu.Lock()
			got := strings.Join(slices.Compact(slices.Clone(events)), " ")
			mu.Unlock()
			// Compacted: a read that finds nothing reports both.
			if want := "read wait read wait read cert done"; got != want {
				t.Errorf("events %q, want %q: (reading, waiting for the ClientHello), (reading, waiting for the answer), reading, the certificate, done, no more", got, want)
			}
		})
	}
}

// slowAnswer calls before ahead of the client's first write after its
// ClientHello (its answer to the server's flight).
type slowAnswer struct {
	net.Conn
	writes int
	before func()
}

func (s *slowAnswer) Write(b []byte) (int, error) {
	if s.writes++; s.writes == 2 {
		s.before()
	}
	return s.Conn.Write(b)
}
