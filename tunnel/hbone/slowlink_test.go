package hbone

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
)

// slowRate is the slow link's rate: a congested path's share (a 1 Gbit/s
// link shared by a few thousand bulk connections), where a keepalive
// PING waits seconds behind the DATA its sender queued.
const slowRate = "400kbit"

// slowLinkCfg: keepalive's timings cut down (ticks of 300 ms, an answer
// due 1 s after the PING, so the cap is 10 s) and windows large enough
// that the receiver returns none during a test (a WINDOW_UPDATE comes
// once a quarter window, 4 MiB, is consumed): the sender reads no frame
// but PING answers, as a bulk sender on a slow link does for tens of
// seconds.
var slowLinkCfg = Config{
	PingInterval: 300 * time.Millisecond,
	PingTimeout:  time.Second,
	StreamWindow: 16 << 20,
	ConnWindow:   16 << 20,
}

// slowLink makes two network namespaces, gone with the test, joined by a
// veth pair whose client side sends at slowRate: a token bucket (tbf
// splits the stack's 64 KiB GSO segments into packets, so the server's
// ACKs come packet by packet) with a queue long enough never to drop.
// The way back is not shaped: the server's ACKs and PING answers do not
// queue behind our DATA, as on a link congested one way. It returns
// functions that run fn on a thread in the client's or the server's
// namespace (a socket made there stays in it) and the server's address.
func slowLink(t *testing.T) (inClient, inServer func(fn func()), serverIP string) {
	t.Helper()
	testenv.RequireRoot(t)
	id := fmt.Sprintf("hbslow-%d-%d", os.Getpid(), time.Now().UnixNano()%1e9)
	cn, sn := id+"-c", id+"-s"
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	for _, n := range []string{cn, sn} {
		run("ip", "netns", "add", n)
		t.Cleanup(func() { exec.Command("ip", "netns", "del", n).Run() })
		run("ip", "-n", n, "link", "set", "lo", "up")
	}
	run("ip", "-n", cn, "link", "add", "slow0", "type", "veth", "peer", "name", "slow1", "netns", sn)
	run("ip", "-n", cn, "addr", "add", "10.99.0.1/24", "dev", "slow0")
	run("ip", "-n", sn, "addr", "add", "10.99.0.2/24", "dev", "slow1")
	run("ip", "-n", cn, "link", "set", "slow0", "up")
	run("ip", "-n", sn, "link", "set", "slow1", "up")
	run("ip", "netns", "exec", cn, "tc", "qdisc", "add", "dev", "slow0", "root", "tbf",
		"rate", slowRate, "burst", "3000", "latency", "60s")
	in := func(name string) func(fn func()) {
		return func(fn func()) {
			if err := testenv.InNetns(name, func() error { fn(); return nil }); err != nil {
				t.Error(err)
			}
		}
	}
	return in(cn), in(sn), "10.99.0.2"
}

// slowPair is our client (cfg) on a TCP connection over the slow link to
// serve, which gets the accepted socket and the server's TLS config.
func slowPair(t *testing.T, cfg Config, serve func(raw *net.TCPConn, scfg *tls.Config)) *Conn {
	t.Helper()
	inClient, inServer, ip := slowLink(t)
	return slowDial(t, inServer, inClient, ip, cfg, nil, serve)
}

// slowServerPair is slowLink the other way round: our server (scfg,
// handler) on the shaped side, its answers sent at slowRate, with 1 MiB
// of room in its socket, as autotuning gives a bulk sender (tcp_wmem,
// up to 4 MiB), and our client (ccfg) dialled from the other side, its
// socket passed through wrap (nil: as it is). inOther runs fn in the
// client's namespace.
func slowServerPair(t *testing.T, scfg, ccfg Config, handler func(*Stream), wrap func(net.Conn) net.Conn) (c, sc *Conn, inOther func(fn func())) {
	t.Helper()
	inShaped, inOther, _ := slowLink(t)
	serve, srv := serveHBONE(t, scfg, handler)
	c = slowDial(t, inShaped, inOther, "10.99.0.1", ccfg, wrap, func(raw *net.TCPConn, tcfg *tls.Config) {
		if err := raw.SetWriteBuffer(1 << 20); err != nil {
			t.Error(err)
		}
		serve(raw, tcfg)
	})
	return c, gotServer(t, srv), inOther
}

