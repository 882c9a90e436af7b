package cniproto

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// serveSocket answers every request on s with an error naming who.
func serveSocket(t *testing.T, s *Socket, who string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	h := func(ctx context.Context, req *Request, netns *os.File) *Response {
		if netns != nil {
			netns.Close()
		}
		return &Response{Error: who}
	}
	go func() { (&Server{Handler: h, Timeout: 2 * time.Second}).Serve(ctx, s.Listener); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
}

// answerer is who serves the socket at path ("" and the error if none).
func answerer(t *testing.T, path string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	req := goodRequest()
	req.Op = OpDel
	resp, err := Call(ctx, path, req, nil)
	if err != nil {
		return "", err
	}
	return resp.Error, nil
}

func current(t *testing.T, s *Socket) bool {
	t.Helper()
	ok, err := s.Current()
	if err != nil {
		t.Fatal(err)
	}
	return ok
}

// TestSocketTakenBack: a second agent's socket replaces the first's at
// the path, each knows which one the path names, and the first can take
// the path back once the second stopped serving (a rollback).
func TestSocketTakenBack(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "run")
	path := filepath.Join(dir, "cni.sock")
	older, err := OpenSocket(path)
	if err != nil {
		t.Fatal(err)
	}
	serveSocket(t, older, "older")
	if !current(t, older) {
		t.Fatal("the path does not name the socket just opened")
	}
	newer, err := OpenSocket(path)
	if err != nil {
		t.Fatal(err)
	}
	serveSocket(t, newer, "newer")
	if current(t, older) || !current(t, newer) {
		t.Fatalf("after the newer socket replaced the path: older current %v, newer current %v; want false, true", current(t, older), current(t, newer))
	}
	if who, err := answerer(t, path); who != "newer" {
		t.Fatalf("answered by %q (%v), want the newer socket", who, err)
	}
	if st, err := os.Stat(path); err != nil || st.Mode().Perm() != 0o600 || st.Mode().Type() != os.ModeSocket {
		t.Fatalf("socket file: %v %v, want a 0600 socket", st.Mode(), err)
	}

	newer.Close() // the newer agent stops serving: refused, not missing
	if _, err := answerer(t, path); !errors.Is(err, ErrAgentUnavailable) || !strings.Contains(err.Error(), "connection refused") {
		t.Fatalf("newer socket closed: %v, want connection refused", err)
	}
	again, err := OpenSocket(path)
	if err != nil {
		t.Fatal(err)
	}
	serveSocket(t, again, "older again")
	if who, err := answerer(t, path); who != "older again" {
		t.Fatalf("answered by %q (%v), want the older agent's new socket", who, err)
	}
	if current(t, newer) || !current(t, again) {
		t.Fatal("after taking the path back: the closed socket is current, or the new one is not")
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Fatalf("files left beside the socket: %v", names)
	}
	os.Remove(path)
	if current(t, again) {
		t.Fatal("a removed path reported current")
	}
}

// TestReplacingNeverLeavesThePathMissing: a plugin looking up the path
// while an agent replaces it finds the previous socket or the new one,
// never nothing (removing the old file, then binding, left a window in
// which an ADD failed with ENOENT).
func TestReplacingNeverLeavesThePathMissing(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cni.sock")
	s, err := OpenSocket(path)
	if err != nil {
		t.Fatal(err)
	}
	var missing, looks atomic.Int64
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := os.Lstat(path); errors.Is(err, os.ErrNotExist) {
				missing.Add(1)
			}
			looks.Add(1)
		}
	}()
	for range 500 {
		next, err := OpenSocket(path)
		if err != nil {
			t.Fatal(err)
		}
		s.Close()
		s = next
	}
	close(stop)
	<-done
	s.Close()
	if missing.Load() != 0 {
		t.Fatalf("the path was missing at %d of %d looks while it was replaced 500 times", missing.Load(), looks.Load())
	}
	t.Logf("%d looks, the path always there", looks.Load())
}
