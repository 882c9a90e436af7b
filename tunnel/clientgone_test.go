package tunnel_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/tunnel"
	"github.com/ambit-mesh/ambit/tunnel/internal/meshtest"
	"github.com/ambit-mesh/ambit/tunnel/internal/podtest"
)

// The tests here: an agent dialling for an accepted connection (15001:
// a passthrough destination, or the HBONE pool's connection to a meshed
// one; 15006: the pod's app) towards a black-holed address, its SYNs
// dropped, so the dial would run to the connect timeout (30 s here).
// Clients that reset (SO_LINGER 0) or close before sending a byte leave
// it; the agent must give up the dial: its SYN-SENT sockets and the pod's
// counted connections gone well before the timeout (the bound below is a
// third of it, a functional bound, not a speed). Before session 12 they
// stayed for the whole timeout. A client that wrote its request and
// half-closed is not gone: it gets its answer once the dial succeeds.

const (
	goneTimeout = 30 * time.Second // the agents' connect timeout here
	goneBound   = 10 * time.Second // "long before the timeout"
	goneN       = 20
)

// blackHole drops, in pod p, the packets leaving it that match (an nft
// expression), until the returned function lifts it.
func blackHole(t *testing.T, p *podtest.Pod, match string) (lift func()) {
	t.Helper()
	table := "bh" + podtest.Suffix()
	p.Run(t, "nft", "add table inet "+table+"; add chain inet "+table+
		" out { type filter hook output priority 0; policy accept; }; add rule inet "+table+" out "+match+" drop")
	return func() { p.Run(t, "nft", "delete table inet "+table) }
}

// synSent counts pod p's SYN-SENT sockets matching an ss filter.
func synSent(t *testing.T, p *podtest.Pod, filter ...string) int {
	t.Helper()
	out := p.Run(t, append([]string{"ss", "-Htn", "state", "syn-sent"}, filter...)...)
	return strings.Count(out, "\n")
}

// waitFor polls cond until it holds; it fails the test after bound,
// describing the state with state(). It returns how long it took.
func waitFor(t *testing.T, what string, bound time.Duration, cond func() bool, state func() string) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > bound {
			t.Fatalf("%s: still not so after %v (%s)", what, bound, state())
		}
		time.Sleep(20 * time.Millisecond)
	}
	return time.Since(start)
}

// dialN connects n clients with dial; any the test leaves open are
// closed when it ends.
func dialN(t *testing.T, n int, dial func() (net.Conn, error)) []net.Conn {
	t.Helper()
	cs := make([]net.Conn, 0, n)
	for i := 0; i < n; i++ {
		c, err := dial()
		if err != nil {
			t.Fatalf("client %d: %v", i, err)
		}
		t.Cleanup(func() { c.Close() })
		cs = append(cs, c)
	}
	return cs
}

// reset ends clients with a reset (SO_LINGER 0).
func reset(cs ...net.Conn) {
	for _, c := range cs {
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
	}
}

// leave ends clients the way ones that gave up do: every other one with
// a reset, the rest with a plain close (a FIN, with no byte sent before
// it).
func leave(cs []net.Conn) {
	for i, c := range cs {
		if i%2 == 0 {
			reset(c)
		} else {
			c.Close()
		}
	}
}

// blackHoledApp serves peerEcho on port 8097 of n's pod and drops the
// SYNs the pod sends to it (its agent's dials of the app) until lift;
// dials counts those in SYN-SENT.
func blackHoledApp(t *testing.T, n *meshtest.Node) (dst netip.AddrPort, dials func() int, lift func()) {
	t.Helper()
	go peerEcho(n.Listen(t, "[::]:8097"))
	lift = blackHole(t, n.Pod, "tcp dport 8097")
	return netip.AddrPortFrom(n.Pod.IP4, 8097), func() int { return synSent(t, n.Pod, "dport", "= :8097") }, lift
}

// goneCase is one listener's set-up for the checks of checkClientGone.
type goneCase struct {
	node    *meshtest.Node              // the agent that dials
	dir     string                      // its direction label
	dial    func() (net.Conn, error)    // a client to the black hole
	synSent func() int                  // the dialling agent's SYN-SENT sockets
	dials   int                         // SYN-SENT sockets for goneN clients
	state   func() string               // for failures
	metric  func(reason string) float64 // failed_total of dir, by reason
}

