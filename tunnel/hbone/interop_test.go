package hbone

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// Peers that are not ours, as they are: golang.org/x/net/http2 (Istio's
// Go HBONE server), over real TLS on loopback.

// xnetServer is a client Conn to x/net's HTTP/2 server (Istio's Go
// HBONE uses it) serving h.
func xnetServer(t testing.TB, h http.Handler) *Conn {
	t.Helper()
	return clientOfTLS(t, Config{PingInterval: -1}, func(tc *tls.Conn) {
		(&http2.Server{}).ServeConn(tc, &http2.ServeConnOpts{Handler: h})
	})
}

// TestXNetServerSmallReadsUpload: our client sends to an x/net server
// whose handler reads in 4 KiB reads (a bufio.Reader's default size).
// x/net returns credit at every read of 4 KiB or more, two
// WINDOW_UPDATEs (stream and connection) each, and its server allows
// 1 MiB frames, so we send 64 KiB ones: 32 WINDOW_UPDATEs per DATA frame
// we send, from a peer that does nothing wrong. The WINDOW_UPDATE budget
// must not cut such an upload with ENHANCE_YOUR_CALM.
func TestXNetServerSmallReadsUpload(t *testing.T) {
	const size = 8 << 20
	got := make(chan int64, 1)
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(200)
		w.(http.Flusher).Flush()
		var n int64
		buf := make([]byte, 4096)
		for {
			k, err := r.Body.Read(buf)
			n += int64(k)
			if err != nil {
				break
			}
		}
		got <- n
	})
	c := xnetServer(t, h)
	s, err := c.OpenStream("10.0.0.1:80", nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if st, _, err := s.Response(ctx); err != nil || st != 200 {
		t.Fatalf("CONNECT: %d, %v", st, err)
	}
	// At the pace of an app (or a network) slower than the server: the
	// window never fills, so every frame is a full 64 KiB one.
	buf := make([]byte, 64<<10)
	for n := 0; n < size; n += len(buf) {
		if _, err := s.Write(buf); err != nil {
			t.Fatalf("write after %d bytes: %v (connection: %v)", n, err, c.Err())
		}
		time.Sleep(time.Millisecond)
	}
	if err := s.CloseWrite(); err != nil {
		t.Fatalf("CloseWrite: %v (connection: %v)", err, c.Err())
	}
	select {
	case n := <-got:
		if n != size {
			t.Fatalf("server read %d of %d bytes (connection: %v)", n, size, c.Err())
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("upload did not end within 30 s (connection: %v)", c.Err())
	}
}

// TestXNetClientManyStreamsEcho: an x/net client (Istio's Go HBONE
// client) opens many CONNECT streams at once on one connection to our
// server and echoes a few MiB through each, reading in 4 KiB reads: none
// of the abuse limits (handler queue, WINDOW_UPDATE budget, big reads)
// may cut a client that does nothing wrong.
func TestXNetClientManyStreamsEcho(t *testing.T) {
	const streams, size = 64, 2 << 20
	ccfg, scfg := testTLS(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	srv := make(chan *Conn, 4)
	go func() {
		for {
			raw, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				c, err := Server(context.Background(), raw, scfg, Config{}, nil, echoHandler)
				if err != nil {
					t.Error(err)
					return
				}
				t.Cleanup(func() { c.Close() })
				srv <- c
			}()
		}
	}()
	var dials atomic.Int32
	tr := &http2.Transport{
		DialTLSContext: func(ctx context.Context, _, _ string, _ *tls.Config) (net.Conn, error) {
			dials.Add(1)
			var d net.Dialer
			raw, err := d.DialContext(ctx, "tcp", ln.Addr().String())
			if err != nil {
				return nil, err
			}
			tc := tls.Client(raw, ccfg)
			if err := tc.HandshakeContext(ctx); err != nil {
				raw.Close()
				return nil, err
			}
			return tc, nil
		},
	}
	t.Cleanup(tr.CloseIdleConnections)
	errs := make(chan error, streams)
	for i := range streams {
		go func() {
			errs <- func() error {
				pr, pw := io.Pipe()
				req, err := http.NewRequest(http.MethodConnect, "https://10.0.0.1:80", pr)
				if err != nil {
					return err
				}
				req.Host = "10.0.0.1:80"
				resp, err := tr.RoundTrip(req)
				if err != nil {
					return err
				}
				defer resp.Body.Close()
				if resp.StatusCode != 200 {
					return fmt.Errorf("status %d", resp.StatusCode)
				}
				go func() {
					b := bytes.Repeat([]byte{byte(i)}, 32<<10)
					for n := 0; n < size; n += len(b) {
						if _, err := pw.Write(b); err != nil {
							return
						}
					}
					pw.Close()
				}()
				var n int
				buf := make([]byte, 4096)
				for {
					k, err := resp.Body.Read(buf)
					for _, c := range buf[:k] {
						if c != byte(i) {
							return fmt.Errorf("stream %d: byte %d is %d", i, n, c)
						}
					}
					n += k
					if err == io.EOF {
						break
					}
					if err != nil {
						return fmt.Errorf("stream %d: after %d bytes: %w", i, n, err)
					}
				}
				if n != size {
					return fmt.Errorf("stream %d: echoed %d of %d bytes", i, n, size)
				}
				return nil
			}()
		}()
	}
	for range streams {
		select {
		case err := <-errs:
			if err != nil {
				var why error
				select {
				case c := <-srv:
					why = c.Err()
				default:
				}
				t.Fatalf("%v (a server connection: %v)", err, why)
			}
		case <-time.After(60 * time.Second):
			t.Fatal("echoes did not end within 60 s")
		}
	}
	if n := dials.Load(); n != 1 {
		t.Errorf("%d connections, want 1 (all streams on one)", n)
	}
}
