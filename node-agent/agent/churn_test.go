package agent

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"runtime/pprof"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambit-mesh/ambit/e2e/lab"
	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/cluster"
	"github.com/ambit-mesh/ambit/node-agent/hostrules"
	"github.com/ambit-mesh/ambit/tunnel"
)

// churnCycles is how many times TestChurnLeavesNoResidue adds, uses and
// removes its pods: enough that one goroutine, descriptor or entry left
// per cycle stands far above the tolerances below.
const churnCycles = 30

// TestChurnLeavesNoResidue churns pods and connections through the real
// agent (the real CNI chain with the ambit-cni binary, the plugin socket,
// the real tunnel with mTLS, real host probe rules) and checks that what
// the agent holds comes back to where it was after a warm-up: goroutines,
// descriptors, network namespaces held, pods served, pooled HBONE
// connections, records, metric series, host rule entries, the live heap,
// and the node's links (a pod namespace kept alive keeps its veth on the
// node's bridge). The pods' own rules and conntrack go with their
// namespaces, which the links show.
//
// Each cycle: three enrolled pods and one not enrolled through CNI ADD;
// connections between them and to a resident pod (HBONE both ways,
// plaintext inbound from the unenrolled pod, passthrough to a server
// outside the mesh, a port nobody listens on, a client reset mid-stream
// and two reset before the tunnel is through, two from the resident pod
// held open across the deletions); then CNI DEL for three, and for the
// fourth its namespace removed without a DEL, the runtime's GC left to
// find it: on even cycles with the runtime's cache of it (libcni sends a
// DEL with a path that no longer exists, then GC), on odd ones without
// (GC alone: the agent's own gc path). Skipped when not root.
func TestChurnLeavesNoResidue(t *testing.T) {
	testenv.RequireRoot(t) // skips when not root: namespaces, veths, nftables
	cni := testenv.Binary(t, "ambit-cni")
	set := testenv.PluginSets(t)[1] // CNI 1.1.0 with GC
	reg := prometheus.NewRegistry()
	hr, hostNS := testHostRules(t, hostrules.Config{})
	var proxy *tunnel.Proxy
	h := startAgent(t, "", invAmbient, func(o *Options) {
		o.Host = hr
		o.Registerer = reg
		proxy = serveByRealTunnel(t, o, reg)
	})
	pol := h.a.Policy()
	h.inv.SetMeshed(func(p cluster.Pod, ns *cluster.Namespace) bool { return pol.Decide(p, ns).Enroll })

	c := newChurn(t, h, set, cni, netip.MustParsePrefix("10.97.0.0/23"))
	c.proxy, c.reg, c.hr, c.hostNS = proxy, reg, hr, hostNS
	// Resident: a pod that stays, so churned pods dial into it and it
	// dials churned pods (its pool then holds connections to peers that
	// go away).
	c.anchor = c.add("apps", "anchor")
	c.anchorApp = c.serve(c.anchor)
	t.Cleanup(c.anchorApp.Close)
	// Outside the mesh: a server in the node's own namespace, reached at
	// the pods' gateway (passthrough).
	c.outside = c.serveNode(7070)

	for i := range 2 { // warm-up: every kind of series, pool, cache exists
		c.cycle(i)
	}
	base := c.settle(nil)
	t.Logf("baseline: %s", base)
	start := time.Now()
	for i := 2; i < 2+churnCycles; i++ {
		c.cycle(i)
	}
	took := time.Since(start)
	after := c.settle(&base)
	t.Logf("after %d cycles (%v): %s", churnCycles, took.Round(time.Millisecond), after)
	for i := 0; i < 2+churnCycles; i++ {
		for _, name := range c.names(i) {
			if st, ok := h.a.statusSync.Wanted("apps", name); ok {
				t.Errorf("annotation of deleted pod apps/%s still kept (%q)", name, st)
			}
		}
	}
}

// churn is the test's node: the lab node and what lives through every
// cycle.
type churn struct {
	t         *testing.T
	h         *harness
	node      *lab.Node
	cni       *libcni.CNIConfig
	gw        netip.Addr
	proxy     *tunnel.Proxy
	reg       *prometheus.Registry
	hr        *hostrules.Manager
	hostNS    *testNetns
	anchor    *lab.Pod
	anchorApp *lab.App
	outside   net.Listener
	ownNet    uint64
}

