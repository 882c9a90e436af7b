package hbone

import (
	"bytes"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2/hpack"
)

// rawServer plays the server side of an HTTP/2 connection by hand over a
// synchronous pipe for a client Conn; the frames the client sends come
// out of frames.
func rawServer(t *testing.T) (*Conn, net.Conn, <-chan rawFrame) {
	t.Helper()
	return rawServerCfg(t, Config{PingInterval: -1})
}

// rawServerCfg is rawServer with the client's cfg.
func rawServerCfg(t *testing.T, cfg Config) (*Conn, net.Conn, <-chan rawFrame) {
	t.Helper()
	cli, srv := net.Pipe()
	t.Cleanup(func() { cli.Close(); srv.Close() })
	frames := make(chan rawFrame, 4096)
	go func() {
		defer close(frames)
		pre := make([]byte, len(clientPreface))
		if _, err := io.ReadFull(srv, pre); err != nil {
			return
		}
		var hb [frameHeaderLen]byte
		for {
			if _, err := io.ReadFull(srv, hb[:]); err != nil {
				return
			}
			h := parseFrameHeader(hb[:])
			b := make([]byte, h.Length)
			if _, err := io.ReadFull(srv, b); err != nil {
				return
			}
			frames <- rawFrame{h, b}
		}
	}()
	settings := make(chan struct{})
	go func() { srv.Write(appendSettings(nil)); close(settings) }()
	c, err := NewClientConn(cli, nil, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	// Read by the client (the pipe's write returns then) before the
	// caller writes: a write of its own, from another goroutine, could
	// take the pipe first, and the client saw a HEADERS as the
	// server's first frame (PROTOCOL_ERROR; about one full -race run
	// of the package in six, under load).
	select {
	case <-settings:
	case <-time.After(10 * time.Second):
		t.Fatal("the client did not read the server's SETTINGS within 10 s")
	}
	return c, srv, frames
}

// TestRefusalOfClosedStreamSendsNoRST: when the client app half-closed
// before the server's refusal (HEADERS 503 with END_STREAM), both ends
// of the stream are done when the refusal arrives, and RFC 9113 §5.1
// forbids any frame but PRIORITY on a closed stream: the client must not
// send RST_STREAM for it (refused's own comment says so), and the app
// must still be reset and OnResponse told once. It did send
// RST_STREAM(CANCEL) while Splice ran: handleResponse reset the stream
// before refused recorded the server's END_STREAM.
func TestRefusalOfClosedStreamSendsNoRST(t *testing.T) {
	for i := 0; i < 10; i++ {
		c, srv, frames := rawServer(t)
		s, err := c.OpenStream("10.0.0.1:80", nil)
		if err != nil {
			t.Fatal(err)
		}
		var calls atomic.Int32
		var status atomic.Int32
		s.OnResponse(func(st int) { calls.Add(1); status.Store(int32(st)) })
		app, peer := appPair(t)
		done := make(chan SpliceResult, 1)
		go func() { done <- s.Splice(app) }()
		peer.(*net.TCPConn).CloseWrite()
		id := nextFrame(t, frames, "the client's END_STREAM", func(f rawFrame) bool {
			return (f.h.Type == frameData || f.h.Type == frameHeaders) && f.h.Flags&flagEndStream != 0
		}).h.StreamID
		// The client records its END_STREAM as sent just after the
		// write returns; over TCP the answer takes a round trip, over a
		// synchronous pipe it may not: wait as TCP would.
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
			c.mu.Lock()
			sent := s.sentEnd
			c.mu.Unlock()
			if sent {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("END_STREAM written but not recorded as sent")
			}
		}

		var hb bytes.Buffer
		hpack.NewEncoder(&hb).WriteField(hpack.HeaderField{Name: ":status", Value: "503"})
		go srv.Write(appendFrame(nil, frameHeaders, flagEndHeaders|flagEndStream, id, hb.Bytes()))

		select {
		case res := <-done:
			wantRefused(t, "splice", res.Err)
		case <-time.After(5 * time.Second):
			t.Fatal("Splice did not return after the refusal")
		}
		peer.SetReadDeadline(time.Now().Add(5 * time.Second))
		if b, err := io.ReadAll(peer); len(b) != 0 || err == nil {
			t.Errorf("app read %q, %v after the refusal, want a reset", b, err)
		}
		if n, st := calls.Load(), status.Load(); n != 1 || st != 503 {
			t.Errorf("OnResponse called %d times (status %d), want once with 503", n, st)
		}
		// Anything the refusal queued goes out before the PING's ACK.
		go srv.Write(appendFrame(nil, framePing, 0, 0, make([]byte, 8)))
		for {
			f := nextFrame(t, frames, "the PING ACK", func(rawFrame) bool { return true })
			if f.h.Type == frameRSTStream {
				t.Fatalf("run %d: RST_STREAM on stream %d, closed both ways", i, f.h.StreamID)
			}
			if f.h.Type == framePing && f.h.Flags&flagAck != 0 {
				break
			}
		}
	}
}
