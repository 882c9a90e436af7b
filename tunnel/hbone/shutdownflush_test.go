package hbone

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync/atomic"
	"testing"
	"time"
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
