package tunnel_test

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/tunnel"
	"github.com/ambit-mesh/ambit/tunnel/internal/benchkit"
	"github.com/ambit-mesh/ambit/tunnel/internal/meshtest"
)

// The connection share (share.go, docs/tunnel.md "Connection share"):
// two agents, each serving two pods (A and A2 on one, B and B2 on the
// other; A–B and A2–B2 on their own links), so a hog and another pod
// share one agent's budget.

// shareAgent is one agent (Proxy) serving two pods.
type shareAgent struct {
	px   *tunnel.Proxy
	svs  []*tunnel.Serving
	reg  *meshtest.Node // only its Reg: Metric
	logs *testenv.Buffer
}

// shareLab is pods A, B (mesh m) and A2, B2 (mesh m2, its pods'
// identities from m's CA), with apps echoing (peerEcho) on B:8080 and
// B2:8080.
type shareLab struct {
	m, m2  *meshtest.Mesh
	a2, b2 tunnel.Workload
}

func newShareLab(t *testing.T) *shareLab {
	testenv.RequireRoot(t)
	l := &shareLab{m: meshtest.New(t, meshtest.Options{NoServe: true})}
	// Pair picks its subnet at random among 100: the two must differ, as
	// the directory holds both.
	for l.m2 == nil || l.m2.A.Pod.IP4 == l.m.A.Pod.IP4 {
		l.m2 = meshtest.New(t, meshtest.Options{NoServe: true})
	}
	for _, w := range []*tunnel.Workload{&l.a2, &l.b2} {
		src := l.m2.A.Workload
		if w == &l.b2 {
			src = l.m2.B.Workload
		}
		*w = src
		w.Namespace += "2"
		w.Identity = l.m.CA.ID(w.Namespace, w.ServiceAccount)
		l.m.Dir.AddWorkload(*w)
	}
	go peerEcho(l.m.B.Listen(t, "[::]:8080"))
	go peerEcho(l.m2.B.Listen(t, "[::]:8080"))
	return l
}

