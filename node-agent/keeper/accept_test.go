package keeper

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// childEnv names the socket path a re-executed test binary serves the
// keeper at (TestKeeperChild).
const childEnv = "AMBIT_KEEPER_TEST_CHILD"

// TestKeeperChild is not a test: it is the keeper process of
// TestAcceptErrorKeepsSockets, run by re-executing this test binary, so
// that its RLIMIT_NOFILE can be lowered without starving the test itself.
func TestKeeperChild(t *testing.T) {
	path := os.Getenv(childEnv)
	if path == "" {
		return
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	err := (&Server{}).Serve(ctx, path)
	fmt.Fprintf(os.Stderr, "keeper child: Serve returned: %v\n", err)
	if err != nil {
		os.Exit(3)
	}
	os.Exit(0)
}

// syncBuffer collects the child's stderr while the test reads it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// A keeper whose accept fails — here for real: its process may open no
// descriptor (RLIMIT_NOFILE lowered to 0 from outside, as fd exhaustion
// would), so accept(2) answers EMFILE — keeps every socket it holds, logs
// the error once, and serves the caller that was waiting once descriptors
// are available again. Giving up would close every enrolled pod's kept
// listeners over a transient condition.
func TestAcceptErrorKeepsSockets(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keeper.sock")
	var stderr syncBuffer
	cmd := exec.Command(os.Args[0], "-test.run=^TestKeeperChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), childEnv+"="+path)
	cmd.Stderr = &stderr
	cmd.Stdout = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		select {
		case <-exited:
			return
		default:
		}
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			if err != nil {
				t.Errorf("keeper child after SIGTERM: %v\n%s", err, stderr.String())
			}
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-exited
			t.Errorf("keeper child ignored SIGTERM\n%s", stderr.String())
		}
	})
	alive := func() {
		t.Helper()
		select {
		case err := <-exited:
			exited <- err
			t.Fatalf("keeper child exited (%v):\n%s", err, stderr.String())
		default:
		}
	}

	var cl *Client
	for i := 0; ; i++ {
		var err error
		if cl, err = Dial(path); err == nil {
			break
		}
		if i == 500 {
			t.Fatalf("keeper child not listening: %v\n%s", err, stderr.String())
		}
		alive()
		time.Sleep(10 * time.Millisecond)
	}
	var addrs []string
	var ls []net.Listener
	for range 2 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
		addrs = append(addrs, l.Addr().String())
	}
	if err := cl.Put("pod", ls...); err != nil {
		t.Fatal(err)
	}
	for _, l := range ls {
		l.Close() // the keeper's copies are the only ones left
	}

	var orig unix.Rlimit
	if err := unix.Prlimit(cmd.Process.Pid, unix.RLIMIT_NOFILE, nil, &orig); err != nil {
		t.Fatal(err)
	}
	starved := orig
	starved.Cur = 0
	if err := unix.Prlimit(cmd.Process.Pid, unix.RLIMIT_NOFILE, &starved, nil); err != nil {
		t.Fatal(err)
	}
	restored := false
	restore := func() {
		if !restored {
			restored = true
			// ESRCH: the child is gone, which alive() reports.
			if err := unix.Prlimit(cmd.Process.Pid, unix.RLIMIT_NOFILE, &orig, nil); err != nil && err != unix.ESRCH {
				t.Error(err)
			}
		}
	}
	defer restore()

	// The call's connection waits in the keeper's accept queue (connect
	// needs nothing of the keeper) while every accept fails.
	type result struct {
		entries, fds int
		err          error
	}
	answered := make(chan result, 1)
	go func() {
		n, fds, err := cl.Count()
		answered <- result{n, fds, err}
	}()
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(stderr.String(), "too many open files") {
		if time.Now().After(deadline) {
			t.Fatalf("no accept error logged with RLIMIT_NOFILE 0:\n%s", stderr.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
	// Several retries fail while starved; the kept listeners stay in
	// LISTEN through them (the kernel completes handshakes on its own).
	time.Sleep(300 * time.Millisecond)
	alive()
	for _, a := range addrs {
		if !connects(a) {
			t.Fatalf("kept listener %s closed while the keeper's accept failed\n%s", a, stderr.String())
		}
	}
	restore()

	select {
	case r := <-answered:
		if r.err != nil || r.entries != 1 || r.fds != 2 {
			t.Fatalf("call waiting through EMFILE: %d entries, %d fds, %v; want 1, 2\n%s", r.entries, r.fds, r.err, stderr.String())
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("call waiting through EMFILE not answered after the limit was restored\n%s", stderr.String())
	}
	alive()
	for _, a := range addrs {
		if !connects(a) {
			t.Fatalf("kept listener %s closed after the accept errors\n%s", a, stderr.String())
		}
	}
	if n, fds, err := cl.Count(); err != nil || n != 1 || fds != 2 {
		t.Fatalf("after recovery: %d entries, %d fds, %v; want 1, 2", n, fds, err)
	}
	// One log line for the episode, not one per retry.
	if n := strings.Count(stderr.String(), "too many open files"); n != 1 {
		t.Errorf("accept error logged %d times in one episode, want once:\n%s", n, stderr.String())
	}
	if !strings.Contains(stderr.String(), "accepting again") {
		t.Errorf("recovery not logged:\n%s", stderr.String())
	}
	t.Logf("keeper child's log:\n%s", stderr.String())
}
