package tunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/tunnel/hbone"
	"github.com/ambit-mesh/ambit/tunnel/internal/podtest"
)

// pinger is the far end of an HBONE connection, in raw HTTP/2, that goes
// on sending after our clean close: it answers SETTINGS and PINGs, and
// sends a PING of its own every 50 ms until stop, after our
// close_notify too. Our socket then lingers (hbone's Gone): each PING is
// the link's progress, so only the peer's end, a cut or 10 x PingTimeout
// (200 s by default) ends it.
type pinger struct {
	c        *tls.Conn
	wmu      sync.Mutex
	settings chan struct{} // closed once our SETTINGS came: the connection is up
	notified chan struct{} // closed once it read our clean end (close_notify)
	stopping chan struct{}
	once     sync.Once
	wrote    chan error // the writer's end: nil at stop, else its failed write
}

// startPinger runs a pinger on c, a client's (it sends the preface) or,
// server, a server's.
func startPinger(t *testing.T, c *tls.Conn, server bool) *pinger {
	t.Helper()
	pg := &pinger{c: c, settings: make(chan struct{}), notified: make(chan struct{}),
		stopping: make(chan struct{}), wrote: make(chan error, 1)}
	t.Cleanup(func() { pg.stop() })
	var hello []byte
	if !server {
		hello = []byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
	}
	if err := pg.write(append(hello, h2Frame(0x4, 0, nil)...)); err != nil {
		t.Fatal(err)
	}
	go pg.read(server)
	go func() {
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-pg.stopping:
				pg.wrote <- nil
				return
			case <-tick.C:
			}
			if err := pg.write(h2Frame(0x6, 0, make([]byte, 8))); err != nil {
				pg.wrote <- err
				return
			}
		}
	}()
	return pg
}

func h2Frame(typ, flags byte, payload []byte) []byte {
	b := []byte{byte(len(payload) >> 16), byte(len(payload) >> 8), byte(len(payload)), typ, flags, 0, 0, 0, 0}
	return append(b, payload...)
}

func (pg *pinger) write(b []byte) error {
	pg.wmu.Lock()
	defer pg.wmu.Unlock()
	pg.c.SetWriteDeadline(time.Now().Add(5 * time.Second))
	_, err := pg.c.Write(b)
	return err
}

func (pg *pinger) read(server bool) {
	if server {
		if _, err := io.ReadFull(pg.c, make([]byte, 24)); err != nil {
			return
		}
	}
	var h [9]byte
	settled := false
	for {
		if _, err := io.ReadFull(pg.c, h[:]); err != nil {
			if errors.Is(err, io.EOF) { // close_notify, not a reset
				close(pg.notified)
			}
			return
		}
		p := make([]byte, int(h[0])<<16|int(h[1])<<8|int(h[2]))
		if _, err := io.ReadFull(pg.c, p); err != nil {
			return
		}
		switch typ, ack := h[3], h[4]&0x1 != 0; {
		case typ == 0x4 && !ack:
			_ = pg.write(h2Frame(0x4, 0x1, nil))
			if !settled {
				settled = true
				close(pg.settings)
			}
		case typ == 0x6 && !ack:
			_ = pg.write(h2Frame(0x6, 0x1, p))
		}
	}
}

// stop ends the pinging and closes the connection, close_notify and FIN
// (the peer's own end, which ends our linger).
func (pg *pinger) stop() {
	pg.once.Do(func() {
		close(pg.stopping)
		pg.c.Close()
	})
}

// recv waits up to 10 s for ch to close.
func recv(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: not within 10 s", what)
	}
}

