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

	"github.com/prometheus/client_golang/prometheus"

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
	px, err := tunnel.New(tunnel.Config{Directory: m.Dir, Certificates: m.Certs, Authorizer: m.Auth, Registerer: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	pod, err := meshtest.PodListeners(m.B.Workload, m.B.Net)
	if err != nil {
		t.Fatal(err)
	}
	if wrap != nil {
		pod.Inbound = wrap(pod.Inbound)
	}
	sv, err := px.Serve(pod)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		sv.Close(ctx)
	})
	return sv
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
