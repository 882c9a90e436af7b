package hbone

import (
	"bytes"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"runtime"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
)

// closeSlowBody is the download of the close-on-a-full-socket tests,
// sent as one burst: more than the server's socket holds (fullSocketPair).
const closeSlowBody = 512 << 10

// fullSocketPair is slowServerPair with 192 KiB asked for the server's
// send buffer (384 KiB with the kernel's doubling): a writer blocked on
// it full is woken once a third has drained, about 2.5 s at 400 kbit/s,
// past the 1 s a close's write deadline was. Its handler answers 200
// and sends download as one burst whose last frame carries END_STREAM,
// as the splice pump sends an app's last bytes with its FIN: the
// stream is served whole once that write returns, and its result goes
// to sent. inOther runs fn in the client's namespace.
func fullSocketPair(t *testing.T, download []byte) (c, sc *Conn, sent <-chan error, inOther func(fn func())) {
	t.Helper()
	res := make(chan error, 1)
	handler := func(s *Stream) {
		if err := s.Respond(200, nil); err != nil {
			res <- err
			return
		}
		buf := make([]byte, frameHeaderLen+len(download))
		copy(buf[frameHeaderLen:], download)
		res <- s.sendFrom(buf, len(download), true)
	}
	c, sc, inOther = fullSocketServer(t, Config{PingInterval: -1, PingTimeout: 2 * time.Second}, handler)
	return c, sc, res, inOther
}

// fullSocketServer is fullSocketPair's link and sockets: our server
// (scfg, handler) on the 400 kbit/s side with a 384 KiB send buffer,
// our client with windows that never hold the server back (the whole
// of a burst goes to its socket) and keepalive off.
func fullSocketServer(t *testing.T, scfg Config, handler func(*Stream)) (c, sc *Conn, inOther func(fn func())) {
	t.Helper()
	ccfg := Config{PingInterval: -1, PingTimeout: 2 * time.Second, StreamWindow: 16 << 20, ConnWindow: 16 << 20}
	inShaped, inOther, _ := slowLink(t)
	serve, srv := serveHBONE(t, scfg, handler)
	c = slowDial(t, inShaped, inOther, "10.99.0.1", ccfg, nil, func(raw *net.TCPConn, tcfg *tls.Config) {
		if err := raw.SetWriteBuffer(192 << 10); err != nil {
			t.Error(err)
		}
		serve(raw, tcfg)
	})
	return c, gotServer(t, srv), inOther
}

// awaitBlockedWrite waits until a write on sc waits for room in its
// full socket (the cork's blockedSince), 10 s at most.
func awaitBlockedWrite(t *testing.T, sc *Conn) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); sc.cork.blockedSince.Load() == 0; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no write on the server waited for room in its socket within 10 s")
		}
	}
}

