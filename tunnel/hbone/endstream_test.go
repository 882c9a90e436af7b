package hbone

import (
	"context"
	"errors"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"
)

// countConn counts the writes (bursts) a connection makes.
type countConn struct {
	net.Conn
	writes atomic.Int32
}

func (c *countConn) Write(p []byte) (int, error) {
	c.writes.Add(1)
	return c.Conn.Write(p)
}

// appPair is a loopback TCP connection: app is what Splice joins, peer
// plays the app.
func appPair(t *testing.T) (app *net.TCPConn, peer net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	peer, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { peer.Close(); c.Close() })
	return c.(*net.TCPConn), peer
}

// TestAnswerCarriesEndStream: a server app that answers and closes at
// once (request, response, close) has its answer and its FIN leave as one
// DATA frame with END_STREAM, in one write; one that resets after its
// answer still resets the stream.
func TestAnswerCarriesEndStream(t *testing.T) {
	for _, tc := range []struct {
		name  string
		reset bool
	}{{"fin", false}, {"rst", true}} {
		t.Run(tc.name, func(t *testing.T) {
			ccfg, scfg := testTLS(t)
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			var cc *countConn
			var before, after atomic.Int32
			spliced := make(chan struct{})
			go func() {
				raw, err := ln.Accept()
				if err != nil {
					return
				}
				cc = &countConn{Conn: raw}
				_, err = Server(context.Background(), cc, scfg, Config{}, nil, func(s *Stream) {
					app, peer := appPair(t)
					peer.Write([]byte("answer"))
					if tc.reset {
						peer.(*net.TCPConn).SetLinger(0)
					}
					peer.Close()
					time.Sleep(50 * time.Millisecond) // the FIN (or RST) is there
					s.Respond(200, nil)
					before.Store(cc.writes.Load())
					s.Splice(app)
					after.Store(cc.writes.Load())
					close(spliced)
				})
				if err != nil {
					t.Error(err)
				}
			}()
			raw, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			c, err := Client(context.Background(), raw, ccfg, Config{})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			s, err := c.OpenStream("10.0.0.1:80", nil)
			if err != nil {
				t.Fatal(err)
			}
			if st, _, err := s.Response(context.Background()); st != 200 || err != nil {
				t.Fatalf("response %d %v", st, err)
			}
			got, err := io.ReadAll(s)
			if tc.reset {
				// (The kernel reports the reset before data still
				// queued, as it would to a plain TCP reader.)
				if !errors.As(err, new(StreamError)) {
					t.Errorf("after an app reset: read %q, %v, want a stream reset", got, err)
				}
				return
			}
			if string(got) != "answer" || err != nil {
				t.Fatalf("read %q, %v, want the answer", got, err)
			}
			s.CloseWrite()
			select {
			case <-spliced:
			case <-time.After(5 * time.Second):
				t.Fatal("Splice did not end")
			}
			if n := after.Load() - before.Load(); n != 1 {
				t.Errorf("answer and END_STREAM took %d writes, want 1", n)
			}
		})
	}
}
