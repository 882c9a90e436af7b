package tunnel_test

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/tunnel"
	"github.com/ambit-mesh/ambit/tunnel/internal/meshtest"
)

// peerEcho serves: first line from the client is a command.
//
//	"who"          → replies the peer's IP and closes
//	"sink"         → reads to EOF, replies "<n> <sha256>" and closes
//	"echo"         → echoes until EOF, then closes
func peerEcho(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			r := bufio.NewReaderSize(c, 64<<10)
			cmd, err := r.ReadString('\n')
			if err != nil {
				return
			}
			switch strings.TrimSpace(cmd) {
			case "who":
				ap := netip.MustParseAddrPort(c.RemoteAddr().String())
				fmt.Fprintf(c, "%s\n", ap.Addr().Unmap())
			case "sink":
				h := sha256.New()
				n, _ := io.Copy(h, r)
				fmt.Fprintf(c, "%d %x\n", n, h.Sum(nil))
			case "echo":
				io.Copy(c, r)
			}
		}()
	}
}

func ask(t *testing.T, c net.Conn, cmd string) string {
	t.Helper()
	if _, err := fmt.Fprintf(c, "%s\n", cmd); err != nil {
		t.Fatal(err)
	}
	c.(*net.TCPConn).CloseWrite()
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("%s: %v", cmd, err)
	}
	return strings.TrimSpace(string(b))
}

func newMesh(t *testing.T) *meshtest.Mesh {
	testenv.RequireRoot(t)
	m := meshtest.New(t, meshtest.Options{})
	go peerEcho(m.B.Listen(t, "[::]:8080"))
	return m
}

// TestHBONEOriginalSource: A's app reaches B's app through HBONE (v4 and
// v6); B's app sees A's pod IP; both agents count the connection with
// identities.
func TestHBONEOriginalSource(t *testing.T) {
	m := newMesh(t)
	for _, dst := range []netip.Addr{m.B.Pod.IP4, m.B.Pod.IP6} {
		c, err := m.A.Dial(netip.AddrPortFrom(dst, 8080))
		if err != nil {
			t.Fatal(err)
		}
		got := ask(t, c, "who")
		c.Close()
		want := m.A.Pod.IP4.String()
		if dst.Is6() {
			want = m.A.Pod.IP6.String()
		}
		if got != want {
			t.Errorf("to %v: app saw peer %q, want A's pod IP %s", dst, got, want)
		}
	}
	waitMetric(t, m.B, "ambit_tunnel_connections_closed_total", map[string]string{"direction": "inbound", "mode": "hbone",
		"src_identity": m.A.Workload.Identity, "dst_identity": m.B.Workload.Identity}, 2)
	waitMetric(t, m.A, "ambit_tunnel_connections_closed_total", map[string]string{"direction": "outbound", "mode": "hbone",
		"src_identity": m.A.Workload.Identity, "dst_identity": m.B.Workload.Identity}, 2)
	if n := m.A.Metric(t, "ambit_tunnel_hbone_pool_connections", nil); n != 2 {
		// one pooled connection per destination address (v4 and v6)
		t.Errorf("pool holds %v connections, want 2", n)
	}
}

func waitMetric(t *testing.T, n *meshtest.Node, name string, match map[string]string, want float64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	var got float64
	for time.Now().Before(deadline) {
		if got = n.Metric(t, name, match); got == want {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Errorf("%s%v = %v, want %v", name, match, got, want)
}

// TestHBONEGigabyte: 1 GiB arrives intact (sha256), then the half-closed
// client still gets the server's answer.
func TestHBONEGigabyte(t *testing.T) {
	m := newMesh(t)
	size := int64(1 << 30)
	if testing.Short() {
		size = 64 << 20
	}
	c, err := m.A.Dial(netip.AddrPortFrom(m.B.Pod.IP4, 8080))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "sink\n")
	h := sha256.New()
	block := make([]byte, 1<<20)
	rand.Read(block)
	for sent := int64(0); sent < size; sent += int64(len(block)) {
		// vary the content per block so reordering would show
		block[0], block[1] = byte(sent>>20), byte(sent>>28)
		h.Write(block)
		if _, err := c.Write(block); err != nil {
			t.Fatal(err)
		}
	}
	c.(*net.TCPConn).CloseWrite() // half-close: FIN → END_STREAM → FIN
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("%d %x", size, h.Sum(nil))
	if got := strings.TrimSpace(string(b)); got != want {
		t.Fatalf("server got %q, want %q", got, want)
	}
	c.Close()
	// Byte counters: B's agent delivered every byte to its app.
	waitMetric(t, m.B, "ambit_tunnel_received_bytes_total", map[string]string{"direction": "inbound", "mode": "hbone"}, float64(size+5))
}

// TestHalfCloseBothWays: the server app half-closes first and keeps
// reading; the client keeps writing after seeing EOF.
func TestHalfCloseBothWays(t *testing.T) {
	m := newMesh(t)
	ln := m.B.Listen(t, "[::]:8081")
	done := make(chan string, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.Write([]byte("bye-first\n"))
		c.(*net.TCPConn).CloseWrite()
		b, _ := io.ReadAll(c)
		done <- string(b)
	}()
	c, err := m.A.Dial(netip.AddrPortFrom(m.B.Pod.IP4, 8081))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	b, err := io.ReadAll(c)
	if err != nil || string(b) != "bye-first\n" {
		t.Fatalf("client read %q, %v", b, err)
	}
	c.Write([]byte("after-your-fin"))
	c.(*net.TCPConn).CloseWrite()
	select {
	case got := <-done:
		if got != "after-your-fin" {
			t.Errorf("server read %q after its own FIN", got)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("server never saw the client's FIN")
	}
}

// TestResetCarried: an app RST on one side arrives as a reset (not a
// clean EOF) on the other.
func TestResetCarried(t *testing.T) {
	m := newMesh(t)
	ln := m.B.Listen(t, "[::]:8082")
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		bufio.NewReader(c).ReadString('\n')
		c.(*net.TCPConn).SetLinger(0)
		c.Close() // RST
	}()
	c, err := m.A.Dial(netip.AddrPortFrom(m.B.Pod.IP4, 8082))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("go\n"))
	_, err = io.ReadAll(c)
	if err == nil || !errors.Is(err, errConnReset) && !strings.Contains(err.Error(), "reset") {
		t.Errorf("client read ended with %v, want a connection reset", err)
	}
}

