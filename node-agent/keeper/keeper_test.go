package keeper

import (
	"context"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func startKeeper(t testing.TB) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "keeper.sock")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	s := &Server{}
	go func() { done <- s.Serve(ctx, path) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	for i := 0; i < 200; i++ {
		if c, err := net.Dial("unixpacket", path); err == nil {
			c.Close()
			return path
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("keeper not listening")
	return ""
}

// connects reports whether a TCP handshake with addr completes.
func connects(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// A listener the agent closes (or loses with its process) stays in
// LISTEN while the keeper holds it: handshakes complete and wait in its
// queue. Drop, a newer generation's prune and PruneAll close it for real.
func TestKeptListenerOutlivesItsOwner(t *testing.T) {
	path := startKeeper(t)
	old, err := Dial(path)
	if err != nil {
		t.Fatal(err)
	}
	listen := func() (net.Listener, string) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		return l, l.Addr().String()
	}
	a, addrA := listen()
	b, addrB := listen()
	if err := old.Put("pod-a", a); err != nil {
		t.Fatal(err)
	}
	if err := old.Put("pod-b", b); err != nil {
		t.Fatal(err)
	}
	// The agent's own listener still accepts after Put (the dup left it
	// non-blocking: Close below returns, Accept is not stuck in a
	// blocking syscall).
	go func() { c, _ := net.Dial("tcp", addrA); c.Close() }()
	if c, err := a.Accept(); err != nil {
		t.Fatalf("own listener after Put: %v", err)
	} else {
		c.Close()
	}
	a.Close()
	b.Close()
	if !connects(addrA) || !connects(addrB) {
		t.Fatal("a kept listener refused a connection after its owner closed it")
	}
	if n, fds, err := old.Count(); err != nil || n != 2 || fds != 2 {
		t.Fatalf("Count = %d entries %d fds, %v; want 2, 2", n, fds, err)
	}
	if err := old.Drop("pod-a"); err != nil {
		t.Fatal(err)
	}
	if connects(addrA) {
		t.Fatal("dropped listener still accepts")
	}

	// A restarted agent: what it puts again is replaced, the rest goes
	// with PruneOlder.
	newer, err := Dial(path)
	if err != nil {
		t.Fatal(err)
	}
	c, addrC := listen()
	if err := newer.Put("pod-c", c); err != nil {
		t.Fatal(err)
	}
	if err := newer.PruneOlder(); err != nil {
		t.Fatal(err)
	}
	if connects(addrB) {
		t.Fatal("the previous agent's listener survived PruneOlder")
	}
	c.Close()
	if !connects(addrC) {
		t.Fatal("this agent's kept listener was pruned")
	}
	if n, _, _ := newer.Count(); n != 1 {
		t.Fatalf("%d entries after PruneOlder, want 1 (this agent's)", n)
	}
	if err := newer.PruneAll(); err != nil {
		t.Fatal(err)
	}
	if n, fds, _ := newer.Count(); n != 0 || fds != 0 {
		t.Fatalf("after PruneAll: %d entries, %d fds", n, fds)
	}
}

func TestKeeperRefusesWhatItCannotKeep(t *testing.T) {
	path := startKeeper(t)
	cl, err := Dial(path)
	if err != nil {
		t.Fatal(err)
	}
	// A connected socket is not a listener.
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	defer l.Close()
	conn, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := cl.Put("x", fakeListener{conn.(*net.TCPConn)}); err == nil || !strings.Contains(err.Error(), "only listening sockets") {
		t.Errorf("put of a connection: %v", err)
	}
	if _, err := cl.call(request{Op: "zap"}, nil); err == nil || !strings.Contains(err.Error(), "unknown op") {
		t.Errorf("unknown op: %v", err)
	}
	if err := cl.Put(strings.Repeat("k", maxKeyLen+1), l); err == nil || !strings.Contains(err.Error(), "key longer") {
		t.Errorf("long key: %v", err)
	}
	if n, fds, _ := cl.Count(); n != 0 || fds != 0 {
		t.Errorf("refused requests left %d entries, %d fds", n, fds)
	}
	if _, err := Dial(filepath.Join(t.TempDir(), "none.sock")); err == nil {
		t.Error("Dial of a missing keeper succeeded")
	}
}

// fakeListener lends a connection's descriptor to Put.
type fakeListener struct{ *net.TCPConn }

func (fakeListener) Accept() (net.Conn, error) { return nil, nil }
func (f fakeListener) Addr() net.Addr          { return f.LocalAddr() }
