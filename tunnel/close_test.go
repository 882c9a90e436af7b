package tunnel_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/tunnel"
	"github.com/ambit-mesh/ambit/tunnel/internal/meshtest"
)

// holdListener hands out a connection it accepted only once Close has
// been called on it. In the agent the same thing happens in a window of
// microseconds: the accept loop has taken a connection from the kernel
// and not yet counted it when Serving.Close closes the listener. The
// listener underneath is the pod's real one; holding widens the window so
// a test can hit it every time.
type holdListener struct {
	net.Listener
	held      chan struct{} // closed once a connection is accepted and held
	closed    chan struct{}
	heldOnce  sync.Once
	closeOnce sync.Once
}

func newHoldListener(ln net.Listener) *holdListener {
	return &holdListener{Listener: ln, held: make(chan struct{}), closed: make(chan struct{})}
}

func (l *holdListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return c, err
	}
	l.heldOnce.Do(func() { close(l.held) })
	<-l.closed
	return c, nil
}

func (l *holdListener) Close() error {
	l.closeOnce.Do(func() { close(l.closed) })
	return l.Listener.Close()
}

// replaceB stops B's agent and serves B again with wrap applied to its
// inbound (15006) listener, so the test's Serving is the only one there.
func replaceB(t *testing.T, m *meshtest.Mesh, wrap func(net.Listener) net.Listener) *tunnel.Serving {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	m.B.Serving.Close(ctx)
	cancel()
	return serveAgain(t, m, wrap)
}

// TestCloseWaitsForConnectionAcceptedAsItBegins: a connection the accept
// loop took just as Close closed the listener is served (session 5: a
// draining pod serves what its listeners accepted), so Close must count
// it and wait for it. It used to return first and leave the connection
// served by a closed Serving (its pool closed, and in the agent its pod
// network closed right after), untracked and uncut.
func TestCloseWaitsForConnectionAcceptedAsItBegins(t *testing.T) {
	m := newMesh(t)
	// B's app answers after a moment, as an app doing some work would.
	app := m.B.Listen(t, "[::]:8081")
	replied := make(chan struct{}) // closed once the app has answered, before it closes
	go func() {
		for {
			c, err := app.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				if _, err := bufio.NewReader(c).ReadString('\n'); err != nil {
					return
				}
				time.Sleep(300 * time.Millisecond)
				fmt.Fprintf(c, "late\n")
				close(replied)
			}()
		}
	}()
	hl := (*holdListener)(nil)
	sv := replaceB(t, m, func(ln net.Listener) net.Listener { hl = newHoldListener(ln); return hl })

	// A client outside the mesh (A's socket with the agent mark) reaches
	// B's inbound port in plaintext.
	c, err := m.A.Net.Dial(context.Background(), netip.Addr{}, netip.AddrPortFrom(m.B.Pod.IP4, 8081))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := fmt.Fprintf(c, "hi\n"); err != nil {
		t.Fatal(err)
	}
	c.(*net.TCPConn).CloseWrite()
	answer := make(chan string, 1)
	go func() {
		b, err := io.ReadAll(c)
		answer <- fmt.Sprintf("%q %v", strings.TrimSpace(string(b)), err)
	}()
	select {
	case <-hl.held:
	case <-time.After(5 * time.Second):
		t.Fatal("the connection never reached B's inbound listener")
	}

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := sv.Close(ctx); err != nil {
		t.Fatalf("Close: %v (the connection needs 300 ms, the deadline is 5 s)", err)
	}
	// The relay ends only after the app's side closed, so a Close that
	// waited for the connection returns after the app answered.
	select {
	case <-replied:
	default:
		t.Fatal("Close returned while a connection it had accepted was still being served")
	}
	if got := <-answer; got != `"late" <nil>` {
		t.Fatalf("the client got %s, want \"late\"", got)
	}
}