var errConnReset = errors.New("connection reset by peer")

// Test1000Connections: 1,000 concurrent connections through the tunnel,
// each with its own round trip, all succeed on a handful of pooled
// connections.
func Test1000Connections(t *testing.T) {
	m := newMesh(t)
	const N = 1000
	var wg sync.WaitGroup
	errs := make(chan error, N)
	start := make(chan struct{})
	conns := make([]net.Conn, N)
	// Open all first (held concurrently), then talk on all.
	for i := 0; i < N; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			<-start
			c, err := m.A.Dial(netip.AddrPortFrom(m.B.Pod.IP4, 8080))
			if err != nil {
				errs <- err
				return
			}
			conns[i] = c
			msg := fmt.Sprintf("conn-%d", i)
			fmt.Fprintf(c, "echo\n%s", msg)
			buf := make([]byte, len(msg))
			if _, err := io.ReadFull(c, buf); err != nil {
				errs <- fmt.Errorf("conn %d: %w", i, err)
				return
			}
			if string(buf) != msg {
				errs <- fmt.Errorf("conn %d got %q", i, buf)
			}
		}(i)
	}
	close(start)
	wg.Wait()
	close(errs)
	failed := 0
	for err := range errs {
		if failed < 5 {
			t.Error(err)
		}
		failed++
	}
	if failed > 0 {
		t.Fatalf("%d of %d connections failed", failed, N)
	}
	active := m.B.Metric(t, "ambit_tunnel_active_connections", map[string]string{"direction": "inbound"})
	if active != N {
		t.Errorf("B's agent has %v active inbound connections, want %d open at once", active, N)
	}
	pooled := m.A.Metric(t, "ambit_tunnel_hbone_pool_connections", nil)
	if pooled < N/100 || pooled > N/100+3 {
		t.Errorf("%v pooled HBONE connections for %d streams, want about %d (100 streams each)", pooled, N, N/100)
	}
	for _, c := range conns {
		if c != nil {
			c.Close()
		}
	}
	waitMetric(t, m.B, "ambit_tunnel_active_connections", map[string]string{"direction": "inbound"}, 0)
	_ = bytes.MinRead
	_ = tunnel.Verdict{}
}

// TestSelfCallRefused: a connection straight to the agent's outbound
// port (not redirected, so it has no original destination, or names the
// agent itself) is refused with a reset, never looped.
func TestSelfCallRefused(t *testing.T) {
	m := newMesh(t)
	accepted := 0
	for _, dst := range []netip.AddrPort{
		netip.MustParseAddrPort("127.0.0.1:15001"),
		netip.AddrPortFrom(m.A.Pod.IP4, 15001),
	} {
		var c net.Conn
		var derr error
		m.A.Pod.Do(t, func() error { c, derr = net.Dial("tcp", dst.String()); return nil })
		if derr != nil {
			continue // reset before connect() returned
		}
		accepted++
		fmt.Fprintf(c, "who\n")
		b, err := io.ReadAll(c)
		c.Close()
		// Usually ECONNRESET; a write that already consumed the reset
		// leaves a plain EOF. Either way: nothing comes back.
		if len(b) > 0 {
			t.Errorf("to %v: got %q, %v; want a reset", dst, b, err)
		}
	}
	// Both reached the agent and were refused by it (a loopback connect
	// may even see the reset before connect() returns).
	var got float64
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		got = m.A.Metric(t, "ambit_tunnel_connections_failed_total", map[string]string{"direction": "outbound", "reason": "no_original_dst"}) +
			m.A.Metric(t, "ambit_tunnel_connections_failed_total", map[string]string{"direction": "outbound", "reason": "self_call"})
		if got == 2 {
			break
		}
	}
	if got != 2 {
		t.Errorf("%v self-calls counted, want 2", got)
	}
	_ = accepted
}

// TestPoolReuseAndIdleEviction: sequential connections share one pooled
// HBONE connection, which is closed once idle for the pool timeout.
func TestPoolReuseAndIdleEviction(t *testing.T) {
	testenv.RequireRoot(t)
	m := meshtest.New(t, meshtest.Options{Config: tunnel.Config{PoolIdleTimeout: 300 * time.Millisecond}})
	go peerEcho(m.B.Listen(t, "[::]:8080"))
	for i := 0; i < 5; i++ {
		c, err := m.A.Dial(netip.AddrPortFrom(m.B.Pod.IP4, 8080))
		if err != nil {
			t.Fatal(err)
		}
		if got := ask(t, c, "who"); got != m.A.Pod.IP4.String() {
			t.Fatalf("round %d: %q", i, got)
		}
		c.Close()
	}
	if n := m.B.Metric(t, "ambit_tunnel_connections_failed_total", nil); n != 0 {
		t.Errorf("%v failures", n)
	}
	opened := m.A.Metric(t, "ambit_tunnel_hbone_pool_connections", nil)
	if opened != 1 {
		t.Errorf("%v pooled connections for 5 sequential streams, want 1 (reused)", opened)
	}
	waitMetric(t, m.A, "ambit_tunnel_hbone_pool_connections", nil, 0)
}
