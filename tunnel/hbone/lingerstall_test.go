package hbone

import (
	"context"
	"crypto/rand"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
)

// gatedConn holds its reads while the gate is shut: a client whose read
// loop is held up (a busy node), its TCP window closing.
type gatedConn struct {
	net.Conn
	mu   sync.Mutex
	open chan struct{}
}

func (g *gatedConn) Read(p []byte) (int, error) {
	g.mu.Lock()
	open := g.open
	g.mu.Unlock()
	<-open
	return g.Conn.Read(p)
}

func (g *gatedConn) shut() {
	g.mu.Lock()
	g.open = make(chan struct{})
	g.mu.Unlock()
}

func (g *gatedConn) reopen() {
	g.mu.Lock()
	close(g.open)
	g.mu.Unlock()
}

// TestShutdownLingersThroughAReaderStall (review s23r2 of acc4186): as
// TestShutdownLingersWhileTheLinkDrains (our server on the 400 kbit/s
// side, the download's tail queued in its socket when Shutdown closes),
// but the client's reader is held up for 3 s from the close
// (TestShutdownWaitsForALateAck takes 3 s for a live peer's reader on a
// busy node). Its receive buffer fills, its window goes to zero, our
// kernel's probes are answered with pure ACKs and no byte is
// acknowledged: the linger ended lingerWait (1 s) after the last look
// that saw progress and closed the socket; the client, reading again,
// returned window, and its WINDOW_UPDATE met the closed socket: a RST,
// the rest of the download thrown away. (The window reopens only at
// our kernel's next zero-window probe, backed off: no byte is
// acknowledged for ~5 s of the 3 s stall, hence a PingTimeout of 10 s.)
func TestShutdownLingersThroughAReaderStall(t *testing.T) {
	const body = 256 << 10
	const stall = 3 * time.Second
	scfg := Config{PingInterval: -1, PingTimeout: 10 * time.Second}
	ccfg := Config{PingInterval: -1, PingTimeout: 10 * time.Second, StreamWindow: 256 << 10, ConnWindow: 256 << 10}
	download := make([]byte, body)
	rand.Read(download)
	handler, holding, release := heldDownload(download)
	var g *gatedConn
	c, sc, _ := slowServerPair(t, scfg, ccfg, handler, func(tcp net.Conn) net.Conn {
		// A small receive buffer: the download's tail stays in the
		// server's socket while the client's reader is held.
		_ = tcp.(*net.TCPConn).SetReadBuffer(32 << 10)
		g = &gatedConn{Conn: tcp, open: make(chan struct{})}
		close(g.open)
		return g
	})
	s1, err := c.OpenStream("10.0.0.1:80", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s1.Close()
	s1.CloseWrite()
	<-holding
	shut := make(chan error, 1)
	go func() { shut <- sc.Shutdown(context.Background()) }()
	awaitFinalGoAway(t, sc)
	g.shut()
	close(release)
	if err := <-shut; err != nil {
		t.Fatal(err)
	}
	closed := time.Now()
	time.Sleep(stall)
	g.reopen()
	got := readDownload(s1, download)
	select {
	case err := <-got:
		if err != nil {
			t.Fatalf("the download after a %v stall of the client's reader: %v", stall, err)
		}
		t.Logf("read whole %v after the server's close", time.Since(closed).Round(time.Millisecond))
	case <-time.After(20 * time.Second):
		t.Fatal("the download has not ended 20 s after the server's close")
	}
}

// TestLingerEndsForADeadPeerWithBytesQueued: the longer patience with
// a stalled reader is for a live one only. A client's node goes dark
// (its end of the link set down) in the middle of a download, with a
// few hundred KiB of ours still queued in the server's socket;
// keepalive closes the connection (PingTimeout 6 s). Nothing will ever
// be acknowledged and no ACK of any kind comes, so the clean close's
// linger must end lingerWait after it as before, not hold the socket,
// its reader and its buffer for PingTimeout as it would if queued bytes
// alone earned the longer wait: keepalive closes every connection to
// a dead node that way, most with bytes of ours queued (its PING).
func TestLingerEndsForADeadPeerWithBytesQueued(t *testing.T) {
	const body = 512 << 10
	scfg := Config{PingInterval: 500 * time.Millisecond, PingTimeout: 6 * time.Second}
	ccfg := Config{PingInterval: -1, PingTimeout: 6 * time.Second}
	download := make([]byte, body)
	rand.Read(download)
	handler := func(s *Stream) {
		s.Respond(200, nil)
		s.Write(download)
		s.CloseWrite()
	}
	// The whole download fits in the server's socket: the handler is
	// done, and keepalive's GOAWAY and close_notify find room (a clean
	// close, which lingers).
	c, sc, inOther := slowServerPair(t, scfg, ccfg, handler, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s1, err := c.OpenStream("10.0.0.1:80", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s1.Close()
	s1.CloseWrite()
	if st, _, err := s1.Response(ctx); err != nil || st != 200 {
		t.Fatalf("response %d, %v", st, err)
	}
	if _, err := io.ReadFull(s1, make([]byte, 32<<10)); err != nil {
		t.Fatalf("the download's first 32 KiB: %v", err)
	}
	inOther(func() {
		l, err := netlink.LinkByName("slow1")
		if err == nil {
			err = netlink.LinkSetDown(l)
		}
		if err != nil {
			t.Errorf("setting the client's link down: %v", err)
		}
	})
	select {
	case <-sc.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("keepalive has not closed the dead client's connection within 30 s")
	}
	closed := time.Now()
	if err := sc.Err(); err == nil || !strings.Contains(err.Error(), "keepalive timeout") {
		t.Fatalf("the server's connection ended with %v, want keepalive's timeout", err)
	}
	// The premise: bytes of ours queued at the close, and a clean close
	// (an abortive one reads nothing after it).
	if _, _, _, queued, ok := tcpProgress(sc.cork.raw); !ok || !queued {
		t.Fatalf("nothing of ours queued in the socket at keepalive's close (TCP_INFO read: %v)", ok)
	}
	select {
	case <-sc.readDone:
		t.Fatal("the server's close did not linger: not the clean close this test is about")
	default:
	}
	select {
	case <-sc.readDone:
		t.Logf("the linger ended %v after keepalive's close", time.Since(closed).Round(time.Millisecond))
	case <-time.After(2 * lingerWait):
		t.Fatalf("the server still reads the dead client %v after keepalive's close (PingTimeout %v)", 2*lingerWait, scfg.PingTimeout)
	}
}