func newChurn(t *testing.T, h *harness, set testenv.PluginSet, cniBin string, cidr netip.Prefix) *churn {
	node := labNode(t, h, set, cniBin, cidr, func(o *lab.NodeOptions) {
		o.PluginStderr = io.Discard // ambit-cni logs every ADD at info
	})
	dir := node.Opts.Dir
	var st syscall.Stat_t
	if err := syscall.Stat("/proc/thread-self/ns/net", &st); err != nil {
		t.Fatal(err)
	}
	exe := &invoke.DefaultExec{RawExec: &invoke.RawExec{Stderr: io.Discard}}
	return &churn{t: t, h: h, node: node, gw: cidr.Addr().Next(), ownNet: st.Ino,
		cni: libcni.NewCNIConfigWithCacheDir(node.Opts.PluginDirs, filepath.Join(dir, "cache"), exe)}
}

func (c *churn) names(i int) []string {
	return []string{fmt.Sprintf("srv-%d", i), fmt.Sprintf("cli-%d", i), fmt.Sprintf("gone-%d", i)}
}

func (c *churn) add(namespace, name string) *lab.Pod {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p, err := c.node.AddPod(ctx, namespace, name)
	if err != nil {
		c.t.Fatal(err)
	}
	return p
}

func (c *churn) serve(p *lab.Pod) *lab.App {
	c.t.Helper()
	a, err := p.ServeApp(p.Name, 8080)
	if err != nil {
		c.t.Fatal(err)
	}
	return a
}

// serveNode runs an echo server in the node's namespace on port: a
// destination outside the mesh.
func (c *churn) serveNode(port int) net.Listener {
	c.t.Helper()
	var l net.Listener
	err := c.node.NetNS.Do(func(ns.NetNS) error {
		var err error
		l, err = net.Listen("tcp", fmt.Sprintf(":%d", port))
		return err
	})
	if err != nil {
		c.t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			go func() { defer conn.Close(); testenv.Echo(conn) }()
		}
	}()
	c.t.Cleanup(func() { l.Close(); <-done })
	return l
}

// ask sends a line from p to dst and wants it back from app.
func (c *churn) ask(p *lab.Pod, dst netip.Addr, port uint16, app string) {
	c.t.Helper()
	r, err := p.Ask(context.Background(), netip.AddrPortFrom(dst, port), "hello")
	if err != nil || r.App != app || r.Echo != "hello" {
		c.t.Fatalf("%s → %v:%d: %+v %v", p.Name, dst, port, r, err)
	}
}

// dial connects from p to dst; the caller closes the connection.
func (c *churn) dial(p *lab.Pod, dst netip.Addr, port uint16) *net.TCPConn {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := p.Dial(ctx, netip.AddrPortFrom(dst, port))
	if err != nil {
		c.t.Fatalf("%s → %v:%d: %v", p.Name, dst, port, err)
	}
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	return conn.(*net.TCPConn)
}

// reset closes conn with an RST (SO_LINGER 0), as a client that dies.
func reset(conn *net.TCPConn) {
	conn.SetLinger(0)
	conn.Close()
}