// writeFails waits up to 5 s for pg's writes to fail: our socket is
// gone, the peer's next segment met a reset.
func writeFails(t *testing.T, pg *pinger, why string) {
	t.Helper()
	select {
	case err := <-pg.wrote:
		t.Logf("the peer's write: %v", err)
		if err == nil {
			t.Fatalf("%s: the peer stopped, its writes never failed", why)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("%s: the peer still writes 5 s later", why)
	}
}

// lingerServer serves B's 15008 through p (cfg's certificates and
// directory set here), and dial connects a pinger to it from A's pod.
func lingerServer(t *testing.T, cfg Config) (p *Proxy, sv *Serving, b *podtest.Pod, dial func() *pinger) {
	testenv.RequireRoot(t)
	a, b := podtest.Pair(t)
	cfg.Directory, cfg.Certificates = noDirectory{}, testPeerCerts(t)
	p, _, _ = newTestProxy(t, cfg)
	wb := Workload{Namespace: "b", Name: "server-pod", IPs: []netip.Addr{b.IP4, b.IP6}, Identity: idServer, Meshed: true}
	sv = servePod(t, p, b, wb, nil, 15008)
	return p, sv, b, func() *pinger {
		t.Helper()
		var raw net.Conn
		a.Do(t, func() (err error) {
			raw, err = net.DialTimeout("tcp", netip.AddrPortFrom(b.IP4, 15008).String(), 10*time.Second)
			return
		})
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		tc := tls.Client(raw, p.clientTLS(idClient, idServer, &peerState{}))
		if err := tc.HandshakeContext(ctx); err != nil {
			raw.Close()
			t.Fatal(err)
		}
		pg := startPinger(t, tc, false)
		recv(t, pg.settings, "B's SETTINGS")
		return pg
	}
}

// closeInBackground runs sv.Close(ctx) and sends its result.
func closeInBackground(sv *Serving, ctx context.Context) <-chan error {
	res := make(chan error, 1)
	go func() { res <- sv.Close(ctx) }()
	return res
}

// holdWindow is how long a Close that must wait for a lingering socket
// is watched for returning anyway. A Close that does not wait returns
// within microseconds of closing the pool; a correct one cannot return
// at all while the peer sends (the linger runs to 10 x PingTimeout, the
// tests' deadline is 20 s), so the window decides nothing by its
// length.
const holdWindow = 500 * time.Millisecond

// closeWaitsForThePeer: Close (res) has begun and our side of pg's
// connection lingers (the gauge says 1), pg sending all along. Close
// must not return while it does: watched from when Close has closed the
// pod's pool, when all that is left to it is the wait for lingering
// sockets, for holdWindow. Only then does the peer end (stop), and Close
// must return, with nil, the gauge back to 0. (Stopped as soon as the
// gauge said 1, the peer often ended the linger before a Close that did
// not wait had got that far: it passed 8 runs in 40 so.)
func closeWaitsForThePeer(t *testing.T, p *Proxy, sv *Serving, pg *pinger, res <-chan error) {
	t.Helper()
	lingering := func() float64 { return testutil.ToFloat64(p.m.lingering) }
	if got := pollUntil(1, lingering); got != 1 {
		t.Fatalf("ambit_tunnel_lingering_connections = %v after the clean close, want 1", got)
	}
	if !pollUntil(true, sv.pool.closed) {
		t.Fatal("Close did not close the pod's pool within 10 s")
	}
	select {
	case err := <-res:
		if got := lingering(); got != 1 {
			t.Fatalf("the socket stopped lingering (gauge %v) while its peer still sent, and Close returned (%v): the premise does not hold", got, err)
		}
		t.Fatalf("Close returned (%v) while the socket lingered, its peer still sending: an agent exiting then has the kernel reset it", err)
	case <-time.After(holdWindow):
	}
	if got := lingering(); got != 1 {
		t.Fatalf("ambit_tunnel_lingering_connections = %v after %v of Close's wait, want 1: the socket closed while its peer still sent, the premise does not hold", got, holdWindow)
	}
	pg.stop()
	select {
	case err := <-res:
		if err != nil {
			t.Errorf("Close = %v, want nil: the peer ended well within the deadline", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return 10 s after the peer's end")
	}
	if got := lingering(); got != 0 {
		t.Errorf("ambit_tunnel_lingering_connections = %v once Close returned, want 0", got)
	}
}

// TestCloseWaitsForALingeringInboundSocket: a pod's Close (an agent's
// drain at an upgrade) shuts its inbound HBONE connection down cleanly,
// and the socket lingers while the peer still sends. Close must return
// only once the socket is closed (the peer's end here): it returned at
// the connection's end, before the linger, and the agent exited with the
// socket open, so the kernel reset it and the peer's next frame (the
// client's WINDOW_UPDATE on a slow link) threw away the download's tail.
func TestCloseWaitsForALingeringInboundSocket(t *testing.T) {
	p, sv, _, dial := lingerServer(t, Config{})
	pg := dial()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	res := closeInBackground(sv, ctx)
	recv(t, pg.notified, "B's close_notify")
	closeWaitsForThePeer(t, p, sv, pg, res)
}

// TestCloseCutsALingeringSocketAtItsDeadline: the peer never ends, so
// the socket would linger up to 10 x PingTimeout; Close cuts it at its
// deadline (the agent's drainTimeout) and says so, and the socket is
// gone when it returns (the peer's next write is reset).
func TestCloseCutsALingeringSocketAtItsDeadline(t *testing.T) {
	p, sv, _, dial := lingerServer(t, Config{})
	pg := dial()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	err := sv.Close(ctx)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Close = %v, want the deadline's error (it had to cut a lingering socket)", err)
	}
	select {
	case <-pg.notified:
	default:
		t.Fatal("the peer never read B's close_notify: the close was not clean, nothing lingered")
	}
	if got := testutil.ToFloat64(p.m.lingering); got != 0 {
		t.Errorf("ambit_tunnel_lingering_connections = %v once Close returned, want 0", got)
	}
	writeFails(t, pg, "B's socket cut at Close's deadline")
}

// TestAbortResetsALingeringInboundSocket: B closed an idle inbound
// connection (HBONEIdleTimeout) cleanly, and its socket lingers, the
// peer still sending, when B's network goes (a DEL: Abort). The socket
// must be closed when Abort returns (the agent answers the DEL then and
// the pod's interface goes): it lingered on, keeping B's namespace, up
// to 10 x PingTimeout.
func TestAbortResetsALingeringInboundSocket(t *testing.T) {
	p, sv, b, dial := lingerServer(t, Config{HBONEIdleTimeout: 300 * time.Millisecond})
	pg := dial()
	recv(t, pg.notified, "B's close_notify (its idle close)")
	if got := pollUntil(1, func() float64 { return testutil.ToFloat64(p.m.lingering) }); got != 1 {
		t.Fatalf("ambit_tunnel_lingering_connections = %v after the idle close, want 1", got)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	if err := sv.Abort(ctx); err != nil {
		t.Errorf("Abort = %v, want nil", err)
	}
	if left := strings.TrimSpace(b.Run(t, "ss", "-tanH", "( sport = :15008 )")); left != "" {
		t.Errorf("B's pod holds, once Abort returned:\n%s", left)
	}
	if got := testutil.ToFloat64(p.m.lingering); got != 0 {
		t.Errorf("ambit_tunnel_lingering_connections = %v once Abort returned, want 0", got)
	}
	writeFails(t, pg, "B's lingering socket after Abort")
}

// pingerPool is a pod served with its pool on loopback: key leads to a
// listener whose first connection, once its TLS handshake is done, peer
// runs a pinger on.
func pingerPool(t *testing.T) (p *Proxy, sv *Serving, key poolKey, peer func() *pinger) {
	t.Helper()
	p, _, _ = newTestProxy(t, Config{Directory: noDirectory{}, Certificates: testPeerCerts(t),
		PoolIdleTimeout: time.Hour, ConnectTimeout: 10 * time.Second})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	peers := make(chan *tls.Conn, 1)
	go func() {
		raw, err := ln.Accept()
		if err != nil {
			return
		}
		tc := tls.Server(raw, p.serverTLS(idServer, &peerState{}))
		if tc.Handshake() != nil {
			raw.Close()
			return
		}
		peers <- tc
	}()
	w := Workload{Namespace: "a", Name: "client-pod", IPs: []netip.Addr{netip.MustParseAddr("10.0.0.1")}, Identity: idClient, Meshed: true}
	sv = ServeForTest(t, p, Pod{Workload: w, Net: &loopNet{}})
	key = poolKey{src: idClient, dst: idServer, addr: netip.MustParseAddrPort(ln.Addr().String())}
	return p, sv, key, func() *pinger {
		t.Helper()
		select {
		case tc := <-peers:
			return startPinger(t, tc, true)
		case <-time.After(10 * time.Second):
			t.Fatal("the peer's handshake did not end")
		}
		return nil
	}
}

// lingerPooled is a pod served with one pooled connection to a pinger
// on loopback, which the pool's idle eviction (the janitor's sweep)
// has shut down, long before any Close: its socket lingers, the gauge
// says 1.
func lingerPooled(t *testing.T) (p *Proxy, sv *Serving, c *hbone.Conn, pg *pinger) {
	p, sv, key, peer := pingerPool(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := sv.pool.conn(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	pg = peer()
	sv.pool.sweep(time.Now().Add(2*time.Hour), p.poolIdle)
	recv(t, c.Done(), "the evicted connection's end")
	recv(t, pg.notified, "the evicted connection's close_notify")
	if got := pollUntil(1, func() float64 { return testutil.ToFloat64(p.m.lingering) }); got != 1 {
		t.Fatalf("ambit_tunnel_lingering_connections = %v after the idle eviction, want 1", got)
	}
	return p, sv, c, pg
}

// TestCloseWaitsForAPooledSocketEvictedBefore: the pool evicted an idle
// connection before the pod's Close, and its socket still lingers:
// Close waits for it too (the pool forgets a connection at its end).
func TestCloseWaitsForAPooledSocketEvictedBefore(t *testing.T) {
	p, sv, c, pg := lingerPooled(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	closeWaitsForThePeer(t, p, sv, pg, closeInBackground(sv, ctx))
	select {
	case <-c.Gone():
	default:
		t.Error("Close returned with the evicted connection's socket open")
	}
}

// TestAbortResetsAPooledSocketEvictedBefore: the same lingering socket
// when the pod's network goes: Abort closes it before it returns.
func TestAbortResetsAPooledSocketEvictedBefore(t *testing.T) {
	p, sv, c, pg := lingerPooled(t)
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	if err := sv.Abort(ctx); err != nil {
		t.Errorf("Abort = %v, want nil", err)
	}
	select {
	case <-c.Gone():
	default:
		t.Error("Abort returned with the evicted connection's socket open")
	}
	if got := testutil.ToFloat64(p.m.lingering); got != 0 {
		t.Errorf("ambit_tunnel_lingering_connections = %v once Abort returned, want 0", got)
	}
	writeFails(t, pg, "the evicted connection's socket after Abort")
}

// TestEvictedSocketLeavesTheSetAtItsEnd: a pod that goes on serving
// keeps no entry for a pooled connection whose linger ended. The set
// holds each socket until Gone; an entry left behind would not show in
// the churn tests (no goroutine, no descriptor), only at the pod's
// Close, held to the drain's deadline for a socket long gone.
func TestEvictedSocketLeavesTheSetAtItsEnd(t *testing.T) {
	p, sv, c, pg := lingerPooled(t)
	if socks, _ := sv.pool.socks.pending(); socks != 1 {
		t.Fatalf("%d sockets held while the evicted one lingers, want 1", socks)
	}
	pg.stop()
	recv(t, c.Gone(), "the evicted connection's socket closing once its peer ended")
	type held struct{ socks, dials int }
	if got := pollUntil(held{}, func() held { s, d := sv.pool.socks.pending(); return held{s, d} }); got != (held{}) {
		// Forgotten here, or the test's own Close would wait for it
		// without a deadline.
		sv.pool.socks.remove(c)
		t.Errorf("the pod still holds %d sockets and %d dials after the evicted connection's socket closed, want none", got.socks, got.dials)
	}
	if got := pollUntil(0, func() float64 { return testutil.ToFloat64(p.m.lingering) }); got != 0 {
		t.Errorf("ambit_tunnel_lingering_connections = %v after the linger ended, want 0", got)
	}
	select {
	case <-sv.stop:
		t.Fatal("the pod's serving stopped: the test is about a pod that goes on serving")
	default:
	}
}