// TestCloseWaitsForTheLinkToTakeTheLastWrite: a server's Close while
// its last burst (a download's tail, END_STREAM on its last frame) waits
// for room in a full socket on a slow link (our server on the 400 kbit/s
// side). The close waits for the writer (it takes the write lock), under
// a write deadline that was fixed at 1 s; the kernel wakes the writer
// only once a third of the socket's buffer has drained, later than
// that, so the deadline cut the burst mid-record and the close was
// abortive: the client never got the download's tail nor its end,
// though the link was taking our bytes all along. The deadline follows
// the link now (closeWatch): the burst goes out whole, and the client
// reads the whole download, then the server's close_notify.
func TestCloseWaitsForTheLinkToTakeTheLastWrite(t *testing.T) {
	download := make([]byte, closeSlowBody)
	rand.Read(download)
	c, sc, sent, _ := fullSocketPair(t, download)
	s1, err := c.OpenStream("10.0.0.1:80", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s1.Close()
	s1.CloseWrite()
	got := readDownload(s1, download)
	awaitBlockedWrite(t, sc)
	closing := time.Now()
	sc.Close()
	t.Logf("Close returned %v after it began", time.Since(closing).Round(time.Millisecond))
	select {
	case err := <-got:
		if err != nil {
			t.Fatalf("the download, closed on while its tail waited for room: %v", err)
		}
		t.Logf("the download was read whole %v after the close", time.Since(closing).Round(time.Millisecond))
	case <-time.After(30 * time.Second):
		t.Fatal("the download has not ended 30 s after the close")
	}
	select {
	case err := <-sent:
		if err != nil {
			t.Fatalf("the last burst: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the last burst has not returned 30 s after the close (the download read whole)")
	}
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the client's connection has not ended 10 s after the download")
	}
	if err := c.Err(); err != nil && !errors.Is(err, ErrConnClosed) {
		t.Errorf("the client's connection ended with %v, want the server's close_notify", err)
	}
	// Both closes are over: their watches ended with them.
	st := make([]byte, 1<<20)
	st = st[:runtime.Stack(st, true)]
	if bytes.Contains(st, []byte("(*closeWatch).run")) {
		t.Errorf("a close's watch still runs after both closes ended:\n%s", st)
	}
}

// TestCloseToADeadPeerEndsAtTheWriteWait: the close's patience is for a
// link that takes our bytes. The client's end of the slow link set down
// while the server's burst waits for room in its full socket: no byte
// will be acknowledged, and the close must still end closeWriteWait
// (1 s) after it began, abortive, the burst cut, as before; not at the
// cap (10 × PingTimeout, 20 s), as a deadline moved for queued bytes
// alone would.
func TestCloseToADeadPeerEndsAtTheWriteWait(t *testing.T) {
	download := make([]byte, closeSlowBody)
	rand.Read(download)
	c, sc, sent, inOther := fullSocketPair(t, download)
	openToABlockedWrite(t, c, sc)
	inOther(func() {
		l, err := netlink.LinkByName("slow1")
		if err == nil {
			err = netlink.LinkSetDown(l)
		}
		if err != nil {
			t.Errorf("setting the client's link down: %v", err)
		}
	})
	// The premise: the link is dead (no ACK of any kind for 200 ms,
	// where a live one acknowledges a packet every 30 ms) and the
	// server's socket full, its burst still waiting.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		_, _, sinceAck, queued, ok := tcpProgress(sc.cork.raw)
		if !ok || !queued {
			t.Fatalf("nothing of ours queued in the server's socket (TCP_INFO read: %v)", ok)
		}
		if sinceAck >= 200*time.Millisecond {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the server's socket still gets ACKs 10 s after the client's link went down")
		}
	}
	if sc.cork.blockedSince.Load() == 0 {
		t.Fatal("the server's burst no longer waits for room: its socket is not full")
	}
	closeReturnsWithin(t, sc, 2*closeWriteWait, fmt.Sprintf("a dead peer (PingTimeout %v)", sc.cfg.PingTimeout))
	if err := <-sent; err == nil {
		t.Error("the burst toward a dead peer was written whole")
	}
	select {
	case <-sc.readDone:
	default:
		t.Error("the close toward a dead peer lingers: not abortive")
	}
}

// closeReturnsWithin runs sc's Close and fails the test unless it
// returns within bound; toward names the peer for the message.
func closeReturnsWithin(t *testing.T, sc *Conn, bound time.Duration, toward string) {
	t.Helper()
	closing := time.Now()
	closed := make(chan struct{})
	go func() { sc.Close(); close(closed) }()
	select {
	case <-closed:
		t.Logf("Close returned %v after it began", time.Since(closing).Round(time.Millisecond))
	case <-time.After(bound):
		t.Fatalf("Close toward %s has not returned %v after it began", toward, bound)
	}
}

// openToABlockedWrite opens the download's stream on c and ends its
// request, then waits until sc's answer is blocked on the full socket.
func openToABlockedWrite(t *testing.T, c, sc *Conn) *Stream {
	t.Helper()
	s, err := c.OpenStream("10.0.0.1:80", nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	s.CloseWrite()
	awaitBlockedWrite(t, sc)
	return s
}
