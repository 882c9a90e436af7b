package testenv

import (
	"fmt"
	"io"
	"net"
	"runtime"
	"testing"

	"github.com/vishvananda/netns"
)

// ServeInNetns runs a TCP app on addr inside the named network namespace
// (as `ip netns` names it) until the test ends: each connection gets
// greeting and a newline, then then(c) (Echo or Drain), then is closed.
//
// It exists because the node agent's tests need an app behind a pod or
// a peer outside the mesh, reached through the agent's listeners, and
// each package had written its own. The greeting lets a test tell whose
// answer it got (the app's, "captured:<port>" from a capture); then says
// whether the bytes a test sends come back (Echo) or are only read, so
// the sender never blocks (Drain).
func ServeInNetns(t testing.TB, name, addr, greeting string, then func(net.Conn)) {
	t.Helper()
	l, err := listenInNetns(name, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				if _, err := fmt.Fprintf(c, "%s\n", greeting); err != nil {
					return
				}
				then(c)
			}()
		}
	}()
}

// Echo writes back what c reads until c fails or is closed. A loop of
// its own: io.Copy(c, c) would splice a socket into itself.
func Echo(c net.Conn) {
	buf := make([]byte, 4096)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// Drain reads c and discards it until c fails or is closed.
func Drain(c net.Conn) { io.Copy(io.Discard, c) }

// listenInNetns opens the listener from inside the netns: a socket stays
// in the netns it was made in, so once open it serves from any goroutine.
func listenInNetns(name, addr string) (l net.Listener, err error) {
	err = InNetns(name, func() error {
		l, err = net.Listen("tcp", addr)
		if err != nil {
			return fmt.Errorf("testenv: listening on %s in netns %q: %w", addr, name, err)
		}
		return nil
	})
	return l, err
}

// InNetns runs fn inside the named netns (RunInNetns).
func InNetns(name string, fn func() error) error {
	h, err := netns.GetFromName(name)
	if err != nil {
		return fmt.Errorf("testenv: netns %q: %w", name, err)
	}
	defer h.Close()
	return RunInNetns(h, fn)
}

// RunInNetns runs fn on a thread of its own moved into h and back, and
// returns fn's error (or why the thread could not get there); sockets fn
// opens stay in h. The thread is unlocked only once home: one that
// cannot return dies with its goroutine, and one that ends on the main
// thread would otherwise leave it parked in the netns, so
// /proc/self/ns/net would name that netns for the rest of the run.
func RunInNetns(h netns.NsHandle, fn func() error) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			done <- fmt.Errorf("testenv: current netns: %w", err)
			return
		}
		defer orig.Close()
		if err := netns.Set(h); err != nil {
			done <- fmt.Errorf("testenv: entering netns %v: %w", h, err)
			return
		}
		err = fn()
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
		done <- err
	}()
	return <-done
}
