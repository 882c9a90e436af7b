package tunnel

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/tunnel/hbone"
)

// smallSendNet is loopNet with a small send buffer (16 KiB asked, the
// kernel doubles it), set before connect: the pool's socket fills fast
// when its peer stops reading.
type smallSendNet struct{ dials atomic.Int32 }

func (n *smallSendNet) Dial(ctx context.Context, _ netip.Addr, dst netip.AddrPort) (net.Conn, error) {
	n.dials.Add(1)
	d := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		if err := rc.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUF, 16<<10)
		}); err != nil {
			return err
		}
		return serr
	}}
	return d.DialContext(ctx, "tcp", dst.String())
}

// heldReads holds a socket's reads while closed: the peer's agent alive
// but not draining its socket. A read under way when it closes keeps
// what it took until it opens.
type heldReads struct {
	net.Conn
	mu   sync.Mutex
	open chan struct{}
}

func (h *heldReads) wait() {
	h.mu.Lock()
	ch := h.open
	h.mu.Unlock()
	<-ch
}

func (h *heldReads) Read(p []byte) (int, error) {
	h.wait()
	n, err := h.Conn.Read(p)
	h.wait()
	return n, err
}

// gatedListener is a loopback listener, closed with the test, and an
// open read gate for the connection it will accept, released with the
// test.
func gatedListener(t *testing.T) (net.Listener, *heldReads) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	gate := &heldReads{open: make(chan struct{})}
	close(gate.open)
	t.Cleanup(gate.release)
	return ln, gate
}

func (h *heldReads) hold() {
	h.mu.Lock()
	h.open = make(chan struct{})
	h.mu.Unlock()
}

func (h *heldReads) release() {
	h.mu.Lock()
	defer h.mu.Unlock()
	select {
	case <-h.open:
	default:
		close(h.open)
	}
}

