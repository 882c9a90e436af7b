package hbone

import (
	"context"
	"crypto/rand"
	"errors"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
)

// TestShutdownLingersWhileTheLinkDrains: a server's Shutdown ends once
// its last stream does, and that stream's last DATA (a download's last
// quarter MiB) may still be in the socket then, seconds of it on a link
// of 400 kbit/s (slowLink: our server on the shaped side). The client
// reading it returns window as it goes (a WINDOW_UPDATE per 64 KiB:
// windows of 256 KiB), so it sends to a server whose close is over.
// lingerClose read and dropped what came for lingerWait (1 s) from the
// close and then closed the socket: the client's next WINDOW_UPDATE met
// a closed socket, whose kernel answered it with a RST and threw away
// the download's bytes still queued; the client read "connection reset
// by peer" after a stream the server had served whole. The download
// must arrive whole, then close_notify.
func TestShutdownLingersWhileTheLinkDrains(t *testing.T) {
	testenv.RequireRoot(t)
	const body = 320 << 10
	scfg := Config{PingInterval: -1, PingTimeout: time.Second}
	ccfg := Config{PingInterval: -1, PingTimeout: time.Second, StreamWindow: 256 << 10, ConnWindow: 256 << 10}
	download := make([]byte, body)
	rand.Read(download)
	handler, holding, release := heldDownload(download)
	// The room in the server's socket is for what the client's window
	// lets out: the stream ends with its last quarter MiB queued, not
	// waiting for room.
	c, sc, _ := slowServerPair(t, scfg, ccfg, handler, nil)

	s1, err := c.OpenStream("10.0.0.1:80", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s1.Close()
	s1.CloseWrite()
	select {
	case <-holding:
	case <-time.After(10 * time.Second):
		t.Fatal("the handler did not start within 10 s")
	}
	// The shutdown's first step and its ACK before the download, so
	// that the close follows the stream's end at once.
	shut := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		shut <- sc.Shutdown(ctx)
	}()
	awaitFinalGoAway(t, sc)
	close(release)

	var closed time.Time // when Shutdown returned
	got := readDownload(s1, download)
	select {
	case err := <-shut:
		closed = time.Now()
		if err != nil {
			t.Errorf("Shutdown: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Shutdown has not returned within 30 s of the download's start")
	}
	select {
	case err := <-got:
		if err != nil {
			t.Fatalf("the download: %v, %v after the server's close", err, time.Since(closed).Round(time.Millisecond))
		}
		t.Logf("the download was read whole %v after the server's close", time.Since(closed).Round(time.Millisecond))
	case <-time.After(30 * time.Second):
		t.Fatal("the download has not ended 30 s after the server's close")
	}
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the client's connection has not ended 10 s after the download")
	}
	if err := c.Err(); err != nil && !errors.Is(err, ErrConnClosed) {
		t.Errorf("the client's connection ended with %v, want the server's close_notify", err)
	}
	// The client's end (its close_notify and FIN, sent as its
	// connection ends) ends the server's linger at once. Not the bound
	// on it (maxPingWait(PingTimeout): 10 s after the close, which comes
	// within 5 s of the client's end), nor a quiet link's lingerWait:
	// the client's last bytes are progress, so that read deadline is a
	// lingerWait or more after them.
	select {
	case <-sc.readDone:
	case <-time.After(lingerWait / 2):
		t.Fatalf("the server went on reading %v after the client's end", lingerWait/2)
	}
}

// TestLingerBoundedForAPeerThatKeepsSending: the linger follows the
// link's progress, and bytes the peer sends are progress; a peer that
// never ends its side but goes on sending (a PING every 50 ms here)
// must still be closed on, at the bound (maxPingWait(PingTimeout): 3 s
// with a PingTimeout of 300 ms), not kept for as long as it sends.
func TestLingerBoundedForAPeerThatKeepsSending(t *testing.T) {
	a := newAttacker(t, Config{PingTimeout: 300 * time.Millisecond}, attackOpts{}, echoHandler)
	srv := a.server()
	keepPinging(t, a)
	srv.Close()
	select {
	case <-srv.readDone:
	case <-time.After(10 * time.Second):
		t.Fatal("the server went on reading a peer that keeps sending 10 s after its close")
	}
}