func (c *churn) cycle(i int) {
	t := c.t
	names := c.names(i)
	srv, cli, gone := c.add("apps", names[0]), c.add("apps", names[1]), c.add("apps", names[2])
	out := c.add("legacy", fmt.Sprintf("out-%d", i)) // not enrolled
	srvApp, goneApp := c.serve(srv), c.serve(gone)

	// HBONE, mTLS: churned to churned, churned to resident, resident to
	// churned (twice each: the second rides the pooled connection).
	for range 2 {
		c.ask(cli, srv.IP, 8080, srv.Name)
		c.ask(cli, c.anchor.IP, 8080, "anchor")
		c.ask(srv, c.anchor.IP, 8080, "anchor")
		c.ask(c.anchor, srv.IP, 8080, srv.Name)
	}
	// Plaintext inbound (15006): from a pod outside the mesh.
	c.ask(out, srv.IP, 8080, srv.Name)
	// Passthrough: a destination outside the mesh.
	conn := c.dial(cli, c.gw, 7070)
	if _, err := io.WriteString(conn, "pass\n"); err != nil {
		t.Fatal(err)
	}
	if l, err := bufio.NewReader(conn).ReadString('\n'); err != nil || l != "pass\n" {
		t.Fatalf("passthrough: %q %v", l, err)
	}
	conn.Close()
	// Nobody listens: the server's agent answers 503, the client's
	// connection ends (or its connect: with the pooled connection warm,
	// the 503 can come before the handshake's last ACK is processed).
	dctx, dcancel := context.WithTimeout(context.Background(), 5*time.Second)
	if nc, err := cli.Dial(dctx, netip.AddrPortFrom(srv.IP, 9999)); err == nil {
		nc.SetDeadline(time.Now().Add(10 * time.Second))
		io.Copy(io.Discard, nc)
		nc.Close()
	}
	dcancel()
	// Reset before the tunnel is through, and mid-stream.
	reset(c.dial(cli, srv.IP, 8080))
	reset(c.dial(c.anchor, srv.IP, 8080))
	conn = c.dial(cli, srv.IP, 8080)
	if _, err := lab.AskOn(conn, "half"); err != nil {
		t.Fatal(err)
	}
	io.WriteString(conn, "no newline")
	reset(conn)
	// Open across the deletions, the cycle's end closes them: from the
	// resident pod (srv's DEL resets the one to srv, the GC the one to
	// gone, whose unmounted namespace lives while the agent holds it),
	// and from cli, whose
	// app still runs at its DEL, as with a runtime that deletes a live
	// container's network (under a kubelet its containers have stopped):
	// the DEL resets it before the primary plugin removes cli's
	// interface. Closed after that, it left an orphaned socket in cli's
	// namespace, which kept the namespace and its veth ~100 s.
	held := []*net.TCPConn{c.dial(c.anchor, gone.IP, 8080), c.dial(c.anchor, srv.IP, 8080), c.dial(cli, gone.IP, 8080)}
	for _, h := range held {
		if _, err := lab.AskOn(h, "held"); err != nil {
			t.Fatal(err)
		}
	}
	srvApp.Close()
	goneApp.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, p := range []*lab.Pod{srv, cli, out} {
		if err := p.Delete(ctx); err != nil {
			t.Fatal(err)
		}
	}
	// gone's sandbox goes without a DEL: its namespace is unmounted and
	// the runtime forgets it. Only the agent's handle can keep it alive.
	gone.NetNS.Close()
	run(t, "ip", "netns", "del", gone.NetnsName)
	if i%2 == 1 {
		// The runtime lost its cache of the sandbox too: only the GC's
		// valid list tells.
		matches, _ := filepath.Glob(filepath.Join(c.node.Opts.Dir, "cache", "results", "*-"+gone.ContainerID+"-*"))
		if len(matches) == 0 {
			t.Fatalf("no libcni cache entry for %s", gone.ContainerID)
		}
		for _, m := range matches {
			os.Remove(m)
		}
	}
	c.gc(ctx)
	for _, h := range held {
		h.Close()
	}
}

// gc is the runtime's CNI GC: the resident pod is the only valid
// attachment.
func (c *churn) gc(ctx context.Context) {
	c.t.Helper()
	args := &libcni.GCArgs{ValidAttachments: []types.GCAttachment{{ContainerID: c.anchor.ContainerID, IfName: "eth0"}}}
	err := c.node.NetNS.Do(func(ns.NetNS) error { return c.cni.GCNetworkList(ctx, c.node.Conf, args) })
	if err != nil {
		c.t.Fatalf("CNI GC: %v", err)
	}
}

// residue is what the agent holds at one moment.
type residue struct {
	goroutines int
	fds        map[string]int // by kind: socket, netns, anon, pipe, file
	foreignNet int            // threads left in another network namespace
	nodeLinks  int            // links in the node's namespace (veths of live pod namespaces)
	// served: pods the tunnel serves; held: connections it counts;
	// pool, active, pending: its gauges.
	served, held, pool, active, pending                       int
	byCID, byName, claims, liveFailed, kept, records, learned int
	series                                                    int
	hostEntries, hostRuleIPs                                  int
	heapKiB                                                   uint64
	stacks                                                    string
	sockets                                                   map[string]string // descriptor → its ends
	seriesKeys                                                map[string]bool
}

func (r residue) String() string {
	return fmt.Sprintf("goroutines %d, fds %v, threads in other netns %d, node links %d, served %d, conns held %d, pooled HBONE %d, active %d, pending handshakes %d, pods by CID %d, by name %d, netns claims %d, live-failed %d, kept %d, records %d, learned %d, metric series %d, host entries %d (IPs in the host ruleset %d), live heap %d KiB",
		r.goroutines, r.fds, r.foreignNet, r.nodeLinks, r.served, r.held, r.pool, r.active, r.pending, r.byCID, r.byName, r.claims, r.liveFailed, r.kept, r.records, r.learned, r.series, r.hostEntries, r.hostRuleIPs, r.heapKiB)
}

