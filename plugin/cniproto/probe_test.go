package cniproto

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// Probe (the plugin's STATUS under fail-closed, every few seconds) tells
// a serving agent from a socket file a dead one left, and the agent does
// not count the request-less connection as an error: before, each probe
// reached OnError (the agent's log) as a request that failed to decode.
func TestProbe(t *testing.T) {
	path := filepath.Join(t.TempDir(), "agent.sock")
	l, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var errs []error
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	srv := &Server{Handler: func(context.Context, *Request, *os.File) *Response { return &Response{Decision: Skip} }, Timeout: 2 * time.Second,
		OnError: func(err error) { mu.Lock(); errs = append(errs, err); mu.Unlock() }}
	go func() { srv.Serve(ctx, l); close(done) }()
	for range 5 {
		if err := Probe(path, time.Second); err != nil {
			t.Fatalf("Probe of a serving agent: %v", err)
		}
	}
	// A real request still works afterwards.
	cctx, ccancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer ccancel()
	req := goodRequest()
	req.Op = OpDel
	if _, err := Call(cctx, path, req, nil); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	cancel()
	<-done
	mu.Lock()
	if len(errs) != 0 {
		t.Errorf("probes reached OnError: %v", errs)
	}
	mu.Unlock()
	// A socket file nobody listens on any more, as after a kill -9.
	stale := path + ".stale"
	l, err = net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	if _, err := os.Stat(stale); err != nil {
		t.Fatalf("the stale socket file is gone: %v", err)
	}
	if err := Probe(stale, time.Second); !errors.Is(err, ErrAgentUnavailable) {
		t.Fatalf("Probe of a stale socket file: %v, want ErrAgentUnavailable", err)
	}
	if err := Probe(path+".missing", time.Second); !errors.Is(err, ErrAgentUnavailable) {
		t.Fatalf("Probe of a missing socket: %v, want ErrAgentUnavailable", err)
	}
}
