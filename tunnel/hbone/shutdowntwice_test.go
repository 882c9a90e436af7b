package hbone

import (
	"context"
	"encoding/binary"
	"testing"
	"time"
)

// TestShutdownTwiceNeverRaisesGoAway: the agent may shut an inbound
// connection down twice: an idle or stale-peer Shutdown waiting for a
// stream it let in, then the pod's Close on the same connection. The
// last stream id of the server's GOAWAYs must never go up again (RFC
// 9113 §6.8: "Endpoints MUST NOT increase the value they send in the
// last stream identifier"); nghttp2 and h2 (ztunnel's client) treat an
// increase as a PROTOCOL_ERROR and tear the connection down, failing the
// very stream the shutdown was waiting for. Before, the second Shutdown
// sent its first step again, GOAWAY(2^31-1) after the first's final
// GOAWAY(1), and a second final GOAWAY named the stream refused since.
func TestShutdownTwiceNeverRaisesGoAway(t *testing.T) {
	release := make(chan struct{})
	a := newAttacker(t, Config{}, attackOpts{}, func(s *Stream) {
		s.Respond(200, nil)
		<-release
		s.Close()
	})
	srv := a.server()
	// The client: every GOAWAY's last stream id, in order; PINGs acked.
	goAways := make(chan uint32, 16)
	go func() {
		for f := range a.frames {
			switch {
			case f.h.Type == framePing && f.h.Flags&flagAck == 0:
				a.write(frameBytes(framePing, flagAck, 0, f.p))
			case f.h.Type == frameGoAway && len(f.p) >= 8:
				goAways <- binary.BigEndian.Uint32(f.p) & (1<<31 - 1)
			}
		}
		close(goAways)
	}()
	next := func(what string) uint32 {
		t.Helper()
		select {
		case id, ok := <-goAways:
			if !ok {
				t.Fatalf("%s: the connection ended", what)
			}
			return id
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: no GOAWAY within 10 s", what)
		}
		return 0
	}
	a.write(headersFrame(1, false))
	deadline := time.Now().Add(5 * time.Second)
	for srv.ActiveStreams() != 1 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	first := make(chan error, 1)
	go func() { first <- srv.Shutdown(context.Background()) }()
	if id := next("first shutdown, first step"); id != 1<<31-1 {
		t.Fatalf("first GOAWAY names stream %d, want 2^31-1", id)
	}
	if id := next("first shutdown, final step"); id != 1 {
		t.Fatalf("final GOAWAY names stream %d, want 1", id)
	}
	// Sent after the final GOAWAY: refused, but the server saw it.
	a.write(headersFrame(3, true))
	time.Sleep(50 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	second := make(chan error, 1)
	go func() { second <- srv.Shutdown(ctx) }()
	lastID := uint32(1)
	wait := time.After(300 * time.Millisecond)
	for done := false; !done; {
		select {
		case id, ok := <-goAways:
			if !ok {
				done = true
				break
			}
			if id > lastID {
				t.Errorf("the second Shutdown sent GOAWAY(%d) after GOAWAY(%d): the last stream id went up", id, lastID)
			}
		case <-wait:
			done = true
		}
	}
	close(release)
	for _, ch := range []chan error{first, second} {
		select {
		case <-ch:
		case <-time.After(10 * time.Second):
			t.Fatal("a Shutdown has not returned 10 s after the last stream ended")
		}
	}
}
