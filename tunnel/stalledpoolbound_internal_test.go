package tunnel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/tunnel/hbone"
)

// stallRig is TestPoolOpensBesideAStalledConnection's setup for several
// connections: B's every accepted connection reads through a gate of its
// own, "upload" streams are drained, others echoed; A's dials go through
// smallSendNet, or, once refuse is set, to a port nothing listens on (a
// peer whose listener refuses new connections; its old one alive).
type stallRig struct {
	t     *testing.T
	p     *Proxy
	pl    *pool
	key   poolKey
	net   *smallSendNet
	fails atomic.Int32 // dials refused
	// refuse: dials go to closed, a loopback port nothing listens on.
	refuse atomic.Bool
	closed netip.AddrPort

	mu    sync.Mutex
	gates []*heldReads // by accept order, which is the pool's dial order
}

func (r *stallRig) Dial(ctx context.Context, src netip.Addr, dst netip.AddrPort) (net.Conn, error) {
	if r.refuse.Load() {
		r.fails.Add(1)
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", r.closed.String())
		if err == nil {
			c.Close()
			return nil, errors.New("the closed port took a connection")
		}
		return nil, err
	}
	return r.net.Dial(ctx, src, dst)
}

// newStallRig: maxStreams is hbone.Config.MaxStreamsPerConn, 0 its default.
func newStallRig(t *testing.T, maxStreams uint32) *stallRig {
	p, _, _ := newTestProxy(t, Config{Directory: noDirectory{}, Certificates: testPeerCerts(t),
		PoolIdleTimeout: time.Hour,
		// Long: an open that would wait for it hangs the test rather
		// than fail in a time the test would judge.
		ConnectTimeout: 2 * time.Minute,
		HBONE:          hbone.Config{StreamWindow: 64 << 20, ConnWindow: 64 << 20, PingInterval: -1, MaxStreamsPerConn: maxStreams}})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	gone, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &stallRig{t: t, p: p, net: &smallSendNet{}, closed: netip.MustParseAddrPort(gone.Addr().String())}
	gone.Close()
	handler := uploadOrEcho(nil)
	go func() {
		for {
			raw, err := ln.Accept()
			if err != nil {
				return
			}
			g := &heldReads{Conn: raw, open: make(chan struct{})}
			close(g.open)
			r.mu.Lock()
			r.gates = append(r.gates, g)
			r.mu.Unlock()
			t.Cleanup(g.release)
			serveB(t, p, g, handler)
		}
	}()
	r.key = poolKey{src: idClient, dst: idServer, addr: netip.MustParseAddrPort(ln.Addr().String())}
	r.pl = newPool(p, r)
	t.Cleanup(r.pl.close)
	return r
}

// open opens a stream through the pool and waits for its response.
func (r *stallRig) open(ctx context.Context, authority string) (*hbone.Stream, error) {
	return openAnswered(ctx, r.pl, r.key, authority)
}

// echo opens a stream and makes a round trip on it.
func (r *stallRig) echo(ctx context.Context) error {
	s, err := r.open(ctx, "echo")
	if err != nil {
		return err
	}
	defer s.Close()
	if _, err := s.Write([]byte("ping")); err != nil {
		return err
	}
	b := make([]byte, 4)
	if _, err := io.ReadFull(s, b); err != nil || string(b) != "ping" {
		return fmt.Errorf("echo %q: %v", b, err)
	}
	return nil
}

// stallOne opens an upload (on the connection the pool picks: a new one
// when every other is stalled), holds B's reads of that connection and
// writes until its writer is WriteStalled. It returns that connection.
func (r *stallRig) stallOne() *hbone.Conn {
	t := r.t
	up, err := r.open(context.Background(), "upload")
	if err != nil {
		t.Fatal(err)
	}
	var c *hbone.Conn
	r.pl.mu.Lock()
	for _, pc := range r.pl.m[r.key].conns {
		if pc.ActiveStreams() > 0 && !pc.WriteStalled(time.Now()) {
			c = pc.Conn
		}
	}
	r.pl.mu.Unlock()
	r.mu.Lock()
	g, accepted := r.gates[len(r.gates)-1], len(r.gates)
	r.mu.Unlock()
	if c == nil || int(r.net.dials.Load()) != accepted {
		t.Fatalf("the upload is not on the last connection dialed (%d dials, %d accepted)", r.net.dials.Load(), accepted)
	}
	g.hold()
	go func() {
		b := make([]byte, 256<<10)
		for n := 0; n < 16<<20; n += len(b) {
			if _, err := up.Write(b); err != nil {
				return
			}
		}
		up.CloseWrite()
	}()
	for end := time.Now().Add(time.Minute); !c.WriteStalled(time.Now()); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatal("the upload's writer never stalled: the test did not set up its case")
		}
	}
	return c
}

func (r *stallRig) releaseAll() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, g := range r.gates {
		g.release()
	}
}

