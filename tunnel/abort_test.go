package tunnel_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/tunnel"
	"github.com/ambit-mesh/ambit/tunnel/hbone"
	"github.com/ambit-mesh/ambit/tunnel/internal/meshtest"
	"github.com/ambit-mesh/ambit/tunnel/internal/podtest"
)

// abortBound is how soon after Abort a peer must have learned that a
// connection ended, and the aborted pod's sockets be gone: what Abort
// does is synchronous (resets sent at close), so this is scheduling
// slack on a loaded machine. A drain would hold them for its whole
// timeout, and a peer of a pod whose interface was removed learns only
// from its keepalive (~30 s).
const abortBound = 3 * time.Second

// echoStream opens an app connection from n's pod to dst that stays
// open (the peer's app echoes), after one round trip through it.
func echoStream(t testing.TB, n *meshtest.Node, dst netip.AddrPort) net.Conn {
	t.Helper()
	c, err := n.Dial(dst)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := fmt.Fprintf(c, "echo\nping\n"); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 5)
	if _, err := c.Read(buf); err != nil || string(buf) != "ping\n" {
		t.Fatalf("echo through the mesh: %q %v", buf, err)
	}
	return c
}

// abort runs sv.Abort with the agent's bound before a DEL's answer and
// returns its error: nil when the pod's handlers were all done by then.
func abort(t *testing.T, sv *tunnel.Serving) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := sv.Abort(ctx)
	t.Logf("Abort returned after %v: %v", time.Since(start).Round(time.Microsecond), err)
	return err
}

// ended waits up to abortBound for c to read an end (a reset or EOF)
// and returns it; it fails t if c is still open.
func ended(t *testing.T, c net.Conn, who string) error {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(abortBound))
	_, err := c.Read(make([]byte, 1))
	if err == nil || isTimeout(err) {
		t.Fatalf("%s: still open %v after the pod's Abort (read: %v)", who, abortBound, err)
	}
	return err
}

// deafen drops what arrives on pod's link, unplug then what leaves it
// too: the pod's interface removed right after the DEL's answer (by the
// primary plugin, after ours), the worst case, where nothing a peer
// answers to the pod's last words comes back. What Abort sends goes out
// between the two; a close that waits for an answer from the peer (a
// FIN's ACK and FIN) never gets it.
func deafen(t *testing.T, pod *podtest.Pod) {
	t.Helper()
	pod.Run(t, "nft", fmt.Sprintf("add table inet amb_unplug; "+
		"add chain inet amb_unplug in { type filter hook input priority -300; policy accept; }; "+
		"add chain inet amb_unplug out { type filter hook output priority -300; policy accept; }; "+
		"add rule inet amb_unplug in iifname %q drop", pod.Link))
	t.Cleanup(func() { pod.Run(t, "nft", "delete table inet amb_unplug") })
}

func unplug(t *testing.T, pod *podtest.Pod) {
	t.Helper()
	pod.Run(t, "nft", fmt.Sprintf("add rule inet amb_unplug out oifname %q drop", pod.Link))
}