// over lists what r holds beyond base and its tolerance. The tolerances
// are fixed, never a function of the cycles: goroutines 4 (the runtime's
// and the test's own timers and finalizers come and go), descriptors 2
// of any one kind (a libcni exec in flight), metric series 4 (labels are
// identities, directions and reasons, bounded sets; a reset's reason
// depends on how far the tunnel got, and a rare one may first show after
// the warm-up), the live heap 1 MiB (a pooled connection's buffers are
// ~90 KiB, so one kept per cycle is 2.7 MiB after 30; the heap of a
// quiet test binary moves by ~100 KiB), everything else 0.
func (r residue) over(base residue) []string {
	var out []string
	check := func(what string, got, want, tol int) {
		if got > want+tol {
			out = append(out, fmt.Sprintf("%s %d, baseline %d (tolerance %d)", what, got, want, tol))
		}
	}
	check("goroutines", r.goroutines, base.goroutines, 4)
	kinds := map[string]bool{}
	for k := range r.fds {
		kinds[k] = true
	}
	for k := range base.fds {
		kinds[k] = true
	}
	for k := range kinds {
		tol := 2
		if k == "netns" {
			tol = 0
		}
		check("fds "+k, r.fds[k], base.fds[k], tol)
	}
	check("threads in another netns", r.foreignNet, base.foreignNet, 0)
	check("node links", r.nodeLinks, base.nodeLinks, 0)
	check("pods served", r.served, base.served, 0)
	check("connections held", r.held, base.held, 0)
	check("pooled HBONE connections", r.pool, base.pool, 0)
	check("active connections", r.active, base.active, 0)
	check("pending handshakes", r.pending, base.pending, 0)
	check("pods by container ID", r.byCID, base.byCID, 0)
	check("pods by name", r.byName, base.byName, 0)
	check("netns claims", r.claims, base.claims, 0)
	check("live-failed pods", r.liveFailed, base.liveFailed, 0)
	check("kept records", r.kept, base.kept, 0)
	check("records on disk", r.records, base.records, 0)
	check("learned pods", r.learned, base.learned, 0)
	check("metric series", r.series, base.series, 4)
	check("host rule entries", r.hostEntries, base.hostEntries, 0)
	check("IPs in the host ruleset", r.hostRuleIPs, base.hostRuleIPs, 0)
	check("live heap KiB", int(r.heapKiB), int(base.heapKiB), 1024)
	return out
}

var ipv4Re = regexp.MustCompile(`\b\d+\.\d+\.\d+\.\d+\b`)

func (c *churn) measure() residue {
	t := c.t
	t.Helper()
	var r residue
	// Twice: the second sweeps what the first found unreachable, so
	// HeapAlloc counts live objects only.
	runtime.GC()
	runtime.GC()
	r.goroutines = runtime.NumGoroutine()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	r.heapKiB = ms.HeapAlloc / 1024
	r.fds = map[string]int{}
	r.sockets = map[string]string{}
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		l, err := os.Readlink("/proc/self/fd/" + e.Name())
		if err != nil {
			continue // the directory's own descriptor, closed by now
		}
		switch {
		case strings.HasPrefix(l, "socket:"):
			r.fds["socket"]++
			r.sockets[e.Name()+" "+l] = sockEnds(e.Name())
		case strings.HasPrefix(l, "net:"):
			r.fds["netns"]++
		case strings.HasPrefix(l, "anon_inode:"):
			r.fds["anon"]++
		case strings.HasPrefix(l, "pipe:"):
			r.fds["pipe"]++
		case strings.HasPrefix(l, "/run/netns/"), strings.HasPrefix(l, "/var/run/netns/"):
			r.fds["netns"]++
		default:
			r.fds["file"]++
		}
	}
	tasks, _ := os.ReadDir("/proc/self/task")
	for _, tk := range tasks {
		var st syscall.Stat_t
		if syscall.Stat("/proc/self/task/"+tk.Name()+"/ns/net", &st) == nil && st.Ino != c.ownNet {
			r.foreignNet++
		}
	}
	out, err := exec.Command("ip", "-n", c.node.Opts.Name, "-o", "link", "show").Output()
	if err != nil {
		t.Fatal(err)
	}
	r.nodeLinks = strings.Count(string(out), "\n")

	r.served = len(c.proxy.ConnCounts())
	r.held, _ = c.proxy.Connections()
	r.pool = int(testenv.Metric(t, c.reg, "ambit_tunnel_hbone_pool_connections", nil))
	r.active = int(testenv.Metric(t, c.reg, "ambit_tunnel_active_connections", nil))
	r.pending = int(testenv.Metric(t, c.reg, "ambit_tunnel_pending_handshakes", nil))
	mfs, err := c.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	r.seriesKeys = map[string]bool{}
	for _, mf := range mfs {
		r.series += len(mf.GetMetric())
		for _, m := range mf.GetMetric() {
			k := mf.GetName()
			for _, lp := range m.GetLabel() {
				k += " " + lp.GetName() + "=" + lp.GetValue()
			}
			r.seriesKeys[k] = true
		}
	}

	a := c.h.a
	a.mu.Lock()
	r.byCID, r.byName, r.claims, r.liveFailed = len(a.byCID), len(a.byName), len(a.claims), len(a.liveFailed)
	for _, m := range a.kept {
		r.kept += len(m)
	}
	a.mu.Unlock()
	recs, _ := a.store.List()
	r.records = len(recs)
	r.learned = len(c.h.inv.LocalPods())

	r.hostEntries = len(c.hr.Entries())
	rs, err := exec.Command("ip", "netns", "exec", c.hostNS.name, "nft", "list", "ruleset").Output()
	if err != nil {
		t.Fatal(err)
	}
	r.hostRuleIPs = len(ipv4Re.FindAll(rs, -1))

	var buf bytes.Buffer
	pprof.Lookup("goroutine").WriteTo(&buf, 1)
	r.stacks = buf.String()
	return r
}