// checkClientGone: goneN clients whose connections the agent is dialling
// for leave (half reset, half closed): the dials are abandoned and the
// pod's count is back to zero, each counted client_gone. Then goneN
// clients that reset right after connecting: the same.
func checkClientGone(t *testing.T, gc goneCase) {
	t.Helper()
	zero := func() bool { return gc.synSent() == 0 && gc.node.Serving.Connections() == 0 }
	cs := dialN(t, goneN, gc.dial)
	waitFor(t, fmt.Sprintf("the agent dialling for all %d clients", goneN), goneBound,
		func() bool { return gc.synSent() == gc.dials && gc.node.Serving.Connections() == goneN }, gc.state)
	leave(cs)
	took := waitFor(t, "the dials abandoned once their clients left", goneBound, zero, gc.state)
	t.Logf("%d clients gone (half reset, half closed): no SYN-SENT socket and no connection counted after %v (connect timeout %v)",
		goneN, took.Round(time.Millisecond), goneTimeout)
	if got := gc.metric("client_gone"); got != goneN {
		t.Errorf("failed_total{%s, client_gone} = %v, want %d", gc.dir, got, goneN)
	}

	// Reset at once: the agent may not even have started its dial.
	start := time.Now()
	reset(dialN(t, goneN, gc.dial)...)
	waitFor(t, "the dials abandoned for clients reset right after connecting", goneBound,
		func() bool { return zero() && gc.metric("client_gone") == 2*goneN }, gc.state)
	t.Logf("%d clients reset right after connecting: all counted client_gone, no SYN-SENT socket, no connection after %v",
		goneN, time.Since(start).Round(time.Millisecond))
	if got := gc.metric("upstream_unreachable") + gc.metric("connect_timeout"); got != 0 {
		t.Errorf("failed_total{%s} for a dial that ran its course: %v, want 0", gc.dir, got)
	}
}

// askSlowly writes a request and half-closes (the client waits for its
// answer), and returns a function that reads the answer.
func askSlowly(t *testing.T, c net.Conn, cmd string) (answer func() string) {
	t.Helper()
	if _, err := fmt.Fprintf(c, "%s\n", cmd); err != nil {
		t.Fatal(err)
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	return func() string {
		t.Helper()
		c.SetReadDeadline(time.Now().Add(goneBound + goneBound))
		b, err := io.ReadAll(bufio.NewReader(c))
		if err != nil {
			t.Fatalf("the client that half-closed during the dial: %v (read %q)", err, b)
		}
		return strings.TrimSpace(string(b))
	}
}

// keepWaiting checks, a while after the watch would have looked (well
// past its 20 ms delay), that the dials for a half-closed client go on.
func keepWaiting(t *testing.T, gc goneCase, dials, conns int) {
	t.Helper()
	time.Sleep(300 * time.Millisecond)
	if gc.synSent() != dials || gc.node.Serving.Connections() != conns {
		t.Fatalf("after a client that sent its request half-closed: want its dial to go on (%d SYN-SENT, %d connections), have %s",
			dials, conns, gc.state())
	}
}

func goneMesh(t *testing.T) *meshtest.Mesh {
	testenv.RequireRoot(t)
	// Each abandoned dial logs a line: shown only when the test fails.
	var logs testenv.Buffer
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("agents' log:\n%s", logs.String())
		}
	})
	log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
	m := meshtest.New(t, meshtest.Options{Config: tunnel.Config{ConnectTimeout: goneTimeout, Logger: log}})
	go peerEcho(m.B.Listen(t, "[::]:8080"))
	return m
}

func metricOf(t *testing.T, n *meshtest.Node, dir string) func(string) float64 {
	return func(reason string) float64 {
		return n.Metric(t, "ambit_tunnel_connections_failed_total", map[string]string{"direction": dir, "reason": reason})
	}
}