// TestPoolWaitsBehindAStalledConnectionWhenItsDialFails: A's one
// connection to B is stalled (B alive, not draining) and B now refuses
// new connections (its listener at its budget, a NetworkPolicy change).
// An open dials once, is refused, and then waits for the stalled
// connection's write lock: it fails connect_timeout at its deadline if
// B never drains, and completes once B reads again.
//
// Before, the open gave up the stalled lock (ErrNoCapacity) a
// millisecond after the failed dial and dialed again: 8 refused dials,
// then "no pooled connection would take a stream" at once (counted
// hbone_connect), where the connection would have carried the stream.
func TestPoolWaitsBehindAStalledConnectionWhenItsDialFails(t *testing.T) {
	r := newStallRig(t, 0)
	first := r.stallOne()
	r.refuse.Store(true)

	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_, err := r.open(ctx, "echo")
	var de *dialError
	if !errors.As(err, &de) || de.reason != "connect_timeout" {
		t.Errorf("open beside a stalled connection, its dial refused, B never draining: %v (%T), want a connect_timeout at the open's deadline", err, err)
	}
	if got := r.fails.Load(); got != 1 {
		t.Errorf("%d refused dials, want 1: the open waits behind the stalled connection after its one dial failed", got)
	}

	// Now B drains, late: an open waiting behind the stall completes.
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), r.p.connectTimeout)
		defer cancel()
		done <- r.echo(ctx)
	}()
	for end := time.Now().Add(time.Minute); r.fails.Load() < 2; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatal("the second open never dialed")
		}
	}
	// Enough for a re-dialing open (the bug) to show: each took ~1 ms.
	select {
	case err := <-done:
		t.Fatalf("the open ended while B was still not draining: %v", err)
	case <-time.After(time.Second):
	}
	if !first.WriteStalled(time.Now()) {
		t.Fatal("the connection drained meanwhile: the test proves nothing")
	}
	r.releaseAll()
	if err := <-done; err != nil {
		t.Fatalf("the open behind the stalled connection, once B reads: %v", err)
	}
	if got := r.fails.Load(); got != 2 {
		t.Errorf("%d refused dials for two opens, want 2", got)
	}
	if got := r.net.dials.Load(); got != 1 {
		t.Errorf("%d connections, want the 1 stalled", got)
	}
}

// TestPoolDialsNoMoreThanItsBoundForStalls: on a slow link every bulk
// stream can stall its connection. With maxStallConns connections to B
// all stalled, a new open dials no more: it takes one of them and waits
// for its lock (completing once B reads). Before, each stall meant one
// more connection (a TLS handshake and its buffers) without bound.
func TestPoolDialsNoMoreThanItsBoundForStalls(t *testing.T) {
	r := newStallRig(t, 0)
	var conns []*hbone.Conn
	for i := 0; i < maxStallConns; i++ {
		conns = append(conns, r.stallOne())
	}
	if got := int(r.net.dials.Load()); got != maxStallConns {
		t.Fatalf("%d dials for %d stalled uploads, want one each (the pool dials beside a stalled connection)", got, maxStallConns)
	}
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), r.p.connectTimeout)
		defer cancel()
		done <- r.echo(ctx)
	}()
	// An open that dials does so within milliseconds; give it a second.
	select {
	case err := <-done:
		t.Errorf("the open ended while every connection was stalled: %v", err)
		done <- nil // for the wait below
	case <-time.After(time.Second):
	}
	for i, c := range conns {
		if !c.WriteStalled(time.Now()) {
			t.Fatalf("connection %d drained meanwhile: the test proves nothing", i)
		}
	}
	if got := int(r.net.dials.Load()); got != maxStallConns {
		t.Errorf("%d dials with %d stalled connections, want no more (the bound)", got, maxStallConns)
	}
	r.releaseAll()
	if err := <-done; err != nil {
		t.Fatalf("the open on a stalled connection, once B reads: %v", err)
	}
}

// TestPoolFullConnectionsStillDialPastTheStallBound: the bound counts
// connections with room. Connections full of streams (MaxStreamsPerConn)
// still make the pool dial, past maxStallConns, as before it.
func TestPoolFullConnectionsStillDialPastTheStallBound(t *testing.T) {
	r := newStallRig(t, 1)
	var streams []*hbone.Stream
	defer func() {
		for _, s := range streams {
			s.Close()
		}
	}()
	for i := 0; i <= maxStallConns; i++ {
		s, err := r.open(context.Background(), "upload")
		if err != nil {
			t.Fatalf("stream %d: %v", i, err)
		}
		streams = append(streams, s)
	}
	if got := int(r.net.dials.Load()); got != maxStallConns+1 {
		t.Errorf("%d dials for %d streams, one per connection: want %d", got, maxStallConns+1, maxStallConns+1)
	}
}