// settle waits for quiescence: with base nil, until two looks a second
// apart agree (the baseline); else until nothing is over base, failing
// with what still is after 20 s (drains end at drainTimeout, 2 s here;
// no idle timeout is shortened: nothing should need one).
func (c *churn) settle(base *residue) residue {
	c.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	prev := c.measure()
	for {
		time.Sleep(time.Second)
		r := c.measure()
		if base == nil {
			if len(r.over(prev)) == 0 && len(prev.over(r)) == 0 {
				return r
			}
		} else if len(r.over(*base)) == 0 {
			return r
		}
		if time.Now().After(deadline) {
			if base == nil {
				c.t.Fatalf("no quiet baseline after 20 s: %s, then %s", prev, r)
			}
			c.t.Errorf("residue after %d cycles:\n  %s\nbaseline: %s\nafter:    %s", churnCycles, strings.Join(r.over(*base), "\n  "), base, r)
			c.t.Logf("goroutines not in the baseline:\n%s", newStacks(base.stacks, r.stacks))
			var socks []string
			for k, v := range r.sockets {
				if _, ok := base.sockets[k]; !ok {
					socks = append(socks, k+": "+v)
				}
			}
			sort.Strings(socks)
			c.t.Logf("sockets not in the baseline:\n  %s", strings.Join(socks, "\n  "))
			var series []string
			for k := range r.seriesKeys {
				if !base.seriesKeys[k] {
					series = append(series, k)
				}
			}
			sort.Strings(series)
			links, _ := exec.Command("ip", "-n", c.node.Opts.Name, "-d", "-o", "link", "show").Output()
			c.t.Logf("node links:\n%s", links)

			c.t.Logf("metric series not in the baseline:\n  %s", strings.Join(series, "\n  "))
			return r
		}
		prev = r
	}
}

// newStacks lists the goroutine stacks (pprof debug=1 groups) whose count
// grew from before to after.
func newStacks(before, after string) string {
	parse := func(s string) map[string]int {
		out := map[string]int{}
		for _, blk := range strings.Split(s, "\n\n")[1:] {
			var n int
			if _, err := fmt.Sscanf(blk, "%d @", &n); err != nil {
				continue
			}
			if i := strings.Index(blk, "\n"); i >= 0 {
				out[blk[i+1:]] += n
			}
		}
		return out
	}
	b, a := parse(before), parse(after)
	var keys []string
	for k, n := range a {
		if n > b[k] {
			keys = append(keys, k)
		}
	}
	sort.Slice(keys, func(i, j int) bool { return a[keys[i]]-b[keys[i]] > a[keys[j]]-b[keys[j]] })
	var sb strings.Builder
	for i, k := range keys {
		if i == 5 {
			break
		}
		fmt.Fprintf(&sb, "+%d:\n%s\n", a[k]-b[k], k)
	}
	return sb.String()
}

// sockEnds names a socket descriptor of this process by its two ends.
func sockEnds(fd string) string {
	var n int
	fmt.Sscanf(fd, "%d", &n)
	str := func(sa syscall.Sockaddr) string {
		switch a := sa.(type) {
		case *syscall.SockaddrInet4:
			return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port)).String()
		case *syscall.SockaddrInet6:
			return netip.AddrPortFrom(netip.AddrFrom16(a.Addr), uint16(a.Port)).String()
		case *syscall.SockaddrUnix:
			return "unix:" + a.Name
		}
		return "?"
	}
	l, _ := syscall.Getsockname(n)
	p, _ := syscall.Getpeername(n)
	return str(l) + " → " + str(p)
}
