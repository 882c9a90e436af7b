package tunnel

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/ambit-mesh/ambit/internal/testenv"
)

// clientWatch on its own, on loopback (no netns): what counts as a
// client gone, that nothing of the client's bytes is consumed, and what
// arming and stopping it costs a quick dial. The tests through real pods
// are in clientgone_test.go.

// pair is an accepted connection (the agent's side) and its client.
func pair(t testing.TB) (server, client *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return dialAccept(t, ln)
}

func TestClientWatch(t *testing.T) {
	for _, tc := range []struct {
		name   string
		client func(c *net.TCPConn)
		gone   bool
		unread string // what the agent's side must still read after stop
	}{
		{"reset", func(c *net.TCPConn) { c.SetLinger(0); c.Close() }, true, ""},
		{"closed before a byte", func(c *net.TCPConn) { c.Close() }, true, ""},
		{"half-closed before a byte", func(c *net.TCPConn) { c.CloseWrite() }, true, ""},
		{"request then half-closed", func(c *net.TCPConn) { c.Write([]byte("GET /")); c.CloseWrite() }, false, "GET /"},
		{"request then closed", func(c *net.TCPConn) { c.Write([]byte("GET /")); c.Close() }, false, "GET /"},
		{"request, waiting", func(c *net.TCPConn) { c.Write([]byte("GET /")) }, false, "GET /"},
		{"request then reset", func(c *net.TCPConn) {
			c.Write([]byte("GET /"))
			time.Sleep(20 * time.Millisecond) // the bytes in first
			c.SetLinger(0)
			c.Close()
		}, true, ""},
		{"connected, waiting", func(c *net.TCPConn) {}, false, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, early := range []bool{false, true} {
				// early: the client acts before the watch starts
				// (it is found when added to the epoll set); else
				// while it is in the set.
				s, c := pair(t)
				ctx, cancel := context.WithCancel(context.Background())
				if early {
					tc.client(c)
				}
				w := watchClient(s, cancel)
				time.Sleep(clientWatchDelay + 30*time.Millisecond)
				if !early {
					tc.client(c)
				}
				if tc.gone {
					select {
					case <-ctx.Done():
					case <-time.After(5 * time.Second):
						t.Fatalf("early=%v: the dial's context not cancelled 5 s after the client went away", early)
					}
				} else {
					time.Sleep(100 * time.Millisecond)
					if ctx.Err() != nil {
						t.Fatalf("early=%v: cancelled, but the client is still there", early)
					}
				}
				if gone := w.stop(); gone != tc.gone {
					t.Errorf("early=%v: stop says gone=%v, want %v", early, gone, tc.gone)
				}
				if tc.unread != "" {
					// The splice that follows reads everything the
					// client sent: the watch took nothing.
					buf := make([]byte, 64)
					s.SetReadDeadline(time.Now().Add(2 * time.Second))
					n, err := io.ReadAtLeast(s, buf, len(tc.unread))
					if string(buf[:n]) != tc.unread {
						t.Errorf("early=%v: read %q (%v) after stop, want %q", early, buf[:n], err, tc.unread)
					}
				}
			}
		})
	}
}

// TestClientWatchStopLeavesSocket: a watch stopped after it started
// leaves the socket as it found it: a read after stop waits for the
// client's data and gets it.
func TestClientWatchStopLeavesSocket(t *testing.T) {
	s, c := pair(t)
	w := watchClient(s, func() {})
	time.Sleep(clientWatchDelay + 30*time.Millisecond) // watched now
	if w.stop() {
		t.Fatal("stop says gone; the client is there")
	}
	go func() {
		time.Sleep(50 * time.Millisecond)
		c.Write([]byte("x"))
	}()
	var b [1]byte
	if _, err := s.Read(b[:]); err != nil {
		t.Fatalf("read after stop: %v", err)
	}
}