// TestCloseCutsWhatStartsAfterItsDeadline: once Close's deadline has
// passed and it has cut what was live, a connection that was still being
// set up (here: the dial to the app, whose first SYN was dropped) and
// only then starts relaying must be cut too. It used to be missed by the
// cut, and Close then waited, with no deadline, for it to end on its own:
// for a long-lived connection, forever (in the agent: a DEL's drain, and
// the agent's stop, which waits for every drain).
func TestCloseCutsWhatStartsAfterItsDeadline(t *testing.T) {
	m := newMesh(t)
	go peerEcho(m.B.Listen(t, "[::]:8082"))
	// The agent's dial to the app gets no answer until the rule goes;
	// the kernel's SYN retransmission (1 s) then connects it.
	m.B.Pod.Run(t, "nft", "add table inet amb_close_test; add chain inet amb_close_test in { type filter hook input priority 0; policy accept; }; add rule inet amb_close_test in tcp dport 8082 ct state new drop")
	t.Cleanup(func() { m.B.Pod.Run(t, "nft", "delete table inet amb_close_test") })

	c, err := m.A.Net.Dial(context.Background(), netip.Addr{}, netip.AddrPortFrom(m.B.Pod.IP4, 8082))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// "echo": a connection that lasts as long as its client wants.
	if _, err := fmt.Fprintf(c, "echo\n"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond) // B's agent is dialling the app

	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	closed := make(chan error, 1)
	go func() { closed <- m.B.Serving.Close(ctx) }()
	time.Sleep(400 * time.Millisecond) // past Close's deadline and its cut
	m.B.Pod.Run(t, "nft", "flush table inet amb_close_test")

	select {
	case err := <-closed:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Close = %v, want the deadline's error (it had to cut)", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return 10 s after its deadline: a connection that started relaying after the cut was never cut")
	}
	// The client's connection was cut, not left relaying.
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, context.DeadlineExceeded) || isTimeout(err) {
		t.Fatalf("after Close the client's connection reads %v, want it ended", err)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// TestCloseCutsAStreamStuckOnAnUnreachablePeer: a pod sends in bulk to a
// peer that stops answering (its node gone, a partition: here an
// nftables rule drops everything A sends to 15008), so the HBONE
// connection's socket buffer fills and the write under the stream blocks
// in the kernel. When Close's deadline passes, cutting the stream (a
// reset queued behind that write) cannot end it; the connection itself
// must go. Close used to wait until the kernel gave up on the peer
// (tcp_retries2: about 15 minutes), and then, once it closed the
// connection, 5 s more: crypto/tls writes close_notify under its own 5 s
// deadline, and nothing reads it. Past its deadline Close waits on no
// peer: it must return within closeSlack of it.
func TestCloseCutsAStreamStuckOnAnUnreachablePeer(t *testing.T) {
	m := newMesh(t)
	// A small send buffer (per netns), so it fills at once and the write
	// blocks in the kernel, within the flow-control window.
	m.A.Pod.Run(t, "sysctl", "-qw", "net.ipv4.tcp_wmem=4096 16384 65536")
	c, err := m.A.Dial(netip.AddrPortFrom(m.B.Pod.IP4, 8080))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := fmt.Fprintf(c, "sink\n"); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	sent := 0
	go func() {
		buf := make([]byte, 64<<10)
		for {
			n, err := c.Write(buf)
			mu.Lock()
			sent += n
			mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	waitSent := func(n int) {
		deadline := time.Now().Add(10 * time.Second)
		for time.Now().Before(deadline) {
			mu.Lock()
			s := sent
			mu.Unlock()
			if s >= n {
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
		t.Fatalf("the app could not send %d bytes to B", n)
	}
	waitSent(4 << 20)
	m.A.Pod.Run(t, "nft", "add table inet amb_close_test; add chain inet amb_close_test out { type filter hook output priority 0; policy accept; }; add rule inet amb_close_test out tcp dport 15008 drop")
	t.Cleanup(func() { m.A.Pod.Run(t, "nft", "delete table inet amb_close_test") })
	time.Sleep(time.Second) // the buffers fill; the app's writes stop

	closeWithin(t, m.A.Serving, "the stream's write is stuck on the unreachable peer")
}

// closeSlack is how long after its deadline a Close that had to cut may
// return: the cut itself, on a slow shared machine. It waits on no peer.
const closeSlack = time.Second

// closeWithin closes sv with a 300 ms deadline and fails t unless Close
// had to cut and returned within closeSlack of the deadline.
func closeWithin(t *testing.T, sv *tunnel.Serving, stuck string) {
	t.Helper()
	const deadline = 300 * time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()
	closed := make(chan error, 1)
	start := time.Now()
	go func() { closed <- sv.Close(ctx) }()
	select {
	case err := <-closed:
		took := time.Since(start)
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Close = %v, want the deadline's error (it had to cut)", err)
		}
		t.Logf("Close returned after %v (deadline %v)", took.Round(time.Millisecond), deadline)
		if took > deadline+closeSlack {
			t.Fatalf("Close returned %v after its deadline, want within %v: it waited on a peer that stopped answering", (took - deadline).Round(time.Millisecond), closeSlack)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return 10 s after its deadline: " + stuck)
	}
}

// TestCloseCutsAnInboundConnectionStuckOnItsPeer: the other side of the
// same partition. B's app answers in bulk to A, whose pod stops taking
// anything from B's 15008 (an nftables rule drops it on input), so B's
// inbound HBONE connection fills its socket buffer towards A. B's Close,
// past its deadline, must not wait on A either: not for the GOAWAY, not
// for TLS's close_notify.
func TestCloseCutsAnInboundConnectionStuckOnItsPeer(t *testing.T) {
	m := newMesh(t)
	m.B.Pod.Run(t, "sysctl", "-qw", "net.ipv4.tcp_wmem=4096 16384 65536")
	c, err := m.A.Dial(netip.AddrPortFrom(m.B.Pod.IP4, 8080))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := fmt.Fprintf(c, "echo\n"); err != nil {
		t.Fatal(err)
	}
	// A's app writes and reads as fast as it can; B's app echoes.
	var mu sync.Mutex
	got := 0
	go func() {
		buf := make([]byte, 64<<10)
		for {
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	}()
	go func() {
		buf := make([]byte, 64<<10)
		for {
			n, err := c.Read(buf)
			mu.Lock()
			got += n
			mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	deadline := time.Now().Add(10 * time.Second)
	for {
		mu.Lock()
		g := got
		mu.Unlock()
		if g >= 4<<20 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("A's app got %d bytes echoed, want 4 MiB", g)
		}
		time.Sleep(10 * time.Millisecond)
	}
	m.A.Pod.Run(t, "nft", "add table inet amb_close_test; add chain inet amb_close_test in { type filter hook input priority 0; policy accept; }; add rule inet amb_close_test in tcp sport 15008 drop")
	t.Cleanup(func() { m.A.Pod.Run(t, "nft", "delete table inet amb_close_test") })
	time.Sleep(time.Second) // the buffers fill; B's writes towards A stop

	closeWithin(t, m.B.Serving, "B's inbound connection is stuck on its unreachable peer")
}

// TestCloseLeavesNoPooledConnection: an HBONE connection whose dial was
// still in flight when Close's deadline cut everything (and closed the
// pod's pool) must not outlive Close. Here B's first SYN on 15008 is
// dropped, so A's dial completes a second later, after the cut.
func TestCloseLeavesNoPooledConnection(t *testing.T) {
	m := newMesh(t)
	m.B.Pod.Run(t, "nft", "add table inet amb_close_test; add chain inet amb_close_test in { type filter hook input priority 0; policy accept; }; add rule inet amb_close_test in tcp dport 15008 ct state new drop")
	t.Cleanup(func() { m.B.Pod.Run(t, "nft", "delete table inet amb_close_test") })
	c, err := m.A.Dial(netip.AddrPortFrom(m.B.Pod.IP4, 8080))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "echo\n")
	time.Sleep(100 * time.Millisecond) // A's agent is dialling B's 15008

	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	closed := make(chan error, 1)
	go func() { closed <- m.A.Serving.Close(ctx) }()
	time.Sleep(400 * time.Millisecond) // past the deadline and the cut
	m.B.Pod.Run(t, "nft", "flush table inet amb_close_test")
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return")
	}
	// Whatever the dial became, nothing of A's pod is left connected to
	// B's 15008 once Close returned.
	var left string
	for range 20 {
		left = strings.TrimSpace(m.A.Pod.Run(t, "ss", "-tnH", "state", "established", "( dport = :15008 )"))
		if left == "" {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("after Close, A's pod still holds an HBONE connection:\n%s", left)
}

// TestCloseCutsADialInFlight: B's 15008 drops every SYN (a partition, a
// NetworkPolicy), so A's agent is still dialling HBONE for its app's
// connection when Close's deadline passes. The cut closes what is
// connected; a dial in flight must end with it too, not run to the
// connect timeout (10 s) while Close waits for it.
func TestCloseCutsADialInFlight(t *testing.T) {
	m := newMesh(t)
	m.B.Pod.Run(t, "nft", "add table inet amb_close_test; add chain inet amb_close_test in { type filter hook input priority 0; policy accept; }; add rule inet amb_close_test in tcp dport 15008 drop")
	t.Cleanup(func() { m.B.Pod.Run(t, "nft", "delete table inet amb_close_test") })
	c, err := m.A.Dial(netip.AddrPortFrom(m.B.Pod.IP4, 8080))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "echo\n")
	time.Sleep(100 * time.Millisecond) // A's agent is dialling B's 15008

	closeWithin(t, m.A.Serving, "the HBONE dial towards the unreachable peer is still in flight")
}
