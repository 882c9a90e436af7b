package hbone

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// Server-side keepalive: a client whose node dies (no FIN, no RST) must
// not hold the server's connection, and its streams' apps, for minutes.

// serverKeepaliveCfg pings after 100 ms of silence and gives up 400 ms
// after the PING: keepalive closes between 500 and 600 ms after the last
// frame read.
var serverKeepaliveCfg = Config{PingInterval: 100 * time.Millisecond, PingTimeout: 400 * time.Millisecond}

// keepaliveBound is how long a test waits for keepalive to close a
// connection whose peer went dark: PingTimeout + 2 PingIntervals after
// the last frame, plus closeWith's 1 s write deadline (a writer blocked on
// the socket holds the write lock until then), plus slack for a loaded
// -race run. Without keepalive the connection never closes.
func keepaliveBound(cfg Config) time.Duration {
	return cfg.PingTimeout + 2*cfg.PingInterval + time.Second + 3*time.Second
}

// fillingKeepaliveBound is keepaliveBound for a dark peer whose kernel
// still takes our bytes (darkMidAnswer: its app stopped reading, its
// receive buffer fills): each new byte its TCP acknowledges is the
// link's progress and restarts the PING's wait (Keepalive on a slow
// link), up to maxPingWait. Measured with PingTimeout 400 ms: closed
// 0.6-2.9 s after the PING, past keepaliveBound's slack once in 20 runs
// (TestSpliceErrorNamesKeepalive).
func fillingKeepaliveBound(cfg Config) time.Duration {
	return maxPingWait(cfg.PingTimeout) + 2*cfg.PingInterval + time.Second + 3*time.Second
}

// serveDarkClient is serve whose client side can go dark (darkConn);
// server returns the server's Conn.
func serveDarkClient(t *testing.T, cfg Config, handler func(*Stream), serverConn func(*net.TCPConn)) (c *Conn, d *darkConn, server func() *Conn) {
	t.Helper()
	dc := make(chan *darkConn, 1)
	c, server = serveWrapped(t, cfg, handler, func(a string) string { return a }, func(raw net.Conn, isServer bool) net.Conn {
		if isServer {
			if serverConn != nil {
				serverConn(raw.(*net.TCPConn))
			}
			return raw
		}
		d := newDarkConn(raw)
		dc <- d
		return d
	})
	d = <-dc
	t.Cleanup(func() { d.Close(); d.Conn.Close() })
	return c, d, server
}

// waitClosed waits for c to end within bound and says after how long.
func waitClosed(t *testing.T, c *Conn, since time.Time, bound time.Duration) time.Duration {
	t.Helper()
	select {
	case <-c.Done():
	case <-time.After(bound):
		t.Fatalf("the server's connection to a dark client is still open %v after it went dark", bound)
	}
	took := time.Since(since)
	if err := c.Err(); err == nil || !strings.Contains(err.Error(), "keepalive") {
		t.Errorf("the server's connection closed with %v, want keepalive's timeout", err)
	}
	return took
}

