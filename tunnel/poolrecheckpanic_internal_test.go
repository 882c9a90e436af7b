package tunnel

import (
	"context"
	"crypto/x509"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/tunnel/hbone"
)

// rootsPanicCerts: Roots panics once, when armed (a bug in the identity
// manager, say): in the pool's recheck, the first call after arming.
type rootsPanicCerts struct {
	*testCerts
	armed atomic.Bool
}

func (c *rootsPanicCerts) Roots() *x509.CertPool {
	if c.armed.CompareAndSwap(true, false) {
		panic("test: Roots panics")
	}
	return c.testCerts.Roots()
}

// TestPoolRecheckPanic: pick rechecks each pooled connection's
// certificates (Certificates.Roots) under the pool's lock. A panic there
// reached the connection handler's recover with the lock still held: the
// pod's every later open, to any destination, the janitor and the pool's
// close then hung for good. Now the panic retires that connection, as a
// failed recheck does, and the open dials a fresh one. Real TLS on
// loopback, our HBONE on both sides.
func TestPoolRecheckPanic(t *testing.T) {
	certs := &rootsPanicCerts{testCerts: testPeerCerts(t)}
	p, _, _ := newTestProxy(t, Config{Directory: noDirectory{}, Certificates: certs,
		PoolIdleTimeout: time.Hour, ConnectTimeout: 10 * time.Second})
	key := loopPeer(t, p, func(s *hbone.Stream) { s.Respond(200, nil) }, nil)
	pl := newPool(p, &loopNet{})
	// Off the test's goroutine: with the lock left held (the bug) the
	// close hung the test binary rather than fail this test.
	defer func() {
		closed := make(chan struct{})
		go func() { pl.close(); close(closed) }()
		select {
		case <-closed:
		case <-time.After(30 * time.Second):
			t.Error("the pool's close never returned")
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := pl.conn(ctx, key); err != nil {
		t.Fatal(err)
	}

	certs.armed.Store(true)
	func() {
		defer func() {
			if v := recover(); v != nil {
				t.Errorf("pick panicked: %v", v)
			}
		}()
		// The pooled connection is retired; a fresh dial serves.
		if _, err := pl.conn(ctx, key); err != nil {
			t.Errorf("an open whose pooled connection's recheck panicked: %v", err)
		}
	}()
	if certs.armed.Load() {
		t.Fatal("Roots was not called: the test proves nothing")
	}

	done := make(chan error, 1)
	go func() {
		_, err := pl.conn(ctx, key)
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("the next open: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("an open after the panic never returned: the pool's lock was left held")
	}
}
