package tunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/tunnel/hbone"
)

// stallPanicCerts is a certificate source whose next Certificate call
// for idClient, once armed, tells started and panics when release is
// closed (a bug in the identity manager, say): the pool's dial is held
// in its TLS handshake until the test has its waiters lined up.
type stallPanicCerts struct {
	*testCerts
	armed   atomic.Bool
	started chan struct{}
	release chan struct{}
}

func (c *stallPanicCerts) Certificate(ctx context.Context, id string) (*tls.Certificate, error) {
	if id == idClient && c.armed.CompareAndSwap(true, false) {
		close(c.started)
		<-c.release
		panic("test: Certificate panics")
	}
	return c.testCerts.Certificate(ctx, id)
}

// TestPoolDialPanic: a panic in our client-certificate callback during
// the pool's outbound handshake fails the dial for each of its waiters
// (internal_error, for their connections' count), is logged with its
// stack once, closes the dialled socket, and leaves the key's entry
// ready for the next dial, which works. The dial runs on a goroutine of
// its own, outside the connection handler's recover: the panic killed
// the test binary (pool.runDial -> pool.dial -> hbone.Client -> the
// callback). Real sockets and TLS on loopback, our HBONE on both sides.
func TestPoolDialPanic(t *testing.T) {
	certs := &stallPanicCerts{testCerts: testPeerCerts(t), started: make(chan struct{}), release: make(chan struct{})}
	certs.armed.Store(true)
	p, _, logs := newTestProxy(t, Config{Directory: noDirectory{}, Certificates: certs,
		PoolIdleTimeout: time.Hour,
		ConnectTimeout:  10 * time.Second})
	// How each of the peer's handshakes ended.
	handshakes := make(chan error, 4)
	key := loopPeer(t, p, func(s *hbone.Stream) { s.Respond(200, nil) },
		func(_ *hbone.Conn, err error) { handshakes <- err })

	pl := newPool(p, &loopNet{})
	defer pl.close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	const callers = 3
	errs := make(chan error, callers)
	for range callers {
		go func() {
			_, err := pl.conn(ctx, key)
			errs <- err
		}()
	}
	select {
	case <-certs.started:
	case <-time.After(10 * time.Second):
		close(certs.release)
		t.Fatal("the pool's handshake never asked for the client certificate")
	}
	// All three wait for the one dial before it panics.
	waiters := func() int {
		pl.mu.Lock()
		defer pl.mu.Unlock()
		if e := pl.m[key]; e != nil && e.dialing != nil {
			return e.dialing.waiters
		}
		return -1
	}
	deadline := time.Now().Add(10 * time.Second)
	for waiters() != callers && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	n := waiters()
	close(certs.release)
	if n != callers {
		t.Fatalf("%d callers wait for the dial, want %d: the test did not set up its case", n, callers)
	}

	for range callers {
		err := <-errs
		var de *dialError
		switch {
		case err == nil:
			t.Error("a waiter got a connection from a dial that panicked")
		case !errors.As(err, &de) || de.reason != "internal_error":
			t.Errorf("a waiter got %v, want a dialError with reason internal_error", err)
		case !strings.Contains(err.Error(), "panicked"):
			t.Errorf("a waiter's error %q does not say the dial panicked", err)
		}
	}
	// The panicked dial's socket is closed: the peer's handshake ends
	// then, not at its own timeout.
	select {
	case err := <-handshakes:
		if err == nil {
			t.Error("the peer's handshake with the panicked dial succeeded")
		}
	case <-time.After(10 * time.Second):
		t.Error("the peer's handshake with the panicked dial still runs 10 s on: its socket was left open")
	}
	if got := strings.Count(logs.String(), "outbound HBONE dial panicked"); got != 1 {
		t.Errorf("%d log lines for the panic, want 1:\n%s", got, logs)
	}
	if !strings.Contains(logs.String(), "runtime/debug.Stack") {
		t.Errorf("the panic's log line has no stack:\n%s", logs)
	}

	// The entry is free of the failed dial: the next caller dials again
	// and gets a working connection.
	c, err := pl.conn(ctx, key)
	if err != nil {
		t.Fatalf("the dial after the panic: %v", err)
	}
	s, _, err := c.OpenStreamData(key.addr.String(), nil, nil)
	if err != nil {
		t.Fatalf("a stream on the connection dialled after the panic: %v", err)
	}
	defer s.Close()
	if st, _, err := s.Response(ctx); err != nil || st != 200 {
		t.Errorf("the peer answered %d, %v; want 200", st, err)
	}
}

// TestHBONEReadLoopPanic: a panic on a pooled HBONE connection's read
// loop (here the idle callback, run by the loop when the peer's
// RST_STREAM ends the last stream; in the agent, OnResponse's opened
// count runs there too) closes that connection, is counted
// internal_error and logged with its stack once, and the pool dials a
// new connection for the next caller. The loop is hbone's goroutine,
// outside the connection handlers' recover: the panic ended the process.
func TestHBONEReadLoopPanic(t *testing.T) {
	p, reg, logs := newTestProxy(t, Config{Directory: noDirectory{}, Certificates: testPeerCerts(t),
		PoolIdleTimeout: time.Hour,
		ConnectTimeout:  10 * time.Second})
	key := loopPeer(t, p, func(s *hbone.Stream) { s.Reset(hbone.ErrCodeCancel) }, nil)
	n := &loopNet{}
	pl := newPool(p, n)
	defer pl.close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	c, err := pl.conn(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	c.SetOnIdle(func(*hbone.Conn) { panic("test: the idle callback panics") })
	if _, _, err := c.OpenStreamData(key.addr.String(), nil, nil); err != nil {
		t.Fatal(err)
	}
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the connection is still open 10 s after its read loop panicked")
	}
	if got := testenv.Metric(t, reg, "ambit_tunnel_connections_failed_total", map[string]string{"reason": "internal_error"}); got != 1 {
		t.Errorf("failed_total{reason=internal_error} %v, want 1", got)
	}
	if got := strings.Count(logs.String(), "HBONE connection's own goroutine panicked"); got != 1 {
		t.Errorf("%d log lines for the panic, want 1:\n%s", got, logs)
	}
	if !strings.Contains(logs.String(), "readFramesRecovered") {
		t.Errorf("the panic's log line has no stack:\n%s", logs)
	}
	c2, err := pl.conn(ctx, key)
	if err != nil {
		t.Fatalf("the pool after the panic: %v", err)
	}
	if c2 == c || !c2.Usable() {
		t.Error("the pool handed out the panicked connection, or one that takes no stream")
	}
	if d := n.dials.Load(); d != 2 {
		t.Errorf("%d dials, want 2 (the panicked connection, then a new one)", d)
	}
}