// TestServerKeepaliveClosesDarkClient: a client that opened a stream and
// then went dark (its node powered off: it reads nothing, answers
// nothing, sends no FIN) is pinged by the server, which closes the
// connection once the PING goes unanswered; the stream's handler, waiting
// for the client's bytes, sees its stream fail. Before, only clients
// pinged: the server's connection stayed open (here, past the bound; in
// life, for TCP keepalive's ~150 s) and so did the handler's stream.
func TestServerKeepaliveClosesDarkClient(t *testing.T) {
	readErr := make(chan error, 1)
	handler := func(s *Stream) {
		s.Respond(200, nil)
		b := make([]byte, 64)
		for {
			if _, err := s.Read(b); err != nil {
				readErr <- err
				return
			}
		}
	}
	c, d, server := serveDarkClient(t, serverKeepaliveCfg, handler, nil)
	s, _, err := c.OpenStreamData("10.0.0.1:80", nil, []byte("hello"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if st, _, err := s.Response(context.Background()); err != nil || st != 200 {
		t.Fatalf("response: %d %v", st, err)
	}
	sc := server()
	d.goDark()
	dark := time.Now()
	took := waitClosed(t, sc, dark, keepaliveBound(serverKeepaliveCfg))
	t.Logf("closed %v after the client went dark: %v (%d PINGs)", took.Round(time.Millisecond), sc.Err(), sc.KeepalivePings())
	select {
	case err := <-readErr:
		if err == nil || errors.Is(err, io.EOF) {
			t.Errorf("the handler's read on the dead client's stream: %v, want an error (not a clean end)", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the handler's read on the dead client's stream is still waiting after the connection closed")
	}
}

// darkMidAnswer serves handler (which answers with more than a MiB) to
// a client of cfg on a server socket with a 16 KiB send buffer, reads
// the answer's first MiB and turns the client dark: with windows far
// larger than the socket buffers, the server's writes fill the socket
// and block in write(2). It returns the server's Conn.
func darkMidAnswer(t *testing.T, cfg Config, handler func(*Stream)) *Conn {
	t.Helper()
	c, d, server := serveDarkClient(t, cfg, handler, func(raw *net.TCPConn) {
		if err := raw.SetWriteBuffer(16 << 10); err != nil {
			t.Error(err)
		}
	})
	s := openAnswered(t, c, "10.0.0.1:80")
	t.Cleanup(func() { s.Close() })
	if _, err := io.ReadFull(s, make([]byte, 1<<20)); err != nil {
		t.Fatalf("the answer's first MiB: %v", err)
	}
	sc := server()
	d.goDark()
	return sc
}

// TestServerKeepaliveClosesStalledWriter: the same, the server midway
// through a large answer when the client goes dark: its writes fill the
// socket and block in write(2) holding the connection's write lock (the
// client's windows are far larger than the socket buffers), so even the
// PING never leaves. Keepalive closes the connection all the same (its
// timeout runs from the PING's queueing; closeWith's write deadline ends
// the blocked write), and the handler's write fails.
func TestServerKeepaliveClosesStalledWriter(t *testing.T) {
	cfg := serverKeepaliveCfg
	cfg.StreamWindow, cfg.ConnWindow = 64<<20, 64<<20
	writeErr := make(chan error, 1)
	handler := func(s *Stream) {
		s.Respond(200, nil)
		b := make([]byte, 1<<20)
		for {
			if _, err := s.Write(b); err != nil {
				writeErr <- err
				return
			}
		}
	}
	sc := darkMidAnswer(t, cfg, handler)
	dark := time.Now()
	// The writer blocked on the full socket (the test's premise).
	blocked := false
	for !blocked {
		select {
		case <-sc.Done():
			t.Fatalf("closed (%v) before its writer was seen blocked on the socket", sc.Err())
		case <-time.After(time.Millisecond):
		}
		blocked = sc.cork.blockedSince.Load() != 0
	}
	took := waitClosed(t, sc, dark, fillingKeepaliveBound(cfg))
	t.Logf("closed %v after the client went dark: %v", took.Round(time.Millisecond), sc.Err())
	select {
	case err := <-writeErr:
		// Its error says why (the connection's reason, not "connection
		// closed" alone: TestSpliceErrorNamesKeepalive).
		wantKeepaliveClosed(t, "the handler's write to the dead client", err)
	case <-time.After(10 * time.Second):
		t.Fatal("the handler's write to the dead client is still blocked after the connection closed")
	}
}

// TestServerKeepaliveEndsShutdownOfDarkClient: a drain (Shutdown with no
// deadline, as the agent's idle and stale-peer closes) of a connection
// whose client went dark with a stream open ends when keepalive gives
// up. Before, Shutdown waited PingTimeout for its PING's ACK, then for
// the stream to end: for ever.
func TestServerKeepaliveEndsShutdownOfDarkClient(t *testing.T) {
	c, d, server := serveDarkClient(t, serverKeepaliveCfg, echoHandler, nil)
	s := openAnswered(t, c, "10.0.0.1:80")
	defer s.Close()
	sc := server()
	d.goDark()
	dark := time.Now()
	done := make(chan struct{})
	go func() { sc.Shutdown(context.Background()); close(done) }()
	waitClosed(t, sc, dark, keepaliveBound(serverKeepaliveCfg))
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Shutdown still waiting after the connection closed")
	}
}

// serveSplitCfg is a client with ccfg on a loopback connection to our
// server with scfg; it returns the server's Conn too.
func serveSplitCfg(t *testing.T, ccfg, scfg Config, handler func(*Stream)) (*Conn, *Conn) {
	t.Helper()
	srv := make(chan *Conn, 1)
	c := clientOf(t, ccfg, nil, func(raw net.Conn, tcfg *tls.Config) {
		sc, err := Server(context.Background(), raw, tcfg, scfg, nil, handler)
		if err != nil {
			t.Error(err)
			close(srv)
			return
		}
		t.Cleanup(func() { sc.Close() })
		srv <- sc
	})
	sc := <-srv
	if sc == nil {
		t.FailNow()
	}
	return c, sc
}

// TestServerKeepaliveKeepsLiveClient: a live client that never pings
// itself (keepalive off) keeps an idle connection across several of the
// server's PINGs: it answers them, and the server closes nothing. Before,
// the server sent no PING at all (the test's wait for them fails).
// PingTimeout is long: the count proves the answers (keepalive sends a
// PING only once the last one was answered), and a 200 ms one closed a
// live connection whenever the client was starved that long.
func TestServerKeepaliveKeepsLiveClient(t *testing.T) {
	scfg := Config{PingInterval: 50 * time.Millisecond, PingTimeout: 10 * time.Second}
	c, sc := serveSplitCfg(t, Config{PingInterval: -1}, scfg, echoHandler)
	echoOnce(t, c, context.Background())
	// Idle: an open stream with nothing moving, and none besides.
	s := openAnswered(t, c, "10.0.0.1:80")
	defer s.Close()
	// Five sent means four answered.
	const pings = 5
	waitKeepalivePings(t, sc, pings, "idle", func() bool { return true })
	if !sc.Usable() || !c.Usable() {
		t.Fatalf("after %d server PINGs: server usable %v (%v), client usable %v (%v)", sc.KeepalivePings(), sc.Usable(), sc.Err(), c.Usable(), c.Err())
	}
	b := []byte("still here")
	if _, err := s.Write(b); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(s, b); err != nil || string(b) != "still here" {
		t.Fatalf("the idle stream after the PINGs: %q %v", b, err)
	}
}

// waitKeepalivePings waits until sc has sent n keepalive PINGs while
// busy() holds, failing if sc closes first. keepalive sends a PING only
// once the previous one was answered (or frames came after it), so n
// sent means n-1 answered; PingTimeout is long in the tests that use it,
// so a starved scheduler cannot close a live connection, while a PING
// left unanswered still stops the count.
func waitKeepalivePings(t *testing.T, sc *Conn, n int64, what string, busy func() bool) {
	t.Helper()
	for end := time.Now().Add(20 * time.Second); sc.KeepalivePings() < n; {
		select {
		case <-sc.Done():
			t.Fatalf("%s: the server closed a live client's connection after %d PINGs: %v", what, sc.KeepalivePings(), sc.Err())
		case <-time.After(5 * time.Millisecond):
		}
		if !busy() {
			t.Fatalf("%s: the answer ended before the server sent %d PINGs (%d)", what, n, sc.KeepalivePings())
		}
		if time.Now().After(end) {
			t.Fatalf("%s: the server sent %d PINGs in 20 s, want %d", what, sc.KeepalivePings(), n)
		}
	}
}

// TestServerKeepaliveKeepsSlowReader: a live client whose app stops
// reading, then reads slowly, while the server streams a large answer.
// The client sends nothing meanwhile (no WINDOW_UPDATE until its app
// took a quarter of the window), so the server pings; its writer waits
// for window, not on the socket, and the PINGs leave on the control path
// ahead of the DATA still to come and are answered: the connection
// stays, and the whole answer arrives.
func TestServerKeepaliveKeepsSlowReader(t *testing.T) {
	const body = 12 << 20 // three stream windows (4 MiB)
	scfg := Config{PingInterval: 20 * time.Millisecond, PingTimeout: 10 * time.Second}
	wrote := make(chan error, 1)
	handler := func(s *Stream) {
		s.Respond(200, nil)
		_, err := s.Write(make([]byte, body))
		if err == nil {
			err = s.CloseWrite()
		}
		wrote <- err
	}
	c, sc := serveSplitCfg(t, Config{PingInterval: -1}, scfg, handler)
	s := openAnswered(t, c, "10.0.0.1:80")
	defer s.Close()
	writing := func() bool { return len(wrote) == 0 }
	// Stopped: the window is spent, the writer waits.
	waitKeepalivePings(t, sc, 5, "the app not reading", writing)
	// Slow: a window's quarter returned once every 256 reads.
	got := 0
	b := make([]byte, 4<<10)
	for at := sc.KeepalivePings(); sc.KeepalivePings() < at+5; {
		if !writing() {
			t.Fatalf("the answer ended before the server sent 5 PINGs to the slow reader (%d)", sc.KeepalivePings()-at)
		}
		n, err := s.Read(b)
		if err != nil {
			t.Fatalf("slow read after %d bytes: %v (server: %v)", got, err, sc.Err())
		}
		got += n
		time.Sleep(time.Millisecond) // pacing the reader, not an assertion
	}
	n, err := io.Copy(io.Discard, s)
	if err != nil || got+int(n) != body {
		t.Fatalf("the answer: %d bytes, %v; want %d", got+int(n), err, body)
	}
	if err := <-wrote; err != nil {
		t.Fatalf("the server's write: %v", err)
	}
	if !sc.Usable() {
		t.Fatalf("after %d PINGs to a slow reader the server's connection is not usable: %v", sc.KeepalivePings(), sc.Err())
	}
}
