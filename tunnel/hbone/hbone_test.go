package hbone

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"math/big"
	"net"
	"net/url"
	"runtime"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2/hpack"
)

// testTLS makes a throwaway CA and one cert used by both sides.
func testTLS(t testing.TB) (client, server *tls.Config) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse("spiffe://cluster.local/ns/t/sa/t")
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		URIs: []*url.URL{u}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert := tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	server = &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2"}, ClientAuth: tls.RequireAnyClientCert}
	client = &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2"}, InsecureSkipVerify: true}
	return
}

type pair struct {
	client *Conn
	srv    chan *Conn
	ln     net.Listener
}

// serve starts a TLS HBONE server on loopback with handler.
func serve(t testing.TB, cfg Config, handler func(*Stream)) (*Conn, func() *Conn) {
	t.Helper()
	return serveVia(t, cfg, handler, func(addr string) string { return addr })
}

// serveVia is serve with the client dialing via(the server's address).
func serveVia(t testing.TB, cfg Config, handler func(*Stream), via func(string) string) (*Conn, func() *Conn) {
	t.Helper()
	return serveWrapped(t, cfg, handler, via, nil)
}

// serveWrapped is serveVia with each side's socket passed through wrap
// (server: which side) before TLS; nil wrap: as they are.
func serveWrapped(t testing.TB, cfg Config, handler func(*Stream), via func(string) string, wrap func(raw net.Conn, server bool) net.Conn) (*Conn, func() *Conn) {
	t.Helper()
	if wrap == nil {
		wrap = func(raw net.Conn, _ bool) net.Conn { return raw }
	}
	srv := make(chan *Conn, 1)
	c := clientOf(t, cfg, func(addr string) (net.Conn, error) {
		raw, err := net.Dial("tcp", via(addr))
		if err != nil {
			return nil, err
		}
		return wrap(raw, false), nil
	}, func(raw net.Conn, scfg *tls.Config) {
		c, err := Server(context.Background(), wrap(raw, true), scfg, cfg, nil, handler)
		if err != nil {
			t.Error(err)
			return
		}
		srv <- c
	})
	var sc *Conn
	return c, func() *Conn {
		if sc == nil {
			sc = <-srv
		}
		return sc
	}
}

