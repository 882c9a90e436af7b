package hbone

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
)

// ctlHeld is the connection whose control-frame writer holdCtlLoop holds
// back (nil: none). The hook is set once, before any connection exists,
// and never cleared: a ctlLoop still running after its test reads it,
// and a test's write of it then raced with that read.
var ctlHeld atomic.Pointer[Conn]

func init() { testHookCtlWoken = holdCtlLoop }

// holdCtlLoop lets ctlHeld's ctlLoop write only a queue holding
// Shutdown's PING (its first step); any other pass waits until the
// connection is done. The pass that writes the PING takes the final
// GOAWAY with it only if that was queued before the PING's ACK, which
// cannot be: so ctlLoop never writes the final GOAWAY, deterministically,
// and only the close can.
func holdCtlLoop(c *Conn) {
	if ctlHeld.Load() != c {
		return
	}
	for {
		c.ctlMu.Lock()
		ping := bytes.Contains(c.ctl, shutdownPing[:])
		c.ctlMu.Unlock()
		if ping {
			return
		}
		select {
		case <-c.done:
			return
		case <-time.After(time.Millisecond): // polling the queue, not an assertion
		}
	}
}

// TestShutdownFlushesQueuedGoAway: Shutdown of an idle server queues its
// final GOAWAY and, with no stream to wait for, closes at once. The
// control-frame writer (ctlLoop) may not have taken the frame yet when
// the close takes the write lock; the close then sent close_notify and
// the FIN, and the GOAWAY (naming the last stream served) was never
// written: the client learnt from the bare close neither that the
// server left on purpose nor which of its streams were served. Here
// ctlLoop is held (holdCtlLoop) so that the close always wins; the
// client must read GOAWAY(2^31-1) and the PING, then, after its ACK,
// the final GOAWAY naming stream 1, then close_notify.
func TestShutdownFlushesQueuedGoAway(t *testing.T) {
	a := newAttacker(t, Config{PingTimeout: 10 * time.Second}, attackOpts{noPreface: true}, func(s *Stream) {
		s.Respond(200, nil)
		s.CloseWrite()
	})
	a.write(append([]byte(clientPreface), appendSettings(nil)...))
	srv := a.server()
	next := func() (rawFrame, error) {
		_ = a.tc.SetReadDeadline(time.Now().Add(10 * time.Second))
		var hb [frameHeaderLen]byte
		if _, err := io.ReadFull(a.tc, hb[:]); err != nil {
			return rawFrame{}, err
		}
		f := rawFrame{h: parseFrameHeader(hb[:])}
		f.p = make([]byte, f.h.Length)
		_, err := io.ReadFull(a.tc, f.p)
		return f, err
	}
	goAway := func(f rawFrame) (uint32, bool) {
		if f.h.Type != frameGoAway || len(f.p) < 8 {
			return 0, false
		}
		return binary.BigEndian.Uint32(f.p) & (1<<31 - 1), true
	}
	describe := func(f rawFrame) string {
		if id, ok := goAway(f); ok {
			return fmt.Sprintf("GOAWAY(%d)", id)
		}
		return fmt.Sprintf("frame type %d flags %#x stream %d", f.h.Type, f.h.Flags, f.h.StreamID)
	}

	// Stream 1, served and ended: the final GOAWAY's last stream.
	a.write(frameBytes(frameSettings, flagAck, 0, nil))
	a.write(headersFrame(1, true))
	for {
		f, err := next()
		if err != nil {
			t.Fatalf("before stream 1's answer: %v", err)
		}
		if f.h.StreamID == 1 && f.h.Flags&flagEndStream != 0 {
			break
		}
	}
	for deadline := time.Now().Add(10 * time.Second); srv.ActiveStreams() > 0; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the server still holds stream 1 after 10 s")
		}
	}

	ctlHeld.Store(srv)
	t.Cleanup(func() { ctlHeld.CompareAndSwap(srv, nil) })
	shut := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		shut <- srv.Shutdown(ctx)
	}()
	acked := false
	var after []string // what the client read after its ACK
	var final []uint32
	var end error
	for end == nil {
		f, err := next()
		if err != nil {
			end = err
			break
		}
		if !acked {
			if f.h.Type == framePing && f.h.Flags&flagAck == 0 && bytes.Equal(f.p, shutdownPing[:]) {
				a.write(frameBytes(framePing, flagAck, 0, f.p))
				acked = true
			}
			continue
		}
		after = append(after, describe(f))
		if id, ok := goAway(f); ok {
			final = append(final, id)
		}
	}
	if !acked {
		t.Fatalf("the connection ended (%v) before the shutdown PING", end)
	}
	if len(final) != 1 || final[0] != 1 {
		t.Errorf("after the ACK the client read %v, then %v; want the final GOAWAY(1), then close_notify", after, end)
	}
	if !errors.Is(end, io.EOF) {
		t.Errorf("the connection ended with %v, want close_notify (io.EOF)", end)
	}
	select {
	case err := <-shut:
		if err != nil {
			t.Errorf("Shutdown: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Shutdown has not returned 10 s after the connection ended")
	}
}