// TestClientGoneOutboundPassthrough: A's app connects (15001) to an
// address outside the mesh whose SYNs are dropped as they leave A.
func TestClientGoneOutboundPassthrough(t *testing.T) {
	m := goneMesh(t)
	// A server outside the mesh, on a link of A's.
	aIP, cIP := outsideServer(t, m.A.Pod)
	// The app's own SYN is redirected to 15001 before this filter (nat
	// output comes first): only the agent's leaves for cIP.
	lift := blackHole(t, m.A.Pod, "ip daddr "+cIP.String())
	dst := netip.AddrPortFrom(cIP, 8080)
	gc := goneCase{
		node: m.A, dir: "outbound", dials: goneN,
		dial:    func() (net.Conn, error) { return m.A.Dial(dst) },
		synSent: func() int { return synSent(t, m.A.Pod, "dst", cIP.String()) },
		metric:  metricOf(t, m.A, "outbound"),
	}
	gc.state = func() string {
		return fmt.Sprintf("A: %d SYN-SENT to %v, pod holds %d", gc.synSent(), cIP, m.A.Serving.Connections())
	}
	checkClientGone(t, gc)

	// A client that writes its request and half-closes during the dial,
	// beside two that reset: its dial goes on, and once the black hole
	// is lifted (a SYN retransmission gets through) it has its answer.
	keeper, err := m.A.Dial(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer keeper.Close()
	answer := askSlowly(t, keeper, "who")
	others := dialN(t, 2, gc.dial)
	waitFor(t, "the agent dialling for 3 clients", goneBound, func() bool { return gc.synSent() == 3 }, gc.state)
	reset(others...)
	waitFor(t, "the two that reset gone", goneBound, func() bool { return gc.synSent() == 1 }, gc.state)
	keepWaiting(t, gc, 1, 1)
	lift()
	if got := answer(); got != aIP.String() {
		t.Errorf("the half-closed client's answer: %q, want %s", got, aIP)
	}
}

// TestClientGoneOutboundHBONE: A's app connects (15001) to B's app; A's
// agent dials B's 15008 once for all of them (the pool's shared dial),
// and A drops those SYNs. The shared dial is given up when its last
// waiter leaves, and not before: a client that half-closed after its
// request keeps it going while the others leave, and gets its answer.
func TestClientGoneOutboundHBONE(t *testing.T) {
	m := goneMesh(t)
	lift := blackHole(t, m.A.Pod, "tcp dport 15008")
	dst := netip.AddrPortFrom(m.B.Pod.IP4, 8080)
	gc := goneCase{
		node: m.A, dir: "outbound", dials: 1,
		dial:    func() (net.Conn, error) { return m.A.Dial(dst) },
		synSent: func() int { return synSent(t, m.A.Pod, "dport", "= :15008") },
		metric:  metricOf(t, m.A, "outbound"),
	}
	gc.state = func() string {
		return fmt.Sprintf("A: %d SYN-SENT to :15008, pod holds %d", gc.synSent(), m.A.Serving.Connections())
	}
	checkClientGone(t, gc)

	// The dial is started for the first of the four that will leave; the
	// keeper comes last and only waits for it.
	others := dialN(t, 4, gc.dial)
	waitFor(t, "4 clients waiting for one dial", goneBound,
		func() bool { return gc.synSent() == 1 && m.A.Serving.Connections() == 4 }, gc.state)
	keeper, err := m.A.Dial(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer keeper.Close()
	answer := askSlowly(t, keeper, "who")
	waitFor(t, "5 clients waiting for one dial", goneBound,
		func() bool { return gc.synSent() == 1 && m.A.Serving.Connections() == 5 }, gc.state)
	leave(others)
	waitFor(t, "the 4 that left gone", goneBound, func() bool { return m.A.Serving.Connections() <= 1 }, gc.state)
	keepWaiting(t, gc, 1, 1)
	lift()
	if got := answer(); got != m.A.Pod.IP4.String() {
		t.Errorf("the half-closed client's answer: %q, want %s", got, m.A.Pod.IP4)
	}
}

// TestClientGoneInboundPlaintext: plaintext clients (from A's netns, not
// captured there) reach B's 15006; B's agent dials B's app on a port
// whose SYNs B drops.
func TestClientGoneInboundPlaintext(t *testing.T) {
	m := goneMesh(t)
	dst, dials, lift := blackHoledApp(t, m.B)
	gc := goneCase{
		node: m.B, dir: "inbound", dials: goneN,
		dial: func() (net.Conn, error) {
			ctx, cancel := context.WithTimeout(context.Background(), goneBound)
			defer cancel()
			return m.A.Net.Dial(ctx, netip.Addr{}, dst)
		},
		synSent: dials,
		metric:  metricOf(t, m.B, "inbound"),
	}
	gc.state = func() string {
		return fmt.Sprintf("B: %d SYN-SENT to :8097, pod holds %d", gc.synSent(), m.B.Serving.Connections())
	}
	checkClientGone(t, gc)

	keeper, err := gc.dial()
	if err != nil {
		t.Fatal(err)
	}
	defer keeper.Close()
	answer := askSlowly(t, keeper, "who")
	waitFor(t, "B's agent dialling for the client", goneBound,
		func() bool { return gc.synSent() == 1 && m.B.Serving.Connections() == 1 }, gc.state)
	keepWaiting(t, gc, 1, 1)
	lift()
	if got := answer(); got != m.A.Pod.IP4.String() {
		t.Errorf("the half-closed client's answer: %q, want %s (the original source)", got, m.A.Pod.IP4)
	}
}
