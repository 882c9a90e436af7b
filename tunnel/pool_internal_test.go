package tunnel

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/tunnel/hbone"
)

// loopNet is a PodNetwork on the host's loopback (no netns needed: the
// pool only dials), counting its dials.
type loopNet struct{ dials atomic.Int32 }

func (n *loopNet) Dial(ctx context.Context, _ netip.Addr, dst netip.AddrPort) (net.Conn, error) {
	n.dials.Add(1)
	var d net.Dialer
	return d.DialContext(ctx, "tcp", dst.String())
}

// noDirectory: the pool never asks the directory.
type noDirectory struct{}

func (noDirectory) WorkloadByIP(netip.Addr) (Workload, bool)                 { return Workload{}, false }
func (noDirectory) ServiceEndpoints(netip.AddrPort) ([]netip.AddrPort, bool) { return nil, false }

// TestPoolWaiterAfterItsEntryWasDropped: a caller waited for the pool's
// dial; the connection was pooled, and before the caller took the pool's
// lock again that connection died (its peer closed it) and the janitor
// dropped the key's entry, now empty. The caller must dial again on the
// key's entry in the pool. It went on with the entry it held from before
// its wait, dialled on that orphan, and runDial discarded the new
// connection as abandoned: the app got errPoolClosed ("the pod is no
// longer served") from a pod that is served. testDialWoken holds the
// window open; real sockets and TLS on loopback, our HBONE on both sides.
func TestPoolWaiterAfterItsEntryWasDropped(t *testing.T) {
	p, _, _ := newTestProxy(t, Config{Directory: noDirectory{}, Certificates: testPeerCerts(t),
		PoolIdleTimeout: time.Hour, // the janitor's rounds are the test's (sweep)
		ConnectTimeout:  10 * time.Second})

	// The peer: our HBONE server, handing each connection to the test.
	served := make(chan *hbone.Conn, 4)
	key := loopPeer(t, p, func(s *hbone.Stream) { s.Respond(200, nil) }, func(hc *hbone.Conn, err error) {
		if err != nil {
			t.Errorf("the peer's handshake: %v", err)
			return
		}
		served <- hc
	})

	n := &loopNet{}
	pl := newPool(p, n)
	defer pl.close()

	var woken atomic.Int32
	dropped := false
	testDialWoken = func() {
		if woken.Add(1) != 1 {
			return
		}
		// The peer closes the connection just pooled; once the
		// client has seen it, a janitor round finds the entry empty.
		pl.mu.Lock()
		c := pl.m[key].conns[0].Conn
		pl.mu.Unlock()
		(<-served).Close()
		select {
		case <-c.Done():
		case <-time.After(10 * time.Second):
			t.Error("the pooled connection did not end after its peer closed it")
		}
		pl.sweep(time.Now(), p.poolIdle)
		pl.mu.Lock()
		_, dropped = pl.m[key]
		dropped = !dropped
		pl.mu.Unlock()
	}
	t.Cleanup(func() { testDialWoken = nil })

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := pl.conn(ctx, key)
	if !dropped {
		t.Fatal("the janitor did not drop the entry in the window: the test did not set up its case")
	}
	if err != nil {
		if errors.Is(err, errPoolClosed) {
			t.Fatalf("conn = %v: a served pod's app told it is no longer served (a dial on the dropped entry, discarded)", err)
		}
		t.Fatalf("conn = %v, want a new connection", err)
	}
	if !c.Usable() {
		t.Fatal("conn returned a connection that takes no stream")
	}
	if got := n.dials.Load(); got != 2 {
		t.Errorf("%d dials, want 2 (the first connection, then its replacement)", got)
	}
	// The new connection is pooled under the key: the next caller uses
	// it, without a dial.
	c2, err := pl.conn(ctx, key)
	if err != nil || c2 != c {
		t.Errorf("the next caller got %p, %v; want the pooled %p", c2, err, c)
	}
	if got := n.dials.Load(); got != 2 {
		t.Errorf("%d dials after the next caller, want still 2", got)
	}
}