// noSockets waits up to abortBound for pod to hold no TCP socket but
// listeners, and fails t with what it still holds.
func noSockets(t *testing.T, pod *podtest.Pod, why string) {
	t.Helper()
	deadline := time.Now().Add(abortBound)
	for {
		left := strings.TrimSpace(pod.Run(t, "ss", "-tanH", "exclude", "listening"))
		if left == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %v after Abort the pod still holds:\n%s", why, abortBound, left)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// abortUnplugged takes n's network away as a DEL does (its pod deaf,
// Abort, its link unplugged), then fails t unless c (who) reads its end
// and n's pod then holds no socket (why, if it does), each within
// abortBound. It returns how c ended.
func abortUnplugged(t *testing.T, n *meshtest.Node, c net.Conn, who, why string) error {
	t.Helper()
	deafen(t, n.Pod)
	abort(t, n.Serving)
	unplug(t, n.Pod)
	err := ended(t, c, who)
	noSockets(t, n.Pod, why)
	return err
}

// TestAbortEndsInboundStreamsAtOnce: B's app holds a stream from A's app
// (A's pooled HBONE connection to B's 15008, B's agent's connection to
// its app) when B's network goes (a CNI DEL: Abort, then B's interface
// removed). A's app must learn at once, and B's pod must hold no socket
// after: B's inbound HBONE connection and its app-facing socket are
// reset, not drained nor closed. Before, the DEL closed only B's idle
// pooled connections; this stream drained up to drainTimeout, then
// closed into the removed interface, and A's side learned from its
// keepalive. Closed with a FIN, B's socket would wait in FIN_WAIT for
// an answer the interface no longer takes.
func TestAbortEndsInboundStreamsAtOnce(t *testing.T) {
	m := newMesh(t)
	c := echoStream(t, m.A, netip.AddrPortFrom(m.B.Pod.IP4, 8080))

	err := abortUnplugged(t, m.B, c, "A's app connection to B's app", "B's inbound HBONE connection or its app socket left")
	t.Logf("A's app read %v", err)
}

// TestAbortEndsPooledStreamsAtOnce: A's app holds a stream to B's app
// when A's network goes (Abort, then A's interface removed). A's pooled
// connection carries it, so it is not idle: it must be reset too, B's
// agent learning at once (its server end and B's app connection gone),
// A's app socket reset, and nothing of A left pooled or in A's pod.
func TestAbortEndsPooledStreamsAtOnce(t *testing.T) {
	m := newMesh(t)
	c := echoStream(t, m.A, netip.AddrPortFrom(m.B.Pod.IP4, 8080))
	if n := m.A.Metric(t, "ambit_tunnel_hbone_pool_connections", nil); n != 1 {
		t.Fatalf("A pools %v HBONE connections, want 1", n)
	}

	deafen(t, m.A.Pod)
	abort(t, m.A.Serving)
	unplug(t, m.A.Pod)
	if err := ended(t, c, "A's app connection"); !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("A's app connection ended with %v, want a reset (its pod's network is going)", err)
	}
	noSockets(t, m.B.Pod, "B still holds its end of A's HBONE connection or the app connection")
	noSockets(t, m.A.Pod, "A's pooled connection or app socket left")
	if n := m.A.Metric(t, "ambit_tunnel_hbone_pool_connections", nil); n != 0 {
		t.Errorf("A pools %v HBONE connections after Abort, want 0", n)
	}
}

// dialHeldByB makes B's pod drop, at its input hook's priority, what
// of A's HBONE dial to its 15008 match matches, opens an app connection
// from A's pod to B's app through it and waits until A's pod shows the
// dial held (a socket to :15008 in ss's filter state): Abort then finds
// the dial in flight. The connection is closed when t ends.
func dialHeldByB(t *testing.T, m *meshtest.Mesh, priority, match, held string, state ...string) net.Conn {
	t.Helper()
	m.B.Pod.Run(t, "nft", fmt.Sprintf("add table inet amb_abort_test; "+
		"add chain inet amb_abort_test in { type filter hook input %s; policy accept; }; "+
		"add rule inet amb_abort_test in %s", priority, match))
	t.Cleanup(func() { m.B.Pod.Run(t, "nft", "delete table inet amb_abort_test") })
	c, err := m.A.Dial(netip.AddrPortFrom(m.B.Pod.IP4, 8080))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	fmt.Fprintf(c, "echo\n")
	ss := func() string { return m.A.Pod.Run(t, append([]string{"ss", "-tanH"}, state...)...) }
	waitFor(t, held, 5*time.Second, func() bool { return strings.Contains(ss(), ":15008") }, ss)
	return c
}

// TestAbortCutsADialInFlight: A's agent is still dialling B's 15008 for
// its app (B drops the SYNs) when A's network goes. The pool is closed to
// dials: the dial ends with it (its socket gone from A's pod), and the
// app's connection is reset, rather than the dial going on and its
// connection being pooled after the DEL's answer.
func TestAbortCutsADialInFlight(t *testing.T) {
	m := newMesh(t)
	c := dialHeldByB(t, m, "priority 0", "tcp dport 15008 drop",
		"A's agent dialling B's 15008", "state", "syn-sent")

	abort(t, m.A.Serving)
	ended(t, c, "A's app connection waiting for the dial")
	noSockets(t, m.A.Pod, "the HBONE dial's socket left")
	if n := m.A.Metric(t, "ambit_tunnel_hbone_pool_connections", nil); n != 0 {
		t.Errorf("A pools %v HBONE connections after Abort, want 0", n)
	}
}

// TestAbortResetsADialInItsHandshake: A's agent has B's 15008 connected
// but its TLS handshake waits (B takes no segment but SYN, FIN and RST
// from A) when A's network goes. The dial ends with the pool, and its
// socket is reset like the pooled ones: the handshake's failure would
// close it with a FIN, queued behind its unacknowledged ClientHello,
// and leave it in FIN_WAIT in A's namespace.
func TestAbortResetsADialInItsHandshake(t *testing.T) {
	m := newMesh(t)
	// Connected; the ClientHello goes unanswered.
	c := dialHeldByB(t, m, "priority -300", "tcp dport 15008 tcp flags & (fin | syn | rst) == 0 drop",
		"A's agent connected to B's 15008", "state", "established", "( dport = :15008 )")

	abortUnplugged(t, m.A, c, "A's app connection waiting for the handshake", "the HBONE dial's socket left")
}

// TestAbortDuringCloseCutsTheDrain: B is draining (Close: an
// unenrollment, its network staying) a stream from A when its network
// goes after all (the pod's DEL). Abort must cut what Close drains, and
// Close return once it is done.
func TestAbortDuringCloseCutsTheDrain(t *testing.T) {
	m := newMesh(t)
	c := echoStream(t, m.A, netip.AddrPortFrom(m.B.Pod.IP4, 8080))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	closed := make(chan error, 1)
	go func() { closed <- m.B.Serving.Close(ctx) }()
	for deadline := time.Now().Add(5 * time.Second); ; {
		if strings.TrimSpace(m.B.Pod.Run(t, "ss", "-tlnH", "( sport = :15008 )")) == "" {
			break // Close began: B's listeners are closed
		}
		if time.Now().After(deadline) {
			t.Fatal("B's Close never closed its listeners")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Drained, not cut: the stream still echoes while Close waits.
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintf(c, "draining\n"); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len("draining\n"))
	if _, err := c.Read(buf); err != nil || string(buf) != "draining\n" {
		t.Fatalf("the stream during Close's drain: %q %v", buf, err)
	}
	select {
	case err := <-closed:
		t.Fatalf("Close returned (%v) with a stream open", err)
	default:
	}

	if err := abort(t, m.B.Serving); err != nil {
		// What it cut waits on no peer: only a wake-up Close took
		// for itself keeps it waiting for its whole bound.
		t.Errorf("Abort = %v, want nil: it did not see the pod's handlers end", err)
	}
	ended(t, c, "A's app connection drained by B's Close")
	select {
	case err := <-closed:
		if err != nil {
			t.Errorf("Close = %v, want nil (what it drained ended before its deadline)", err)
		}
	case <-time.After(abortBound):
		t.Fatal("Close still draining after Abort")
	}
	noSockets(t, m.B.Pod, "B's drained connection left")
}

// BenchmarkAbort is what Abort adds to a DEL's answer (the agent's
// BenchmarkDelWithStreams has the whole answer): a pod holding n streams,
// each on an HBONE connection of its own (MaxStreamsPerConn 1), aborted
// as their client (its pooled connections) or as their server (its
// inbound ones). abort-ms/op is Abort's time, until the pod's handlers
// are done; ns/op is the whole cycle (a mesh, n streams, Abort).
func BenchmarkAbort(b *testing.B) {
	testenv.RequireRoot(b)
	for _, side := range []string{"client", "server"} {
		for _, n := range []int{1, 50} {
			b.Run(fmt.Sprintf("%s/streams=%d", side, n), func(b *testing.B) {
				var took time.Duration
				for b.Loop() {
					m := meshtest.New(b, meshtest.Options{Config: tunnel.Config{HBONE: hbone.Config{MaxStreamsPerConn: 1}}})
					go peerEcho(m.B.Listen(b, "[::]:8080"))
					for range n {
						echoStream(b, m.A, netip.AddrPortFrom(m.B.Pod.IP4, 8080))
					}
					sv := m.A.Serving
					if side == "server" {
						sv = m.B.Serving
					}
					ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
					start := time.Now()
					err := sv.Abort(ctx)
					took += time.Since(start)
					cancel()
					if err != nil {
						b.Fatalf("Abort: %v (its handlers not done in 500 ms)", err)
					}
				}
				b.ReportMetric(float64(took.Microseconds())/1000/float64(b.N), "abort-ms/op")
			})
		}
	}
}

// stalledPassthrough makes B a destination outside the mesh for A's
// agent and opens, from A's app, a connection to an app of B's that
// takes it and never reads: A's agent relays it in plaintext from A's
// network (passthrough), B's agent delivers it to its app (15006). A's
// app writes until its writes block: every buffer on the way is full,
// and the relays' writes wait on a peer that does not read.
func stalledPassthrough(t *testing.T, m *meshtest.Mesh) net.Conn {
	t.Helper()
	w := m.B.Workload
	w.Meshed = false
	m.Dir.AddWorkload(w)
	ln := m.B.Listen(t, "[::]:8081")
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
		}
	}()
	c, err := m.A.Dial(netip.AddrPortFrom(m.B.Pod.IP4, 8081))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	buf := make([]byte, 64<<10)
	for deadline := time.Now().Add(10 * time.Second); ; {
		c.SetWriteDeadline(time.Now().Add(200 * time.Millisecond))
		if _, err := c.Write(buf); err != nil {
			if !isTimeout(err) {
				t.Fatal(err)
			}
			break // full all the way
		}
		if time.Now().After(deadline) {
			t.Fatal("A's app could write for 10 s: B's app reads after all?")
		}
	}
	c.SetWriteDeadline(time.Time{})
	return c
}

