package tunnel

import (
	"context"
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/tunnel/hbone"
)

// A pod's Close keeps its deadline however many of the pod's HBONE
// connections wait on their peers: the agent's drain runs within
// DrainTimeout, and past it the kubelet's SIGKILL comes. Three of the
// pod's pooled connections each carry an upload whose writer is blocked
// on a full socket, their peer alive but not reading. Nothing is being
// handled (the streams were opened on the pool directly, no relay
// holds them), so Close finds the pod quiet at once and all that is
// left to it is closing those connections cleanly, each close waiting a
// second for its stalled write. One after another they held Close three
// seconds and more past a 300 ms deadline (88ec34c's closeConns, which
// TestPoolCloseKeepsItsDeadline checks on the pool alone): now Close
// returns the deadline's error at it, every connection cut.
func TestServingCloseKeepsItsDeadline(t *testing.T) {
	p := stallProxy(t)
	w := Workload{Namespace: "a", Name: "client-pod", IPs: []netip.Addr{netip.MustParseAddr("10.0.0.1")}, Identity: idClient, Meshed: true}
	sv := ServeForTest(t, p, Pod{Workload: w, Net: &smallSendNet{}})
	const n = 3
	var stalled []*hbone.Conn
	for i := 0; i < n; i++ {
		stalled = append(stalled, stallPooledUpload(t, p, sv.pool))
	}

	closesByItsDeadline(t, "the pod's Close", stalled, sv.Close)
}

// closesByItsDeadline runs close (named who) with a 300 ms deadline on
// connections each waiting on a stalled write, and checks it returns
// the deadline's error, by the deadline and a margin, with each of
// them ended: closed at once and cut at the deadline, not one after
// another.
func closesByItsDeadline(t *testing.T, who string, stalled []*hbone.Conn, close func(context.Context) error) {
	t.Helper()
	const deadline = 300 * time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()
	start := time.Now()
	err := close(ctx)
	took := time.Since(start)
	t.Logf("%s took %v with a %v deadline: %v", who, took.Round(time.Millisecond), deadline, err)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("%s = %v, want the deadline's error: each connection's close waited on a stalled write past it", who, err)
	}
	for i, c := range stalled {
		select {
		case <-c.Done():
		default:
			t.Errorf("connection %d still open when %s returned", i, who)
		}
	}
	// Well under one close's own second of waiting: a bound on the cut
	// running late, not a measure of speed.
	if took > deadline+500*time.Millisecond {
		t.Errorf("%s took %v with a %v deadline and %d connections each waiting on a stalled write: not held to its deadline", who, took.Round(time.Millisecond), deadline, len(stalled))
	}
}

// stallProxy is a proxy for stallPooledUpload's connections: windows
// far larger than the sockets, so the socket fills before flow control
// stops the writer; no keepalive, as the held peer answers no PING.
func stallProxy(t *testing.T) *Proxy {
	p, _, _ := newTestProxy(t, Config{Directory: noDirectory{}, Certificates: testPeerCerts(t),
		PoolIdleTimeout: time.Hour, ConnectTimeout: 30 * time.Second,
		HBONE: hbone.Config{StreamWindow: 64 << 20, ConnWindow: 64 << 20, PingInterval: -1}})
	return p
}

// stallPooledUpload opens, through pl, a connection of its own to a new
// peer (B, serveB) and an upload on it, then holds B's reads until the
// upload's writer is blocked on the full socket. It returns that
// connection; the peer is released, and closed, with the test.
func stallPooledUpload(t *testing.T, p *Proxy, pl *pool) *hbone.Conn {
	t.Helper()
	ln, gate := gatedListener(t)
	go func() {
		raw, err := ln.Accept()
		if err != nil {
			return
		}
		gate.Conn = raw
		serveB(t, p, gate, uploadOrEcho(nil))
	}()
	key := poolKey{src: idClient, dst: idServer, addr: netip.MustParseAddrPort(ln.Addr().String())}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	up, err := openAnswered(ctx, pl, key, "upload")
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	pl.mu.Lock()
	c := pl.m[key].conns[0].Conn
	pl.mu.Unlock()
	gate.hold()
	go func() {
		b := make([]byte, 256<<10)
		for {
			if _, err := up.Write(b); err != nil {
				return
			}
		}
	}()
	for end := time.Now().Add(time.Minute); !c.WriteStalled(time.Now()); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatal("an upload's writer never stalled: the test did not set up its case")
		}
	}
	return c
}