// TestShutdownSlowLinkWaitsForTheAck: a server shuts down while it sends
// a 200 KiB download over a link of 400 kbit/s (slowLink: our server on
// the shaped side), ~4 s of its bytes queued ahead of its GOAWAY and
// PING; PingTimeout is 1 s. The client reads the first GOAWAY only once
// the download is through, and opens a stream 2 s into the shutdown, as
// a client does until it has read the GOAWAY. The server must still be
// waiting for the ACK then (the peer's TCP acknowledges the download's
// bytes all along: awaitShutdownAck), and serve that stream. Before, its
// wait ended at PingTimeout: the final GOAWAY went out 1 s in, and the
// stream was refused.
func TestShutdownSlowLinkWaitsForTheAck(t *testing.T) {
	testenv.RequireRoot(t)
	const body = 200 << 10
	cfg := Config{
		PingInterval: -1, // Shutdown's own wait alone
		PingTimeout:  time.Second,
		StreamWindow: 16 << 20, // no WINDOW_UPDATE during the test
		ConnWindow:   16 << 20,
	}
	download := make([]byte, body)
	rand.Read(download)
	written := make(chan struct{})
	var first atomic.Bool
	handler := func(s *Stream) {
		if !first.CompareAndSwap(false, true) {
			echoHandler(s)
			return
		}
		s.Respond(200, nil)
		s.Write(download)
		s.CloseWrite()
		// In the socket (1 MiB of room), not yet on the link: the
		// shutdown's PING goes behind it.
		close(written)
		io.Copy(io.Discard, s)
	}
	// Room for the whole download in the server's socket: the PING is
	// queued behind all of it. With the initial 16 KiB, the writer waits
	// for room between frames, and ctlLoop's PING went out after the
	// first frame, ~1.4 s in.
	c, sc, _ := slowServerPair(t, cfg, cfg, handler, nil)

	s1, err := c.OpenStream("10.0.0.1:80", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s1.Close()
	s1.CloseWrite()
	got := readDownload(s1, download)
	select {
	case <-written:
	case <-time.After(10 * time.Second):
		t.Fatal("the download was not written within 10 s")
	}
	start := time.Now()
	shut := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		shut <- sc.Shutdown(ctx)
	}()
	time.Sleep(2 * cfg.PingTimeout) // into the shutdown, past PingTimeout: a wait, not an assertion
	select {
	case <-sc.shutdownAck:
		t.Fatalf("the shutdown PING was answered within %v: the link did not hold it up behind the download", time.Since(start).Round(time.Millisecond))
	default:
	}
	msg := []byte("opened before the client read the first GOAWAY")
	s3, err := c.OpenStream("10.0.0.1:80", nil)
	if err != nil {
		t.Fatalf("open %v into the shutdown (the client has not read the GOAWAY behind the download): %v", time.Since(start).Round(time.Millisecond), err)
	}
	defer s3.Close()
	s3.Write(msg)
	s3.CloseWrite()
	if st, _, err := s3.Response(context.Background()); err != nil || st != 200 {
		sc.mu.Lock()
		final, last := sc.finalSent, sc.finalLast
		sc.mu.Unlock()
		t.Fatalf("stream %d, opened %v into the shutdown: response %d, %v (final GOAWAY decided: %v, last stream %d)", s3.ID(), 2*cfg.PingTimeout, st, err, final, last)
	}
	if b, err := io.ReadAll(s3); err != nil || !bytes.Equal(b, msg) {
		t.Fatalf("stream %d's echo: %q, %v", s3.ID(), b, err)
	}
	if err := <-got; err != nil {
		t.Fatalf("the download: %v", err)
	}
	select {
	case err := <-shut:
		if err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		t.Logf("Shutdown returned %v after it began", time.Since(start).Round(time.Millisecond))
	case <-time.After(20 * time.Second):
		t.Fatal("Shutdown has not returned 20 s after its last stream ended")
	}
}