// TestPoolOpensBesideAStalledConnection: node A's pool has one HBONE
// connection to B carrying an upload; B's agent is alive but stops
// reading its socket, so A's writer blocks in write(2) on a full socket,
// holding the connection's write lock. New streams to B (three at once)
// must not be put on that connection: they share one new dial and each
// carries a round trip while the first connection is still stalled.
// Once B reads again, the upload completes on the connection it began
// on, which was never closed for being slow.
//
// Before, the pool picked the stalled connection (it had room): each
// open waited for the write lock until its connect timeout (2 min here)
// and failed as connect_timeout, though a fresh dial to B worked at
// once.
func TestPoolOpensBesideAStalledConnection(t *testing.T) {
	p, _, _ := newTestProxy(t, Config{Directory: noDirectory{}, Certificates: testPeerCerts(t),
		PoolIdleTimeout: time.Hour,
		// Long, so that a stream put on the stalled connection hangs
		// the test rather than fail in a time the test would judge.
		ConnectTimeout: 2 * time.Minute,
		// Windows far larger than the sockets: the socket fills before
		// flow control stops the writer. No keepalive: the held peer
		// answers no PING, and the test is not about keepalive.
		HBONE: hbone.Config{StreamWindow: 64 << 20, ConnWindow: 64 << 20, PingInterval: -1}})

	// B: our HBONE server. Its first connection's reads go through a
	// gate; "upload" streams are counted, others echoed. (Its receive
	// buffer is left to the kernel: with SO_RCVBUF at 16 KiB, the
	// upload sometimes took 100 s to resume once B read again, the
	// loopback's 64 KiB segments not fitting the buffer.)
	ln, gate := gatedListener(t)
	uploaded := make(chan int64, 1)
	handler := uploadOrEcho(uploaded)
	var accepted atomic.Int32
	go func() {
		for {
			raw, err := ln.Accept()
			if err != nil {
				return
			}
			var nc net.Conn = raw
			if accepted.Add(1) == 1 {
				gate.Conn = raw
				nc = gate
			}
			serveB(t, p, nc, handler)
		}
	}()
	key := poolKey{src: idClient, dst: idServer, addr: netip.MustParseAddrPort(ln.Addr().String())}

	n := &smallSendNet{}
	pl := newPool(p, n)
	defer pl.close()
	open := func(authority string) (*hbone.Stream, error) {
		ctx, cancel := context.WithTimeout(context.Background(), p.connectTimeout)
		defer cancel()
		return openAnswered(ctx, pl, key, authority)
	}

	up, err := open("upload")
	if err != nil {
		t.Fatal(err)
	}
	pl.mu.Lock()
	first := pl.m[key].conns[0].Conn
	pl.mu.Unlock()
	t0 := time.Now()
	gate.hold()
	const total = 16 << 20
	wrote := make(chan error, 1)
	go func() {
		b := make([]byte, 256<<10)
		for n := 0; n < total; n += len(b) {
			if _, err := up.Write(b); err != nil {
				wrote <- err
				return
			}
		}
		wrote <- up.CloseWrite()
	}()
	for end := time.Now().Add(time.Minute); !first.WriteStalled(time.Now()); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatal("the upload's writer never stalled: the test did not set up its case")
		}
	}

	t.Logf("%v: the upload's writer stalled", time.Since(t0))
	const openers = 3
	var wg sync.WaitGroup
	errs := make(chan error, openers)
	for i := 0; i < openers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := open("echo")
			if err != nil {
				errs <- err
				return
			}
			defer s.Close()
			if _, err := s.Write([]byte("ping")); err != nil {
				errs <- err
				return
			}
			b := make([]byte, 4)
			if _, err := io.ReadFull(s, b); err != nil || string(b) != "ping" {
				errs <- fmt.Errorf("echo %q: %v", b, err)
				return
			}
			errs <- nil
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Errorf("a new stream while the pooled connection's writer is stalled: %v", err)
		}
	}
	if !first.WriteStalled(time.Now()) {
		t.Fatal("the first connection drained meanwhile: the new streams' round trips prove nothing")
	}
	if got := n.dials.Load(); got != 2 {
		t.Errorf("%d dials, want 2: the first connection, then one shared by the %d openers", got, openers)
	}

	t.Logf("%v: the new streams' round trips done", time.Since(t0))
	gate.release()
	if err := <-wrote; err != nil {
		t.Fatalf("the upload on the stalled connection: %v", err)
	}
	t.Logf("%v: the upload written", time.Since(t0))
	if got := <-uploaded; got != total {
		t.Fatalf("B received %d bytes of the upload, want %d", got, total)
	}
	if err := first.Err(); err != nil {
		t.Fatalf("the slow connection was closed: %v", err)
	}
}

// uploadOrEcho is B's handler in the stall tests: an "upload" stream is
// read to its end (its length sent on uploaded, if not nil), any other
// echoed.
func uploadOrEcho(uploaded chan<- int64) func(*hbone.Stream) {
	return func(s *hbone.Stream) {
		s.Respond(200, nil)
		if s.Request.Authority == "upload" {
			n, _ := io.Copy(io.Discard, s)
			if uploaded != nil {
				uploaded <- n
			}
			return
		}
		io.Copy(s, s)
		s.CloseWrite()
	}
}

// serveB runs p's HBONE server, as B, on nc (a connection B accepted,
// possibly behind a read gate), closed when the test ends.
func serveB(t *testing.T, p *Proxy, nc net.Conn, handler func(*hbone.Stream)) {
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		hc, err := hbone.Server(ctx, nc, p.serverTLS(idServer, &peerState{}), p.hcfg, nil, handler)
		if err != nil {
			t.Errorf("B's handshake: %v", err)
			return
		}
		t.Cleanup(func() { hc.Close() })
	}()
}

// openAnswered opens a stream to authority through pl and waits for its
// 200.
func openAnswered(ctx context.Context, pl *pool, key poolKey, authority string) (*hbone.Stream, error) {
	s, _, err := pl.open(ctx, key, authority, nil, nil)
	if err != nil {
		return nil, err
	}
	if st, _, err := s.Response(context.Background()); err != nil || st != 200 {
		s.Close()
		return nil, fmt.Errorf("response %d: %v", st, err)
	}
	return s, nil
}