// TestAbortResetsAPassthroughsFarSide: A's app sends to a destination
// outside the mesh (A's agent relays it in plaintext from A's network)
// that stopped reading when A's network goes. Abort must reset both
// sides of the relay: the far side too, not close it with a FIN, which
// waits behind the unsent data for a window that never opens and kept
// A's socket in FIN_WAIT1, its peer learning nothing.
func TestAbortResetsAPassthroughsFarSide(t *testing.T) {
	m := newMesh(t)
	c := stalledPassthrough(t, m)

	abortUnplugged(t, m.A, c, "A's app connection", "the passthrough's far side left")
}

// TestAbortResetsAPlaintextDelivery: B's agent delivers a plaintext
// connection (15006) to B's app, which stopped reading, when B's network
// goes. Its socket to the app is reset like the rest, not closed with a
// FIN queued behind what the app has not read, which kept it in B's
// namespace in FIN_WAIT1.
func TestAbortResetsAPlaintextDelivery(t *testing.T) {
	m := newMesh(t)
	c := stalledPassthrough(t, m)

	abortUnplugged(t, m.B, c, "A's app connection to B's app", "B's delivery to its app left")
}

// TestAbortSaysWhyItCutADial: A's agent is dialling a destination outside
// the mesh for its app (the SYNs dropped) when A's network goes. The
// dial's failure says Abort cut it, the pod's network going: it said
// the pod's drain deadline had passed, of a pod that never drained.
func TestAbortSaysWhyItCutADial(t *testing.T) {
	testenv.RequireRoot(t)
	var logs testenv.Buffer
	log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
	m := meshtest.New(t, meshtest.Options{Config: tunnel.Config{ConnectTimeout: 30 * time.Second, Logger: log}})
	_, cIP := outsideServer(t, m.A.Pod)
	blackHole(t, m.A.Pod, "ip daddr "+cIP.String())
	c, err := m.A.Dial(netip.AddrPortFrom(cIP, 8080))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	waitFor(t, "A's agent dialling the destination", 5*time.Second,
		func() bool { return synSent(t, m.A.Pod, "dst", cIP.String()) == 1 }, func() string { return "" })

	abort(t, m.A.Serving)
	ended(t, c, "A's app connection waiting for the dial")
	waitMetric(t, m.A, "ambit_tunnel_connections_failed_total", map[string]string{"direction": "outbound", "reason": "upstream_unreachable"}, 1)
	var line string
	for l := range strings.SplitSeq(logs.String(), "\n") {
		if strings.Contains(l, "connection failed") && strings.Contains(l, "upstream_unreachable") {
			line = l
		}
	}
	if !strings.Contains(line, "network going") || strings.Contains(line, "drain deadline") {
		t.Errorf("the cut dial's line does not say the pod's network going cut it:\n%s", line)
	}
}