// TestClientWatchMetrics: an operator reads the watch from the agent's
// registry: a dial past its delay shows as a watched client and goes
// away when it ends, a client that leaves is counted gone, a set that
// cannot be made counts the dial unwatched, and a quick dial shows
// nowhere. There were no such series.
func TestClientWatchMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	newMetrics(reg)
	read := func(name string) float64 { return testenv.Metric(t, reg, "ambit_tunnel_client_watch_"+name, nil) }
	type counts struct{ active, started, gone, unavailable float64 }
	now := func() counts {
		return counts{read("active"), read("started_total"), read("gone_total"), read("unavailable_total")}
	}
	want := func(what string, c counts) {
		t.Helper()
		if got := now(); got != c {
			t.Fatalf("%s: %+v, want %+v", what, got, c)
		}
	}
	// The watch starts on a timer, and the watcher counts a client gone
	// just after it cancels the dial: both may lag on a busy machine.
	waitFor := func(what string, c counts) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for now() != c && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		want(what, c)
	}
	base := now()

	// A quick dial: armed and stopped within its delay (checked only
	// if it was: a busy machine may stall the test past the delay).
	s, _ := pair(t)
	start := time.Now()
	watchClient(s, func() {}).stop()
	if time.Since(start) < clientWatchDelay {
		want("after a quick dial", base)
	}
	base = now()

	// A slow dial whose client stays.
	s, _ = pair(t)
	w := watchClient(s, func() {})
	base.active++
	base.started++
	waitFor("during a slow dial", base)
	w.stop()
	base.active--
	want("after the slow dial", base)

	// A slow dial whose client resets.
	s, c := pair(t)
	ctx, cancel := context.WithCancel(context.Background())
	w = watchClient(s, cancel)
	base.active++
	base.started++
	waitFor("during the second slow dial", base)
	c.SetLinger(0)
	c.Close()
	select {
	case <-ctx.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the dial's context not cancelled 5 s after the client reset")
	}
	base.active--
	base.gone++
	waitFor("once the client reset", base)
	if !w.stop() {
		t.Error("stop says the client is there")
	}
	want("after its dial", base)

	// No set to watch in (a watcher not yet set up, as the process's
	// is before its first slow dial, with no descriptor to set it up):
	// the dial is counted unwatched.
	reg2 := prometheus.NewRegistry()
	cw := &clientWatcher{epfd: -1}
	registerClientWatch(reg2, cw)
	s, _ = pair(t)
	rc, err := s.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	withoutFDs(t, func() {
		_ = rc.Control(func(fd uintptr) { cw.add(&clientWatch{c: s, cancel: func() {}}, int(fd)) })
	})
	if n := testenv.Metric(t, reg2, "ambit_tunnel_client_watch_unavailable_total", nil); n != 1 {
		t.Errorf("unavailable_total %v after a slow dial with no descriptor for the set, want 1", n)
	}
	if n := testenv.Metric(t, reg2, "ambit_tunnel_client_watch_active", nil); n != 0 {
		t.Errorf("active %v with no set, want 0", n)
	}
}

// TestClientWatcherStartsAfterEMFILE: the epoll set is created at the
// process's first slow dial, and a flood of clients towards a black hole
// (every one a slow dial) is when the agent is likeliest to be out of
// descriptors. A set that could not be created then must be created at
// a later watch, once descriptors are back: it was tried once
// (sync.Once), and every dial of the process ran its course from then
// on, its client gone or not.
func TestClientWatcherStartsAfterEMFILE(t *testing.T) {
	s, c := pair(t)
	rc, err := s.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	cw := &clientWatcher{epfd: -1} // not the process's: one not yet set up
	ctx, cancel := context.WithCancel(context.Background())
	w := &clientWatch{c: s, cancel: cancel}
	add := func() bool {
		_ = rc.Control(func(fd uintptr) { cw.add(w, int(fd)) })
		cw.mu.Lock()
		defer cw.mu.Unlock()
		return w.reg
	}

	var reg bool
	withoutFDs(t, func() { reg = add() })
	if reg {
		t.Fatal("watched while the process had no descriptor left: the test did not exhaust them")
	}
	if !add() {
		t.Fatal("not watched once descriptors were back: the failed set-up was not tried again")
	}
	c.SetLinger(0)
	c.Close()
	select {
	case <-ctx.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the dial's context not cancelled 5 s after the client reset")
	}
	cw.remove(w)
}

// withoutFDs runs f with every descriptor the process may open in use
// (RLIMIT_NOFILE lowered to just above those open, the rest filled),
// then gives them back.
func withoutFDs(t *testing.T, f func()) {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("no /proc/self/fd: %v", err)
	}
	top := 0
	for _, e := range ents {
		if n, err := strconv.Atoi(e.Name()); err == nil && n > top {
			top = n
		}
	}
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	low := lim
	low.Cur = uint64(top + 16)
	if low.Cur >= lim.Cur {
		t.Skipf("RLIMIT_NOFILE %d already near the %d descriptors open", lim.Cur, top)
	}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &low); err != nil {
		t.Fatal(err)
	}
	var fds []int
	defer func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			t.Fatal(err)
		}
	}()
	for {
		fd, err := unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if errors.Is(err, unix.EMFILE) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		fds = append(fds, fd)
	}
	f()
}

// BenchmarkClientWatch: what a quick dial pays (the watch armed and
// stopped before its delay), against nothing.
func BenchmarkClientWatch(b *testing.B) {
	s, _ := pair(b)
	b.Run("none", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			ctx, cancel := context.WithCancel(context.Background())
			_ = ctx
			cancel()
		}
	})
	b.Run("armed-stopped", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			ctx, cancel := context.WithCancel(context.Background())
			_ = ctx
			w := watchClient(s, cancel)
			w.stop()
			cancel()
		}
	})
	b.Run("armed-stopped-during", func(b *testing.B) {
		// As the dials use it (watchDuring): armed-stopped with the
		// deferred stop that ends a watch on a panic too.
		var sink error
		for i := 0; i < b.N; i++ {
			ctx, cancel := context.WithCancel(context.Background())
			watchDuring(s, cancel, func() { sink = ctx.Err() })
			cancel()
		}
		_ = sink
	})
	b.Run("started-stopped", func(b *testing.B) {
		// A slow dial's watch without the wait: the client's socket
		// added to the epoll set (run, called here rather than by the
		// timer), then removed.
		for i := 0; i < b.N; i++ {
			w := clientWatches.Get().(*clientWatch)
			w.c, w.cancel = s, func() {}
			w.state.Store(watchIdle)
			w.run()
			if !w.reg {
				b.Fatal("not registered")
			}
			w.stop()
		}
	})
}
