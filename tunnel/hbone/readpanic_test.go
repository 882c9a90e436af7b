package hbone

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestReadLoopPanicClosesConn: a panic on a connection's read loop (here
// in the SetOnIdle callback, which the loop runs when the peer's
// RST_STREAM ends the last stream) closes that connection with
// INTERNAL_ERROR, its error naming the panic, and Config.OnPanic hears
// of it once with the stack. The read loop runs on a goroutine of its
// own: the panic ended the process (the test binary).
func TestReadLoopPanicClosesConn(t *testing.T) {
	var panics atomic.Int32
	var stack atomic.Value
	cfg := Config{PingInterval: -1, OnPanic: func(_ *Conn, v any, st []byte) {
		panics.Add(1)
		stack.Store(string(st))
	}}
	c, server := serve(t, cfg, func(s *Stream) { s.Reset(ErrCodeCancel) })
	c.SetOnIdle(func(*Conn) { panic("test: the idle callback panics") })
	s, err := c.OpenStream("10.0.0.1:80", nil)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the connection is still open 10 s after its read loop panicked")
	}
	var ce connError
	if err := c.Err(); !errors.As(err, &ce) || ce.Code != ErrCodeInternal || !strings.Contains(err.Error(), "the idle callback panics") {
		t.Errorf("connection error %v, want an INTERNAL_ERROR naming the panic", err)
	}
	if n := panics.Load(); n != 1 {
		t.Errorf("OnPanic called %d times, want 1", n)
	}
	if st, _ := stack.Load().(string); !strings.Contains(st, "readFramesRecovered") {
		t.Errorf("OnPanic's stack does not show the read loop:\n%s", st)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, _, err := s.Response(ctx); err == nil {
		t.Error("Response on the panicked connection's stream: no error")
	}
	if _, err := c.OpenStream("10.0.0.1:80", nil); err == nil {
		t.Error("a new stream opened on the panicked connection")
	}
	// The peer is told, and ends too.
	select {
	case <-server().Done():
	case <-time.After(10 * time.Second):
		t.Error("the server's connection is still open 10 s after the client's read loop panicked")
	}
}