// clientOf is our client Conn (cfg; closed with the test) on a loopback
// connection whose server side is serve's: serve runs on the one
// connection a loopback listener accepts, with testTLS's server config,
// and plays the server, its TLS handshake included (ours, x/net's, one
// written by hand). dial makes the client's socket to the listener's
// address (nil: net.Dial).
func clientOf(t testing.TB, cfg Config, dial func(addr string) (net.Conn, error), serve func(raw net.Conn, scfg *tls.Config)) *Conn {
	t.Helper()
	ccfg, scfg := testTLS(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		raw, err := ln.Accept()
		if err != nil {
			return
		}
		serve(raw, scfg)
	}()
	if dial == nil {
		dial = func(addr string) (net.Conn, error) { return net.Dial("tcp", addr) }
	}
	raw, err := dial(ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c, err := Client(context.Background(), raw, ccfg, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// clientOfTLS is clientOf whose server side is a TLS connection, its
// handshake done, that serve plays by hand or with another HTTP/2 server
// (not ours); a failed handshake fails the test.
func clientOfTLS(t testing.TB, cfg Config, serve func(tc *tls.Conn)) *Conn {
	t.Helper()
	return clientOf(t, cfg, nil, func(raw net.Conn, scfg *tls.Config) {
		defer raw.Close()
		tc := tls.Server(raw, scfg)
		if err := tc.Handshake(); err != nil {
			t.Error(err)
			return
		}
		serve(tc)
	})
}

// echoHandler answers 200 and echoes the stream back, half-closing after.
func echoHandler(s *Stream) {
	if s.Request.Method != "CONNECT" {
		s.Respond(400, nil)
		return
	}
	s.Respond(200, nil)
	io.Copy(s, s)
	s.CloseWrite()
}

func TestEchoAndHalfClose(t *testing.T) {
	c, _ := serve(t, Config{}, echoHandler)
	s, err := c.OpenStream("10.0.0.1:80", []hpack.HeaderField{{Name: "baggage", Value: "k8s.namespace.name=x"}})
	if err != nil {
		t.Fatal(err)
	}
	msg := bytes.Repeat([]byte("hello hbone "), 100000)
	go func() {
		s.Write(msg)
		s.CloseWrite()
	}()
	st, _, err := s.Response(context.Background())
	if err != nil || st != 200 {
		t.Fatalf("response %d %v", st, err)
	}
	got, err := io.ReadAll(s)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, msg) {
		t.Fatalf("echo mismatch: %d bytes vs %d", len(got), len(msg))
	}
	s.Close()
	deadline := time.Now().Add(5 * time.Second)
	for c.ActiveStreams() != 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if n := c.ActiveStreams(); n != 0 {
		t.Errorf("%d streams still active after both sides ended", n)
	}
}

func TestStatusAndReset(t *testing.T) {
	reset := make(chan error, 1)
	c, _ := serve(t, Config{}, func(s *Stream) {
		switch s.Request.Authority {
		case "deny:1":
			s.Respond(401, nil)
		case "rst:1":
			s.Respond(200, nil)
			s.Reset(ErrCodeConnect)
		case "wait:1":
			s.Respond(200, nil)
			_, err := io.ReadAll(s)
			reset <- err
		}
	})
	s, _ := c.OpenStream("deny:1", nil)
	if st, _, err := s.Response(context.Background()); st != 401 || err != nil {
		t.Errorf("deny: %d %v", st, err)
	}
	s.Close()
	s, _ = c.OpenStream("rst:1", nil)
	s.Response(context.Background())
	if _, err := io.ReadAll(s); !errors.As(err, new(StreamError)) {
		t.Errorf("read after peer reset: %v, want a StreamError", err)
	}
	s, _ = c.OpenStream("wait:1", nil)
	s.Response(context.Background())
	s.Write([]byte("x"))
	s.Reset(ErrCodeCancel)
	select {
	case err := <-reset:
		var se StreamError
		if !errors.As(err, &se) || !se.Remote || se.Code != ErrCodeCancel {
			t.Errorf("server saw %v, want a remote CANCEL", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("server never saw the reset")
	}
}

// TestFlowControlBoundsMemory: a stream whose reader stalls never
// buffers more than its window, however much the writer pushes.
func TestFlowControlBoundsMemory(t *testing.T) {
	const window = 256 << 10
	release := make(chan struct{})
	var srvStream *Stream
	got := make(chan *Stream, 1)
	c, _ := serve(t, Config{StreamWindow: window, ConnWindow: 4 * window}, func(s *Stream) {
		s.Respond(200, nil)
		got <- s
		<-release
		io.Copy(io.Discard, s)
	})
	s, _ := c.OpenStream("x:1", nil)
	wrote := make(chan int64, 1)
	var mu sync.Mutex
	var total int64
	go func() {
		buf := make([]byte, 32<<10)
		for {
			n, err := s.Write(buf)
			mu.Lock()
			total += int64(n)
			mu.Unlock()
			if err != nil {
				wrote <- total
				return
			}
		}
	}()
	srvStream = <-got
	// Wait until the writer is blocked by flow control: total stops
	// growing beyond the window.
	deadline := time.Now().Add(10 * time.Second)
	for srvStream.Buffered() < window && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if b := srvStream.Buffered(); b != window {
		t.Fatalf("stalled reader buffered %d bytes, want exactly the window %d", b, window)
	}
	mu.Lock()
	pushed := total
	mu.Unlock()
	if pushed > window {
		t.Errorf("writer pushed %d bytes into a %d window", pushed, window)
	}
	close(release)
	s.Close()
}

// TestManyStreams: concurrent streams on one connection, each intact.
func TestManyStreams(t *testing.T) {
	c, _ := serve(t, Config{}, echoHandler)
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	for i := 0; i < 100; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			s, err := c.OpenStream("x:1", nil)
			if err != nil {
				errs <- err
				return
			}
			defer s.Close()
			msg := bytes.Repeat([]byte{byte(i)}, 100000+i)
			go func() { s.Write(msg); s.CloseWrite() }()
			got, err := io.ReadAll(s)
			if err != nil {
				errs <- err
				return
			}
			if sha256.Sum256(got) != sha256.Sum256(msg) {
				errs <- errors.New("mismatch")
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if _, err := c.OpenStream("x:1", nil); err != nil {
		t.Errorf("after 100 finished streams: %v", err)
	}
}

func TestGoroutinesEnd(t *testing.T) {
	before := runtime.NumGoroutine()
	func() {
		c, srv := serve(t, Config{}, echoHandler)
		s, _ := c.OpenStream("x:1", nil)
		s.Write([]byte("a"))
		s.CloseWrite()
		io.ReadAll(s)
		srv().Close()
		c.Close()
		<-c.Done()
	}()
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before+1 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > before+1 {
		t.Errorf("goroutines: %d before, %d after", before, n)
	}
}
