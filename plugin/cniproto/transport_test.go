package cniproto

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func serve(t *testing.T, h Handler) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "run", "cni.sock")
	l, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { (&Server{Handler: h, Timeout: 2 * time.Second}).Serve(ctx, l); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return path
}

func TestCallPassesTheNetnsFD(t *testing.T) {
	self, err := os.Open("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	defer self.Close()
	var want, got unix.Stat_t
	unix.Fstat(int(self.Fd()), &want)
	path := serve(t, func(ctx context.Context, req *Request, netns *os.File) *Response {
		if netns == nil {
			return &Response{Error: "no fd"}
		}
		defer netns.Close()
		unix.Fstat(int(netns.Fd()), &got)
		return &Response{Decision: Skip}
	})
	st, _ := os.Stat(path)
	if st.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v, want 0600", st.Mode().Perm())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	resp, err := Call(ctx, path, goodRequest(), self)
	if err != nil || resp.Decision != Skip {
		t.Fatalf("Call: %+v, %v", resp, err)
	}
	if got.Ino != want.Ino || got.Dev != want.Dev {
		t.Fatalf("agent received another file (ino %d, want %d)", got.Ino, want.Ino)
	}
	// add without an fd is refused by the server with a clear error.
	resp, err = Call(ctx, path, goodRequest(), nil)
	if err != nil || !strings.Contains(resp.Error, "no netns file descriptor") {
		t.Fatalf("add without netns: %+v, %v", resp, err)
	}
}

func TestCallFailures(t *testing.T) {
	ctx := context.Background()
	_, err := Call(ctx, filepath.Join(t.TempDir(), "none.sock"), goodRequest(), nil)
	if !errors.Is(err, ErrAgentUnavailable) {
		t.Errorf("missing socket: %v, want ErrAgentUnavailable", err)
	}
	// A slow agent: the deadline ends the wait, and it is not "unavailable".
	path := serve(t, func(ctx context.Context, req *Request, netns *os.File) *Response {
		if netns != nil {
			netns.Close()
		}
		<-ctx.Done()
		return &Response{Decision: Skip}
	})
	req := goodRequest()
	req.Op = OpDel
	tctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	_, err = Call(tctx, path, req, nil)
	if err == nil || errors.Is(err, ErrAgentUnavailable) || !strings.Contains(err.Error(), "deadline") {
		t.Errorf("slow agent: %v", err)
	}
	// An agent answering garbage.
	gpath := filepath.Join(t.TempDir(), "g.sock")
	l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: gpath, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := l.AcceptUnix()
		if err != nil {
			return
		}
		buf := make([]byte, 1024)
		c.Read(buf)
		c.Write([]byte("HTTP/1.1 200 OK\r\n"))
		c.Close()
	}()
	_, err = Call(ctx, gpath, req, nil)
	if err == nil || !strings.Contains(err.Error(), "malformed agent response") {
		t.Errorf("garbage: %v", err)
	}
}