// slowDial is our client (cfg) on a TCP connection dialled in inDial's
// namespace to a listener on ip in inListen's; serve gets the accepted
// socket and the server's TLS config, wrap (nil: none) the dialled one.
func slowDial(t *testing.T, inListen, inDial func(fn func()), ip string, cfg Config, wrap func(net.Conn) net.Conn, serve func(raw *net.TCPConn, scfg *tls.Config)) *Conn {
	t.Helper()
	ccfg, scfg := testTLS(t)
	var ln net.Listener
	var raw net.Conn
	var err error
	inListen(func() { ln, err = net.Listen("tcp", net.JoinHostPort(ip, "0")) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		raw, err := ln.Accept()
		if err != nil {
			return
		}
		serve(raw.(*net.TCPConn), scfg)
	}()
	inDial(func() { raw, err = net.Dial("tcp", ln.Addr().String()) })
	if err != nil {
		t.Fatal(err)
	}
	if wrap != nil {
		raw = wrap(raw)
	}
	return clientOn(t, raw, ccfg, cfg)
}

// clientOn is our client (cfg; closed with the test) on raw, its TLS
// handshake (tcfg) done within 10 s.
func clientOn(t *testing.T, raw net.Conn, tcfg *tls.Config, cfg Config) *Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Client(ctx, raw, tcfg, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// serveHBONE is a serve for slowDial running our server (cfg, handler;
// closed with the test), which it sends on srv; srv is closed instead if
// the server's handshake fails (the test failed with its error).
func serveHBONE(t *testing.T, cfg Config, handler func(*Stream)) (serve func(raw *net.TCPConn, tcfg *tls.Config), srv <-chan *Conn) {
	ch := make(chan *Conn, 1)
	return func(raw *net.TCPConn, tcfg *tls.Config) {
		s, err := Server(context.Background(), raw, tcfg, cfg, nil, handler)
		if err != nil {
			t.Error(err)
			close(ch)
			return
		}
		t.Cleanup(func() { s.Close() })
		ch <- s
	}, ch
}

// gotServer is serveHBONE's server; a failed handshake ends the test.
func gotServer(t *testing.T, srv <-chan *Conn) *Conn {
	t.Helper()
	sc := <-srv
	if sc == nil {
		t.FailNow()
	}
	return sc
}

// handRolledServer plays an HTTP/2 server by hand on raw after the TLS
// handshake: SETTINGS granting windows of 2^31-1 (so the client sends
// without waiting for a WINDOW_UPDATE) and the ACK of the client's, then
// then(tc), which never answers a PING.
func handRolledServer(t *testing.T, then func(tc *tls.Conn)) func(raw *net.TCPConn, scfg *tls.Config) {
	return func(raw *net.TCPConn, scfg *tls.Config) {
		tc := tls.Server(raw, scfg)
		t.Cleanup(func() { raw.Close() })
		if err := tc.Handshake(); err != nil {
			t.Error(err)
			return
		}
		b := appendSettings(nil, setting{settingInitialWindowSize, maxWindow})
		b = appendWindowUpdate(b, 0, maxWindow-65535)
		b = appendFrame(b, frameSettings, flagAck, 0, nil)
		if _, err := tc.Write(b); err != nil {
			t.Error(err)
			return
		}
		then(tc)
	}
}

// TestKeepaliveSlowLink runs keepalive over a link of 400 kbit/s
// (slowLink) with PINGs every 300 ms of silence, due 1 s after.
func TestKeepaliveSlowLink(t *testing.T) {
	testenv.RequireRoot(t)
	keepaliveOff := slowLinkCfg
	keepaliveOff.PingInterval = -1
	// A client uploads 200 KiB (~4 s at this rate) to a live server,
	// whose app reads everything. One side pings, the other's keepalive
	// is off, so each piece of evidence is tested alone.
	//
	// The sender reads no frame for a tick (no WINDOW_UPDATE before 4
	// MiB are consumed), pings, and its PING waits behind the DATA it
	// queued (seconds of it): the server's TCP acknowledging new bytes
	// meanwhile keeps it waiting. The receiver reads no frame header for
	// a tick either (the upload is one 200 KiB DATA frame here; the
	// default 64 KiB frames do that at 10 s ticks below ~50 kbit/s),
	// pings, and the answer waits behind the same DATA: the bytes
	// arriving keep it waiting. The connection stays, the PINGs are
	// answered in the end, and the bytes arrive intact. Before,
	// keepalive closed the live connection ~0.9 s after its first PING
	// (the sender's: the client's keepalive; the receiver's: the
	// server's), 1.5 to 1.7 s into the upload, and the upload failed.
	t.Run("sender pings", func(t *testing.T) { slowUpload(t, slowLinkCfg, keepaliveOff, true) })
	bigFrames := keepaliveOff
	bigFrames.SendFrameSize = 1 << 20
	t.Run("receiver pings", func(t *testing.T) { slowUpload(t, bigFrames, slowLinkCfg, false) })

	// A server whose agent stopped reading after the handshake and its
	// SETTINGS (stuck): its kernel takes our bytes until its receive
	// buffer is full, then only answers our zero-window probes with pure
	// ACKs, bytes_acked frozen. That is no evidence of life: keepalive
	// closes the connection as it would without the link's excuse,
	// PingTimeout after the last acknowledged byte at most, far sooner
	// than the 10 × PingTimeout cap.
	t.Run("stalled peer", func(t *testing.T) {
		c := slowPair(t, slowLinkCfg, handRolledServer(t, func(tc *tls.Conn) {
			// Never reads again; closed at the test's end.
		}))
		// The server's receive buffer (~200 KiB here) fills in ~4 s
		// at this rate; then one PingTimeout and a tick or two, and 1 s
		// for a write blocked on the full socket (the close's
		// deadline): below the cap, 10 s after the PING.
		bound := 4*time.Second + slowLinkCfg.PingTimeout + 2*slowLinkCfg.PingInterval + time.Second + 2*time.Second
		took := pourUntilClosed(t, c, bound, "a stuck server", 0)
		t.Logf("closed %v after the upload began: %v", took.Round(time.Millisecond), c.Err())
	})

	// A server that reads every byte but never answers a PING (broken).
	// Its TCP acknowledges our bytes all along, which keeps keepalive
	// waiting, but not for ever: the connection is closed 10 ×
	// PingTimeout after the PING. The upload is paced under the link's
	// rate: poured, the link's queue grows for the whole 10 s (an RTT of
	// 4 s by then) and TCP's recovery from a spurious retransmission
	// timeout stalled the acknowledgements for a second, past this
	// test's PingTimeout (at the default 20 s such a stall is nothing).
	t.Run("PING-deaf peer", func(t *testing.T) {
		c := slowPair(t, slowLinkCfg, handRolledServer(t, func(tc *tls.Conn) { io.Copy(io.Discard, tc) }))
		limit := maxPingWaitFactor * slowLinkCfg.PingTimeout
		took := pourUntilClosed(t, c, limit+2*slowLinkCfg.PingInterval+time.Second+2*time.Second, "a PING-deaf server", 200*time.Millisecond)
		// Kept past the plain timeout by the acknowledgements (the
		// premise): the PING went out after the upload began, so the
		// cap's close comes later.
		if took < limit {
			t.Errorf("closed %v after the upload began: %v; want the cap, %v after the PING", took.Round(time.Millisecond), c.Err(), limit)
		}
		t.Logf("closed %v after the upload began: %v", took.Round(time.Millisecond), c.Err())
	})
}

// slowUpload uploads 200 KiB from a client of ccfg to our server of
// scfg over the slow link and wants it intact, the connection kept on
// both sides, and the pinging side (the client's if clientPings) to
// have sent PINGs that waited past PingTimeout.
func slowUpload(t *testing.T, ccfg, scfg Config, clientPings bool) {
	const body = 200 << 10
	type result struct {
		n   int64
		sum [32]byte
	}
	got := make(chan result, 1)
	handler := func(s *Stream) {
		s.Respond(200, nil)
		h := sha256.New()
		n, _ := io.Copy(h, s)
		var r result
		r.n = n
		copy(r.sum[:], h.Sum(nil))
		got <- r
		s.Write(r.sum[:])
		s.CloseWrite()
	}
	serve, srv := serveHBONE(t, scfg, handler)
	c := slowPair(t, ccfg, serve)
	sc := gotServer(t, srv)
	pinger := sc
	if clientPings {
		pinger = c
	}
	data := make([]byte, body)
	rand.Read(data)
	want := sha256.Sum256(data)
	s, _, err := c.OpenStreamData("10.0.0.1:80", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	// The answer comes after the server's SETTINGS: Write cuts its
	// frames to the MAX_FRAME_SIZE they grant, not the 16 KiB before.
	if st, _, err := s.Response(context.Background()); err != nil || st != 200 {
		t.Fatalf("response: %d %v", st, err)
	}
	start := time.Now()
	// The premise: a PING of the pinging side waited past PingTimeout
	// (polled: a test's clock, not an assertion on speed).
	var longest atomic.Int64
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
			if sent := pinger.pingSent.Load(); sent != 0 {
				if w := nanotime() - sent; w > longest.Load() {
					longest.Store(w)
				}
			}
		}
	}()
	status := func() string {
		return fmt.Sprintf("after %v, %d keepalive PINGs; client: %v; server: %v", time.Since(start).Round(time.Millisecond), pinger.KeepalivePings(), c.Err(), sc.Err())
	}
	if _, err := s.Write(data); err != nil {
		t.Fatalf("writing %d bytes over the slow link: %v (%s)", body, err, status())
	}
	if err := s.CloseWrite(); err != nil {
		t.Fatalf("CloseWrite: %v (%s)", err, status())
	}
	sum := make([]byte, 32)
	if _, err := io.ReadFull(s, sum); err != nil {
		t.Fatalf("the server's digest: %v (%s)", err, status())
	}
	r := <-got
	if r.n != body || r.sum != want || !bytes.Equal(sum, want[:]) {
		t.Fatalf("the server read %d bytes, digest %x (sent back %x); want %d, %x", r.n, r.sum, sum, body, want)
	}
	if !c.Usable() || !sc.Usable() {
		t.Fatalf("a connection is not usable after the upload (%s)", status())
	}
	waited := time.Duration(longest.Load())
	if waited <= slowLinkCfg.PingTimeout {
		t.Fatalf("the longest PING wait was %v, within PingTimeout (%s): the link did not delay the answers", waited.Round(time.Millisecond), status())
	}
	t.Logf("%d KiB in %v, %d keepalive PINGs, one outstanding for %v: connection kept", body>>10, time.Since(start).Round(time.Millisecond), pinger.KeepalivePings(), waited.Round(time.Millisecond))
}

// pourUntilClosed writes to a stream on c until keepalive closes c and
// says after how long; past bound, the test fails. With pace, it writes
// 8 KiB every pace (40 KiB/s at 200 ms, under the link's 50); without,
// as fast as the socket takes it.
func pourUntilClosed(t *testing.T, c *Conn, bound time.Duration, peer string, pace time.Duration) time.Duration {
	t.Helper()
	s, _, err := c.OpenStreamData("10.0.0.1:80", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var sent atomic.Int64
	go func() {
		b := make([]byte, 16<<10)
		if pace > 0 {
			b = b[:8<<10]
		}
		for {
			k, err := s.Write(b)
			sent.Add(int64(k))
			if err != nil {
				return
			}
			time.Sleep(pace) // pacing the writer, not an assertion
		}
	}()
	start := time.Now()
	select {
	case <-c.Done():
	case <-time.After(bound):
		t.Fatalf("the connection to %s is still open %v after the upload began (%d KiB written)", peer, bound, sent.Load()>>10)
	}
	wantKeepaliveReason(t, "the connection to "+peer, c.Err())
	return time.Since(start)
}

// wantKeepaliveReason fails the test unless err (a Conn's Err, the
// reason itself) is keepalive's.
func wantKeepaliveReason(t *testing.T, what string, err error) {
	t.Helper()
	if err == nil || !strings.Contains(err.Error(), "hbone: keepalive timeout: no PING answer within") {
		t.Errorf("%s closed with %v; want keepalive's timeout", what, err)
	}
}

// TestKeepaliveIgnoresALoneWriteAcked: a server whose agent went dark
// (stuck; its kernel lives and acknowledges) after answering a stream,
// and a second stream opening on the connection: the liveness probe's
// PING goes out, and its verdict a second later resets the unanswered
// stream, a RST_STREAM the server's kernel acknowledges at once. Those
// bytes were written after the PING, from an empty socket: the PING
// was not behind them, and their acknowledgement is no excuse for it.
// Keepalive closes the connection 3.5 to 4.5 s after the PING, as
// without linkWatch. Counting any bytes acknowledged, it closed at 5.5
// s when a tick fell between the PING and the RST_STREAM (the 1.5 s
// pause puts one there; TestKeepaliveCountsFromTheProbesPing hit it
// once in eight runs under -race).
func TestKeepaliveIgnoresALoneWriteAcked(t *testing.T) {
	setProbeSilence(t, 50*time.Millisecond)
	cfg := Config{PingInterval: time.Second, PingTimeout: 4 * time.Second}
	c, d := serveDark(t, cfg, echoHandler)
	answeredStream(t, c) // kept open: keepalive, not the probe, closes the connection
	d.goDark()
	// Keepalive's first tick (1 s) takes in the frames read so far; the
	// second (2 s) is the first with a PING outstanding: it falls
	// between the PING (1.6 s) and the RST_STREAM (2.6 s).
	time.Sleep(1500 * time.Millisecond)
	ping := time.Now()
	s := openDueSoon(t, c)
	defer s.Close()
	bound := cfg.PingTimeout + cfg.PingInterval
	select {
	case <-c.Done():
		t.Logf("closed %v after the probe's PING: %v", time.Since(ping).Round(time.Millisecond), c.Err())
	case <-time.After(bound):
		<-c.Done()
		t.Errorf("closed %v after the probe's PING, want within %v (a write after the PING, acknowledged at once, taken for the link's progress)", time.Since(ping).Round(time.Millisecond), bound)
	}
	wantKeepaliveReason(t, "the connection to a dark server", c.Err())
}
