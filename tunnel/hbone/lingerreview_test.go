package hbone

import (
	"testing"
	"time"
)

// TestLingerStartsNoStream (review s23r2 of acc4186): a closed
// connection's linger goes on reading while the peer keeps sending (its
// bytes are the link's progress), up to 10 × PingTimeout since session
// 23 (4 s here), not 1 s. What it reads is only dropped: a stream the
// peer opens then (a HEADERS 1.5 s after the close, past lingerWait) is
// refused, its handler never run, and the close's reason stays the
// close's. It fails with serverHeaders taking streams on a closed
// connection (the stream is taken), and before acc4186 (the server has
// stopped reading at 1 s).
func TestLingerStartsNoStream(t *testing.T) {
	started := make(chan struct{}, 1)
	handler := func(s *Stream) {
		select {
		case started <- struct{}{}:
		default:
		}
		echoHandler(s)
	}
	a := newAttacker(t, Config{PingTimeout: 400 * time.Millisecond}, attackOpts{}, handler)
	srv := a.server()
	keepPinging(t, a)
	srv.Close()
	closed := time.Now()
	time.Sleep(lingerWait + lingerWait/2)
	if err := a.write(headersFrame(1, true)); err != nil {
		t.Fatalf("writing HEADERS while the server lingers: %v", err)
	}
	for {
		srv.mu.Lock()
		seen, opened := srv.lastPeerStream, srv.streams[1] != nil
		srv.mu.Unlock()
		if seen == 1 {
			// Taken under the lock that counts the stream as seen.
			if opened {
				t.Fatal("a stream opened while the server lingered after its close was taken")
			}
			break
		}
		select {
		case <-srv.readDone:
			t.Fatalf("the server stopped reading %v after its close, before the HEADERS sent 1.5 s in: its linger no longer follows a peer that keeps sending", time.Since(closed).Round(time.Millisecond))
		case <-time.After(time.Millisecond):
		}
	}
	select {
	case <-started:
		t.Fatal("a stream opened while the server lingered after its close ran its handler")
	default:
	}
	if err := srv.Err(); err != ErrConnClosed {
		t.Errorf("the lingering server's error is %v, want Close's %v", err, ErrConnClosed)
	}
	select {
	case <-srv.readDone:
	case <-time.After(10 * time.Second):
		t.Fatal("the server went on reading 10 s after its close (bound 10 × PingTimeout, 4 s)")
	}
}