// serve starts an agent with cfg for the pods given (workload and netns).
func (l *shareLab) serve(t *testing.T, cfg tunnel.Config, pods ...struct {
	w tunnel.Workload
	n *meshtest.Node
}) *shareAgent {
	t.Helper()
	ag := &shareAgent{reg: &meshtest.Node{Reg: prometheus.NewRegistry()}, logs: &testenv.Buffer{}}
	cfg.Directory, cfg.Certificates, cfg.Authorizer, cfg.Registerer = l.m.Dir, l.m.Certs, l.m.Auth, ag.reg.Reg
	cfg.Logger = slog.New(slog.NewTextHandler(ag.logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
	px, err := tunnel.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ag.px = px
	for _, p := range pods {
		pod, err := meshtest.PodListeners(p.w, p.n.Net)
		if err != nil {
			t.Fatal(err)
		}
		sv, err := px.Serve(pod)
		if err != nil {
			t.Fatal(err)
		}
		ag.svs = append(ag.svs, sv)
	}
	t.Cleanup(func() { ag.close() })
	return ag
}

func (ag *shareAgent) close() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	for _, sv := range ag.svs {
		sv.Close(ctx)
	}
}

// agents starts the A side (A, A2) with cfgA and the B side (B, B2) with
// cfgB.
func (l *shareLab) agents(t *testing.T, cfgA, cfgB tunnel.Config) (a, b *shareAgent) {
	type pw = struct {
		w tunnel.Workload
		n *meshtest.Node
	}
	a = l.serve(t, cfgA, pw{l.m.A.Workload, l.m.A}, pw{l.a2, l.m2.A})
	b = l.serve(t, cfgB, pw{l.m.B.Workload, l.m.B}, pw{l.b2, l.m2.B})
	return a, b
}

// echoOnce opens a connection with dial and makes one round trip on it,
// leaving it open; nil and the error when the connection was refused.
func echoOnce(dial func() (net.Conn, error), i int) (net.Conn, error) {
	c, err := dial()
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	msg := fmt.Sprintf("conn-%d", i)
	if _, err := fmt.Fprintf(c, "echo\n%s", msg); err != nil {
		c.Close()
		return nil, err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		c.Close()
		return nil, err
	}
	if string(buf) != msg {
		c.Close()
		return nil, fmt.Errorf("got %q", buf)
	}
	c.SetDeadline(time.Time{})
	return c, nil
}

// hog opens n connections one after the other, keeping those that work;
// it returns them and how many were refused with a reset (any other
// failure fails the test).
func hog(t *testing.T, n int, dial func() (net.Conn, error)) (held []net.Conn, refused int) {
	t.Helper()
	t.Cleanup(func() {
		for _, c := range held {
			c.Close()
		}
	})
	for i := 0; i < n; i++ {
		c, err := echoOnce(dial, i)
		if err != nil {
			// (A refusal may reach the app before its connect returns.)
			if !strings.Contains(err.Error(), "reset") && !strings.Contains(err.Error(), "broken pipe") {
				t.Fatalf("connection %d: %v, want it to work or be reset", i, err)
			}
			refused++
			continue
		}
		held = append(held, c)
	}
	return held, refused
}

func closeAll(cs []net.Conn) {
	for _, c := range cs {
		c.Close()
	}
}

// waitZero waits until every pod of ag holds no connection.
func waitZero(t *testing.T, ag *shareAgent) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		held, _ := ag.px.Connections()
		per := []int{}
		for _, sv := range ag.svs {
			per = append(per, sv.Connections())
		}
		if held == 0 && per[0] == 0 && per[1] == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent still counts %d connections (pods %v) after every one closed", held, per)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// With a budget of 400, nothing is refused below T = 300, all pods
// together; past it a pod holding the water level (the max-min fair
// level for C = 350) or more is. A hog alone with an idle pod is capped
// at 350 (the other holds nothing), and the other pod has the 50 left.
const (
	testBudget = 400
	testThresh = testBudget / 4 * 3
	testCap    = testBudget / 8 * 7
)

// checkShed checks what the shedding agent reports: the refusals by
// reason, the pod refused in the metrics, the water level, and its log
// line.
func checkShed(t *testing.T, ag *shareAgent, dir, pod string, refused int) {
	t.Helper()
	if got := ag.reg.Metric(t, "ambit_tunnel_connections_failed_total", map[string]string{"direction": dir, "reason": "over_share"}); got != float64(refused) {
		t.Errorf("failed_total{%s, over_share} = %v, want %d", dir, got, refused)
	}
	if got := ag.reg.Metric(t, "ambit_tunnel_pod_connections_over_share", map[string]string{"pod": pod}); got != testCap {
		t.Errorf("pod_connections_over_share{pod=%s} = %v, want %d", pod, got, testCap)
	}
	if got := ag.reg.Metric(t, "ambit_tunnel_connection_budget", nil); got != testBudget {
		t.Errorf("connection_budget = %v, want %d", got, testBudget)
	}
	// The hog at 350 and the other pod at 50: 50 + 300 = C.
	if got := ag.reg.Metric(t, "ambit_tunnel_connection_water_level", nil); got != testCap-50 {
		t.Errorf("connection_water_level = %v, want %d", got, testCap-50)
	}
	logs := ag.logs.String()
	lines := strings.Count(logs, "the pod holds the water level or more")
	if lines < 1 || lines > 3 {
		t.Errorf("%d log lines for %d refusals in about a second, want 1-3 (one a second per pod)\n%s", lines, refused, logs)
	}
	for _, want := range []string{"pod=" + pod, fmt.Sprintf("pod_connections=%d", testCap), fmt.Sprintf("level=%d", testCap),
		fmt.Sprintf("budget=%d", testBudget), "setting=maxConnections"} {
		if !strings.Contains(logs, want) {
			t.Errorf("the refusal's log line does not say %s:\n%s", want, logs)
		}
	}
	if strings.Contains(logs, "connection failed") {
		t.Errorf("a refusal wrote an access-log line per connection (unbounded):\n%s", firstLines(logs, 3))
	}
}

func firstLines(s string, n int) string {
	ls := strings.SplitN(s, "\n", n+1)
	return strings.Join(ls[:min(n, len(ls))], "\n")
}

// TestShareOutbound: pod A's app opens 400 connections through its agent
// (budget 400: T = 300, C = 350). The first 300 get in (nothing is
// refused below T), then A is the biggest holder and is capped at the
// water level, 350 while A2 holds nothing; the other 50 are reset at
// once. Pod A2, on the same agent and below the level, still gets every
// new connection, up to the budget. The agent counts them back to zero
// once closed. Before session 11 all 400 (and any number) got in.
func TestShareOutbound(t *testing.T) {
	l := newShareLab(t)
	a, _ := l.agents(t, tunnel.Config{MaxConnections: testBudget}, tunnel.Config{})
	held, refused := hog(t, 400, func() (net.Conn, error) { return l.m.A.Dial(netip.AddrPortFrom(l.m.B.Pod.IP4, 8080)) })
	t.Logf("hog: %d held, %d refused", len(held), refused)
	if len(held) != testCap || refused != 400-testCap {
		t.Errorf("hog A: %d held and %d refused, want %d and %d", len(held), refused, testCap, 400-testCap)
	}
	other, refused2 := hog(t, 50, func() (net.Conn, error) { return l.m2.A.Dial(netip.AddrPortFrom(l.m2.B.Pod.IP4, 8080)) })
	if refused2 != 0 {
		t.Errorf("pod A2 below the level: %d of 50 new connections refused, want 0", refused2)
	}
	if got, want := a.svs[0].Connections(), testCap; got != want {
		t.Errorf("pod A holds %d, want %d", got, want)
	}
	if n, _ := a.px.Connections(); n != testCap+50 {
		t.Errorf("agent holds %d, want %d", n, testCap+50)
	}
	checkShed(t, a, "outbound", l.m.A.Workload.Namespace+"/"+l.m.A.Workload.Name, refused)
	closeAll(held)
	closeAll(other)
	waitZero(t, a)
	// The level is no bound below T: once the hog let go, A gets in
	// again.
	again, r := hog(t, 10, func() (net.Conn, error) { return l.m.A.Dial(netip.AddrPortFrom(l.m.B.Pod.IP4, 8080)) })
	if r != 0 {
		t.Errorf("after the hog closed: %d of 10 refused", r)
	}
	closeAll(again)
	waitZero(t, a)
}

// TestShareInboundHBONE: A's app (its agent without a small budget)
// opens 400 connections to B, whose agent has a budget of 400: B's agent
// answers the streams past the level (350) with 503 and ambit-refused:
// over_share (no dial of B's app), A's agent resets its app's connection
// and counts upstream_over_share; A2's connections to B2, on B's agent,
// all get in, up to the budget.
func TestShareInboundHBONE(t *testing.T) {
	l := newShareLab(t)
	a, b := l.agents(t, tunnel.Config{}, tunnel.Config{MaxConnections: testBudget})
	held, refused := hog(t, 400, func() (net.Conn, error) { return l.m.A.Dial(netip.AddrPortFrom(l.m.B.Pod.IP4, 8080)) })
	t.Logf("hog: %d held, %d refused", len(held), refused)
	if len(held) != testCap || refused != 400-testCap {
		t.Errorf("A to B: %d held and %d refused, want %d and %d", len(held), refused, testCap, 400-testCap)
	}
	other, refused2 := hog(t, 50, func() (net.Conn, error) { return l.m2.A.Dial(netip.AddrPortFrom(l.m2.B.Pod.IP4, 8080)) })
	if refused2 != 0 {
		t.Errorf("pod B2 below the level: %d of 50 new connections refused, want 0", refused2)
	}
	checkShed(t, b, "inbound", l.m.B.Workload.Namespace+"/"+l.m.B.Workload.Name, refused)
	if got := a.reg.Metric(t, "ambit_tunnel_connections_failed_total", map[string]string{"direction": "outbound", "reason": "upstream_over_share"}); got != float64(refused) {
		t.Errorf("A's agent: failed_total{outbound, upstream_over_share} = %v, want %d", got, refused)
	}
	closeAll(held)
	closeAll(other)
	waitZero(t, a)
	waitZero(t, b)
}

// TestShareInboundPlaintext: 400 plaintext connections to B's app (from
// A's netns, not captured there: anyone in permissive mode), B's agent
// with a budget of 400: 350 get in, the rest are reset before any dial
// of the app; plaintext to B2 on the same agent all gets in.
func TestShareInboundPlaintext(t *testing.T) {
	l := newShareLab(t)
	_, b := l.agents(t, tunnel.Config{}, tunnel.Config{MaxConnections: testBudget})
	plain := func(n *meshtest.Node, dst netip.Addr) func() (net.Conn, error) {
		return func() (net.Conn, error) {
			return n.Net.Dial(context.Background(), netip.Addr{}, netip.AddrPortFrom(dst, 8080))
		}
	}
	held, refused := hog(t, 400, plain(l.m.A, l.m.B.Pod.IP4))
	if len(held) != testCap || refused != 400-testCap {
		t.Errorf("plaintext to B: %d held and %d refused, want %d and %d", len(held), refused, testCap, 400-testCap)
	}
	other, refused2 := hog(t, 50, plain(l.m2.A, l.m2.B.Pod.IP4))
	if refused2 != 0 {
		t.Errorf("plaintext to B2 below the level: %d of 50 refused, want 0", refused2)
	}
	checkShed(t, b, "inbound", l.m.B.Workload.Namespace+"/"+l.m.B.Workload.Name, refused)
	closeAll(held)
	closeAll(other)
	waitZero(t, b)
}

// TestShareBusyPodNotRefused: a busy pod is normal operation. Pod A's
// app (an ingress, say) opens 279 connections and A2's 20 through their
// agent (budget 400): the agent just below T = 300, nothing is refused,
// no log line, no pod in the metrics, water level 0. Then A goes on:
// past T and the biggest holder, it is capped at the level (330: C less
// A2's 20), and A2 still gets 50 more, up to the budget. Before (a share of
// budget/2/pods past half the budget) A was refused from 200 on.
func TestShareBusyPodNotRefused(t *testing.T) {
	l := newShareLab(t)
	a, _ := l.agents(t, tunnel.Config{MaxConnections: testBudget}, tunnel.Config{})
	dialA := func() (net.Conn, error) { return l.m.A.Dial(netip.AddrPortFrom(l.m.B.Pod.IP4, 8080)) }
	dialA2 := func() (net.Conn, error) { return l.m2.A.Dial(netip.AddrPortFrom(l.m2.B.Pod.IP4, 8080)) }
	busy, refused := hog(t, 279, dialA)
	if refused != 0 {
		t.Errorf("busy pod A: %d of 279 connections refused with the agent below 3/4 of its budget, want 0", refused)
	}
	small, refused2 := hog(t, 20, dialA2)
	if refused2 != 0 {
		t.Errorf("pod A2: %d of 20 refused, want 0", refused2)
	}
	if n, _ := a.px.Connections(); n != testThresh-1 {
		t.Errorf("agent holds %d, want %d", n, testThresh-1)
	}
	if got := a.reg.Metric(t, "ambit_tunnel_connections_failed_total", map[string]string{"reason": "over_share"}); got != 0 {
		t.Errorf("failed_total{over_share} = %v below T, want 0", got)
	}
	if got := a.reg.Metric(t, "ambit_tunnel_pod_connections_over_share", nil); got != 0 {
		t.Errorf("pod_connections_over_share = %v with no pod refused, want no series", got)
	}
	if got := a.reg.Metric(t, "ambit_tunnel_connection_water_level", nil); got != 0 {
		t.Errorf("connection_water_level = %v below T, want 0", got)
	}
	if logs := a.logs.String(); strings.Contains(logs, "connection refused") {
		t.Errorf("a refusal line below T:\n%s", firstLines(logs, 3))
	}
	more, refused := hog(t, 100, dialA)
	if want := testCap - 20 - 279; len(more) != want || refused != 100-want {
		t.Errorf("pod A past T: %d more held and %d refused, want %d and %d (capped at the level %d)",
			len(more), refused, want, 100-want, testCap-20)
	}
	small2, refused2 := hog(t, 50, dialA2)
	if refused2 != 0 {
		t.Errorf("pod A2 below the level: %d of 50 refused, want 0", refused2)
	}
	if n, _ := a.px.Connections(); n != testBudget {
		t.Errorf("agent holds %d, want its budget %d", n, testBudget)
	}
	if got := a.reg.Metric(t, "ambit_tunnel_pod_connections_over_share", nil); got != testCap-20 {
		t.Errorf("pod_connections_over_share = %v, want A's %d alone", got, testCap-20)
	}
	for _, cs := range [][]net.Conn{busy, small, more, small2} {
		closeAll(cs)
	}
	waitZero(t, a)
}

// TestShareCountsEveryExit: every way a connection ends gives its count
// back, on both agents: a stream whose app dial fails (nothing on the
// port: 503 upstream_unavailable), connections reset by the app mid-way,
// and connections still open when the agent closes the pods (a drain cut
// at its deadline, as at a hand-over).
func TestShareCountsEveryExit(t *testing.T) {
	l := newShareLab(t)
	a, b := l.agents(t, tunnel.Config{MaxConnections: testBudget}, tunnel.Config{MaxConnections: testBudget})
	for i := 0; i < 20; i++ {
		// A's agent may have the 503 and reset the app's connection
		// before its connect returns: a refusal either way.
		c, err := l.m.A.Dial(netip.AddrPortFrom(l.m.B.Pod.IP4, 8099))
		if err != nil {
			continue
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(c, "x")
		io.ReadAll(c)
		c.Close()
	}
	// A's app can see its reset before B's agent has counted the failed
	// app dial (19 of 20 counted once in a full make test, read at once).
	waitMetric(t, b.reg, "ambit_tunnel_connections_failed_total", map[string]string{"reason": "upstream_unreachable"}, 20)
	waitZero(t, a)
	waitZero(t, b)
	held, _ := hog(t, 30, func() (net.Conn, error) { return l.m.A.Dial(netip.AddrPortFrom(l.m.B.Pod.IP4, 8080)) })
	for _, c := range held {
		c.(*net.TCPConn).SetLinger(0)
		c.Close() // RST
	}
	waitZero(t, a)
	waitZero(t, b)
	held, _ = hog(t, 30, func() (net.Conn, error) { return l.m.A.Dial(netip.AddrPortFrom(l.m.B.Pod.IP4, 8080)) })
	if n, _ := a.px.Connections(); n != 30 {
		t.Fatalf("A's agent holds %d, want 30", n)
	}
	if n, _ := b.px.Connections(); n != 30 {
		t.Fatalf("B's agent holds %d, want 30", n)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	for _, ag := range []*shareAgent{b, a} {
		for _, sv := range ag.svs {
			sv.Close(ctx) // past the deadline: the live ones are cut
		}
	}
	waitZero(t, a)
	waitZero(t, b)
	closeAll(held)
}

// BenchmarkConnMemoryProcs measures what the connection share's cost per
// connection (connCost in share.go) stands for: the resident memory of
// both agents (processes, as the node agent runs; what GOMEMLIMIT and
// the cgroup limit see, GC slack included) per connection, with 500
// connections held idle after a round trip, doing 1 KiB round trips
// back to back, and streaming bulk data (64 KiB writes to a sink).
func BenchmarkConnMemoryProcs(b *testing.B) {
	testenv.RequireRoot(b)
	const N = 500
	rss := func(s benchkit.Setup) int64 {
		var sum int64
		for _, pid := range s.Pids {
			bs, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
			if err != nil {
				b.Fatal(err)
			}
			for _, ln := range strings.Split(string(bs), "\n") {
				if f := strings.Fields(ln); len(f) >= 2 && f[0] == "VmRSS:" {
					kb, _ := strconv.ParseInt(f[1], 10, 64)
					sum += kb << 10
				}
			}
		}
		return sum
	}
	for i := 0; i < b.N; i++ {
		for _, mode := range []string{"idle", "round trips", "bulk"} {
			s := benchkit.AmbitProcs(b)
			// Warm: the pooled connections exist.
			if _, _, err := benchkit.Latency(s, 100); err != nil {
				b.Fatal(err)
			}
			time.Sleep(500 * time.Millisecond)
			before := rss(s)
			var conns []net.Conn
			stop := make(chan struct{})
			var wg sync.WaitGroup
			for j := 0; j < N; j++ {
				port := uint16(benchkit.PortRR)
				if mode == "bulk" {
					port = benchkit.PortSink
				}
				c, err := s.Dial(port)
				if err != nil {
					b.Fatal(err)
				}
				conns = append(conns, c)
				buf := make([]byte, 1024)
				if mode == "bulk" {
					var hdr [8]byte
					binary.BigEndian.PutUint64(hdr[:], 1<<62)
					c.Write(hdr[:])
					buf = make([]byte, 64<<10)
				}
				if _, err := c.Write(buf[:1024]); err != nil {
					b.Fatal(err)
				}
				if mode != "bulk" {
					if _, err := io.ReadFull(c, buf[:1024]); err != nil {
						b.Fatal(err)
					}
				}
				if mode == "idle" {
					continue
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					for {
						select {
						case <-stop:
							return
						default:
						}
						if mode == "bulk" {
							if _, err := c.Write(buf); err != nil {
								return
							}
							continue
						}
						if _, err := c.Write(buf); err != nil {
							return
						}
						if _, err := io.ReadFull(c, buf); err != nil {
							return
						}
					}
				}()
			}
			time.Sleep(2 * time.Second)
			peak := rss(s)
			for k := 0; k < 4; k++ { // the highest of a few looks
				time.Sleep(500 * time.Millisecond)
				peak = max(peak, rss(s))
			}
			close(stop)
			for _, c := range conns {
				c.Close()
			}
			wg.Wait()
			per := float64(peak-before) / N
			fmt.Printf("%-12s %d connections: agents' RSS +%.1f MiB, %.1f KiB a connection (both agents), %.1f KiB a side\n",
				mode, N, float64(peak-before)/(1<<20), per/1024, per/2048)
			b.ReportMetric(per/2, "B/conn-side-"+strings.ReplaceAll(mode, " ", "-"))
		}
	}
}

// TestDefaultMaxConnections: with no setting the budget follows what the
// agent has: under the DaemonSet's memory limit (GOMEMLIMIT 1 GiB) and
// plenty of descriptors, 3/4 GiB at 32 KiB a connection, 24,576; with
// few descriptors, those.
func TestDefaultMaxConnections(t *testing.T) {
	old := debug.SetMemoryLimit(1 << 30)
	defer debug.SetMemoryLimit(old)
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
		t.Fatal(err)
	}
	n, from := tunnel.DefaultMaxConnections()
	t.Logf("RLIMIT_NOFILE %d: %d (%s)", rl.Cur, n, from)
	want := min(24576, (int(rl.Cur)-min(5120, int(rl.Cur)/2))/2)
	if n != max(want, 1024) || !strings.Contains(from, "GOMEMLIMIT (1024 MiB)") {
		t.Errorf("DefaultMaxConnections() = %d (%s), want %d", n, from, want)
	}
}
