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

	"github.com/ambit-mesh/ambit/plugin/cniproto/cniprototest"
)

func serve(t testing.TB, h Handler) string {
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

// TestVersions: the agent answers in the request's version (a version 1
// plugin still on disk during an upgrade is served as before), a
// version 2 del brings the netns for the agent to clean and a version 1
// del never does, and a plugin refuses an answer in another version
// unless it is the agent's refusal of the request's.
func TestVersions(t *testing.T) {
	self, err := os.Open("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	defer self.Close()
	type seen struct {
		version int
		fd      bool
	}
	got := make(chan seen, 1)
	path := serve(t, func(ctx context.Context, req *Request, netns *os.File) *Response {
		got <- seen{req.Version, netns != nil}
		if netns != nil {
			netns.Close()
		}
		return &Response{Decision: Skip}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	for _, c := range []struct {
		version int
		op      Op
		wantFD  bool
	}{{1, OpAdd, true}, {2, OpAdd, true}, {3, OpAdd, true}, {1, OpDel, false}, {2, OpDel, true}, {3, OpDel, true}, {1, OpCheck, true}} {
		req := goodRequest()
		req.Version, req.Op = c.version, c.op
		if c.version >= NetworkVersion {
			req.Network = "k8s-pod-network"
		}
		resp, err := Call(ctx, path, req, self)
		if err != nil || resp.Version != c.version {
			t.Fatalf("v%d %s: %+v %v (want an answer in version %d)", c.version, c.op, resp, err, c.version)
		}
		if s := <-got; s.version != c.version || s.fd != c.wantFD {
			t.Errorf("v%d %s: agent saw %+v, want fd=%v", c.version, c.op, s, c.wantFD)
		}
	}

	// An agent that answers version 1 to a version 3 request: refused,
	// unless the answer is an error (an older agent's refusal, shown,
	// and recognised by AgentOlder).
	answer := make(chan string, 1)
	opath := filepath.Join(t.TempDir(), "o.sock")
	cniprototest.Serve(t, opath, func(c *net.UnixConn) {
		buf := make([]byte, 4096)
		c.Read(buf)
		c.Write([]byte(<-answer))
	})
	answer <- `{"version":1,"decision":"skip"}`
	if _, err := Call(ctx, opath, goodRequest(), self); err == nil || !strings.Contains(err.Error(), "answered a version 3 request in version 1") {
		t.Errorf("v1 skip to a v2 request: %v", err)
	}
	answer <- `{"version":2,"error":"protocol version 3 not supported (this side speaks 1 to 2)"}`
	if resp, err := Call(ctx, opath, goodRequest(), self); err != nil || !strings.Contains(resp.Error, "protocol version 3 not supported") || !AgentOlder(goodRequest(), resp) {
		t.Errorf("old agent's refusal: %+v %v (want one AgentOlder recognises)", resp, err)
	}
	// An error in the request's own version is the agent's answer, not
	// its age.
	answer <- `{"version":3,"error":"pod not known yet","retryable":true}`
	if resp, err := Call(ctx, opath, goodRequest(), self); err != nil || AgentOlder(goodRequest(), resp) {
		t.Errorf("current agent's error: %+v %v, taken for an older agent's", resp, err)
	}
}
