package cniproto

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// rawListener is an agent socket whose accept queue the test controls:
// listen(2) with a backlog of 0 holds one pending connection, and a
// second connect blocks until the test accepts the first.
func rawListener(t *testing.T) (path string, fd int) {
	t.Helper()
	path = filepath.Join(t.TempDir(), "cni.sock")
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	return path, fd
}

// TestCallDeadlineCoversTheWholeExchange: a connect that waited for room
// in the agent's accept queue leaves the answer only what is left of the
// deadline, not the whole deadline again.
func TestCallDeadlineCoversTheWholeExchange(t *testing.T) {
	path, lfd := rawListener(t)
	// Fill the queue: this connection is never served.
	filler, err := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(filler)
	if err := unix.Connect(filler, &unix.SockaddrUnix{Name: path}); err != nil {
		t.Fatal(err)
	}
	const deadline = time.Second
	// Room in the queue late in the deadline; Call's connection is then
	// queued and never answered.
	accepted := make(chan int, 1)
	time.AfterFunc(deadline*8/10, func() {
		nfd, _, _ := unix.Accept4(lfd, unix.SOCK_CLOEXEC)
		accepted <- nfd
	})
	defer func() {
		if nfd := <-accepted; nfd >= 0 {
			unix.Close(nfd)
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()
	req := goodRequest()
	req.Op = OpDel
	start := time.Now()
	_, err = Call(ctx, path, req, nil)
	took := time.Since(start)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Call: %v, want the deadline", err)
	}
	if took > deadline*14/10 {
		t.Errorf("Call returned after %v with a %v deadline", took.Round(time.Millisecond), deadline)
	}
}

// TestCallDeadlineUnderSignals: signals to the calling thread interrupt
// the blocking receive (EINTR, as a socket with a timeout is not
// restarted by SA_RESTART); retrying must not start the timeout afresh,
// or a steady stream of signals keeps Call waiting for ever.
func TestCallDeadlineUnderSignals(t *testing.T) {
	path, _ := rawListener(t) // queued, never answered
	const deadline = 300 * time.Millisecond
	type result struct {
		err  error
		took time.Duration
	}
	tids := make(chan int, 1)
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		tids <- unix.Gettid()
		ctx, cancel := context.WithTimeout(context.Background(), deadline)
		defer cancel()
		req := goodRequest()
		req.Op = OpDel
		start := time.Now()
		_, err := Call(ctx, path, req, nil)
		done <- result{err, time.Since(start)}
	}()
	tid := <-tids
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	limit := time.After(3 * time.Second)
	for {
		select {
		case r := <-done:
			if !errors.Is(r.err, context.DeadlineExceeded) {
				t.Errorf("Call: %v, want the deadline", r.err)
			}
			if r.took > 2*deadline {
				t.Errorf("Call returned after %v with a %v deadline", r.took.Round(time.Millisecond), deadline)
			}
			return
		case <-limit:
			tick.Stop()
			r := <-done // without signals it ends
			t.Fatalf("Call still waiting 3 s into a %v deadline while signalled (returned %v after the signals stopped)", deadline, r.err)
		case <-tick.C:
			// SIGURG: the Go runtime's own preemption signal, harmless.
			unix.Tgkill(os.Getpid(), tid, unix.SIGURG)
		}
	}
}
