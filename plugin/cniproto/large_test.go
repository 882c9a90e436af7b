package cniproto

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/plugin/cniproto/cniprototest"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"golang.org/x/sys/unix"
)

// sandboxIDs returns n distinct containerd-style sandbox IDs (64 hex).
func sandboxIDs(n int) []Attachment {
	out := make([]Attachment, n)
	for i := range out {
		b := make([]byte, 32)
		rand.Read(b)
		out[i] = Attachment{ContainerID: hex.EncodeToString(b), IfName: "eth0"}
	}
	return out
}

func gcRequest(valid []Attachment) *Request {
	return &Request{Version: GCVersion, Op: OpGC, Valid: valid}
}

// recorder serves and keeps the last request it was handed.
type recorder struct {
	mu   sync.Mutex
	last *Request
	n    int
}

func (r *recorder) handle(_ context.Context, req *Request, netns *os.File) *Response {
	if netns != nil {
		netns.Close()
	}
	r.mu.Lock()
	r.last, r.n = req, r.n+1
	r.mu.Unlock()
	return &Response{Decision: Skip}
}

// rawExchange sends b as one datagram (send buffer raised as Call would)
// and returns the server's decoded answer.
func rawExchange(t *testing.T, path string, b []byte) *Response {
	t.Helper()
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if rc, err := c.SyscallConn(); err == nil {
		rc.Control(func(fd uintptr) { growSendBuffer(int(fd), len(b)) })
	}
	if _, err := c.Write(b); err != nil {
		t.Fatalf("writing %d bytes: %v", len(b), err)
	}
	buf := make([]byte, MaxMessageSize+1)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("reading the answer: %v", err)
	}
	resp, err := DecodeResponse(buf[:n])
	if err != nil {
		t.Fatalf("answer: %v", err)
	}
	return resp
}

func TestLargeGCRoundTrip(t *testing.T) {
	testenv.RequireRoot(t) // SO_SNDBUFFORCE, as the plugin has it
	rec := &recorder{}
	path := serve(t, rec.handle)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, n := range []int{1, 700, MaxAttachments} {
		want := sandboxIDs(n)
		req := gcRequest(want)
		b, err := encodeRequest(req)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := Call(ctx, path, req, nil)
		if err != nil || resp.Error != "" || resp.Decision != Skip {
			t.Fatalf("gc of %d attachments (%d bytes): %+v, %v", n, len(b), resp, err)
		}
		rec.mu.Lock()
		got := rec.last
		rec.mu.Unlock()
		if got.Op != OpGC || len(got.Valid) != n {
			t.Fatalf("agent got op %s with %d attachments, want gc with %d", got.Op, len(got.Valid), n)
		}
		for i := range want {
			if got.Valid[i] != want[i] {
				t.Fatalf("attachment %d: got %+v, want %+v", i, got.Valid[i], want[i])
			}
		}
		t.Logf("gc of %d attachments: %d bytes, round trip intact", n, len(b))
		if n == 700 && len(b) <= MaxMessageSize {
			t.Fatalf("700 attachments encode to %d bytes: no longer over the old 64 KiB bound, the case tests nothing", len(b))
		}
	}
}

func TestRequestSizeLimits(t *testing.T) {
	testenv.RequireRoot(t)
	rec := &recorder{}
	path := serve(t, rec.handle)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	// The plugin never builds a gc request over MaxRequestSize: 4096
	// attachments of the longest allowed ID do not fit.
	long := make([]Attachment, MaxAttachments)
	for i := range long {
		long[i] = Attachment{ContainerID: fmt.Sprintf("%0256d", i), IfName: "eth0"}
	}
	_, err := Call(ctx, path, gcRequest(long), nil)
	if err == nil || !strings.Contains(err.Error(), "gc request listing 4096 attachments") || !strings.Contains(err.Error(), "exceeds the 1048576 byte limit") {
		t.Fatalf("oversized gc: %v", err)
	}

	// A peer that sends one anyway (MaxRequestSize+1 bytes) is refused
	// before the agent reads it.
	resp := rawExchange(t, path, []byte(strings.Repeat(" ", MaxRequestSize+1)))
	if want := "request exceeds 1048576 bytes (it has 1048577)"; resp.Error != want {
		t.Fatalf("1 MiB+1 request: %q, want %q", resp.Error, want)
	}

	// An add padded beyond 64 KiB: the larger bound is for gc only.
	add, _ := json.Marshal(goodRequest())
	padded := append(add[:len(add)-1:len(add)-1], []byte(strings.Repeat(" ", MaxMessageSize)+"}")...)
	resp = rawExchange(t, path, padded)
	if want := fmt.Sprintf(`"add" request of %d bytes exceeds the 65536 byte limit`, len(padded)); !strings.HasPrefix(resp.Error, want) {
		t.Fatalf("padded add: %q, want %q", resp.Error, want)
	}
	// The same add within 64 KiB is served (the padding is legal JSON).
	small := append(add[:len(add)-1:len(add)-1], []byte(strings.Repeat(" ", 1000)+"}")...)
	if resp = rawExchange(t, path, small); !strings.Contains(resp.Error, "no netns file descriptor") {
		t.Fatalf("small padded add (no fd) got %+v, want the missing-netns refusal", resp)
	}

	// A gc just over the old 64 KiB bound is read whole.
	gc, _ := json.Marshal(gcRequest(sandboxIDs(1)))
	over := append(gc[:len(gc)-1:len(gc)-1], []byte(strings.Repeat(" ", MaxMessageSize+1-len(gc)+1)+"}")...)
	if resp = rawExchange(t, path, over); resp.Error != "" || resp.Decision != Skip {
		t.Fatalf("gc of %d bytes: %+v", len(over), resp)
	}
	if len(over) != MaxMessageSize+2 {
		t.Fatalf("test bug: gc of %d bytes", len(over))
	}
}

// TestServerSizesBufferFromPeek: small requests do not each cost a
// MaxRequestSize buffer. 64 requests with a 1 MiB buffer each would
// allocate 64 MiB; sized from the peek they cost ~64 KiB each (the
// client's response buffer) plus a few KiB.
func TestServerSizesBufferFromPeek(t *testing.T) {
	rec := &recorder{}
	path := serve(t, rec.handle)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req := goodRequest()
	req.Op = OpDel
	if _, err := Call(ctx, path, req, nil); err != nil { // warm up
		t.Fatal(err)
	}
	const calls = 64
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range calls {
		if resp, err := Call(ctx, path, req, nil); err != nil || resp.Decision != Skip {
			t.Fatalf("del: %+v %v", resp, err)
		}
	}
	runtime.ReadMemStats(&after)
	per := (after.TotalAlloc - before.TotalAlloc) / calls
	t.Logf("%d bytes allocated per exchange (client and server)", per)
	if per > 256<<10 {
		t.Fatalf("%d bytes allocated per small exchange: the server does not size its buffer from the datagram", per)
	}
}

// TestOldAgentRefusal: an agent from before MaxRequestSize reads into a
// 64 KiB buffer and refuses a large gc; the plugin's error says why.
func TestOldAgentRefusal(t *testing.T) {
	testenv.RequireRoot(t)
	path := filepath.Join(t.TempDir(), "old.sock")
	cniprototest.Serve(t, path, cniprototest.OldAgent)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := Call(ctx, path, gcRequest(sandboxIDs(1000)), nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"request exceeds 65536 bytes", "lists 1000 attachments", "older than this ambit-cni", "agent and plugin versions differ", "upgrade ambit-agent"} {
		if !strings.Contains(resp.Error, want) {
			t.Errorf("old agent's refusal %q lacks %q", resp.Error, want)
		}
	}
	// A small gc still works against the old agent, untouched.
	if resp, err = Call(ctx, path, gcRequest(sandboxIDs(10)), nil); err != nil || resp.Error != "" {
		t.Fatalf("small gc to the old agent: %+v %v", resp, err)
	}
}

// TestSendBufferTooSmall: without raising the send buffer the kernel
// refuses a datagram larger than it (EMSGSIZE), and the error names the
// attachments; raising it lets the same datagram through.
func TestSendBufferTooSmall(t *testing.T) {
	testenv.RequireRoot(t)
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conns := make([]*net.UnixConn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "pair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		conns[i] = c.(*net.UnixConn)
		defer c.Close()
	}
	// 64 KiB asked, 128 KiB granted: whatever this host's wmem_default.
	rc, _ := conns[0].SyscallConn()
	rc.Control(func(fd uintptr) { unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF, 64<<10) })
	req := gcRequest(sandboxIDs(3000))
	b, err := encodeRequest(req)
	if err != nil {
		t.Fatal(err)
	}
	rc.Control(func(fd uintptr) { err = send(int(fd), req, b, nil, false, retryEINTR) })
	if err == nil || !strings.Contains(err.Error(), "(3000 attachments) does not fit this socket's 131072-byte send buffer") {
		t.Fatalf("send without growing: %v", err)
	}
	rc.Control(func(fd uintptr) { err = send(int(fd), req, b, nil, true, retryEINTR) })
	if err != nil {
		t.Fatalf("send after growing: %v", err)
	}
	buf := make([]byte, len(b)+1)
	conns[1].SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := conns[1].Read(buf)
	if err != nil || n != len(b) {
		t.Fatalf("peer read %d of %d bytes: %v", n, len(b), err)
	}
}

// TestServerWaitsForTheDatagram: the size peek waits in the poller (a
// plugin that writes late is served) and the exchange deadline ends the
// wait for one that never writes.
func TestServerWaitsForTheDatagram(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cni.sock")
	l, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	errs := make(chan error, 4)
	rec := &recorder{}
	srv := &Server{Handler: rec.handle, Timeout: 300 * time.Millisecond, OnError: func(err error) { errs <- err }}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { srv.Serve(ctx, l); close(done) }()
	defer func() { cancel(); <-done }()

	dial := func() *net.UnixConn {
		c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	late := dial()
	defer late.Close()
	time.Sleep(100 * time.Millisecond)
	b, _ := encodeRequest(gcRequest(sandboxIDs(3)))
	late.Write(b)
	late.SetReadDeadline(time.Now().Add(2 * time.Second))
	buf := make([]byte, MaxMessageSize)
	n, err := late.Read(buf)
	if err != nil {
		t.Fatalf("late writer: %v", err)
	}
	if resp, err := DecodeResponse(buf[:n]); err != nil || resp.Decision != Skip {
		t.Fatalf("late writer: %+v %v", resp, err)
	}

	silent := dial()
	defer silent.Close()
	select {
	case err := <-errs:
		if !strings.Contains(err.Error(), "reading plugin request") || !strings.Contains(err.Error(), "timeout") {
			t.Fatalf("silent plugin: %v", err)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("the exchange deadline did not end the wait for a silent plugin")
	}
}

// retryEINTR runs f again while a signal interrupts it (send's call
// without a deadline).
func retryEINTR(f func() error) error {
	for {
		if err := f(); err != unix.EINTR {
			return err
		}
	}
}
