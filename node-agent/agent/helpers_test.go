package agent

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"k8s.io/client-go/kubernetes"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/config"
	"github.com/ambit-mesh/ambit/node-agent/hostrules"
	"github.com/ambit-mesh/ambit/node-agent/inventory"
	"github.com/ambit-mesh/ambit/node-agent/kube"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
	"github.com/ambit-mesh/ambit/plugin/redirect"
	"github.com/ambit-mesh/ambit/tunnel"
)

// echoTunnel stands in for the tunnel: every accepted connection gets
// "captured:<port>\n" and then its lines echoed back, so a test can tell
// captured from plaintext traffic and see a drained connection still work.
type echoTunnel struct {
	mu    sync.Mutex
	live  int
	total int
}

type echoServing struct {
	t     *echoTunnel
	lns   []net.Listener
	wg    sync.WaitGroup
	mu    sync.Mutex
	conns map[net.Conn]struct{}
	done  chan struct{}
}

func (e *echoTunnel) Serve(p tunnel.Pod) (Serving, error) {
	s := &echoServing{t: e, lns: []net.Listener{p.Outbound, p.Inbound, p.HBONE}, conns: map[net.Conn]struct{}{}, done: make(chan struct{})}
	e.mu.Lock()
	e.live++
	e.total++
	e.mu.Unlock()
	for _, l := range s.lns {
		s.wg.Add(1)
		go s.accept(l)
	}
	return s, nil
}

func (e *echoTunnel) Live() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.live
}

func (s *echoServing) accept(l net.Listener) {
	defer s.wg.Done()
	_, port, _ := net.SplitHostPort(l.Addr().String())
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		s.conns[c] = struct{}{}
		s.mu.Unlock()
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer func() { s.mu.Lock(); delete(s.conns, c); s.mu.Unlock(); c.Close() }()
			fmt.Fprintf(c, "captured:%s\n", port)
			testenv.Echo(c)
		}()
	}
}

func (s *echoServing) Close(ctx context.Context) error {
	for _, l := range s.lns {
		l.Close()
	}
	go func() { s.wg.Wait(); close(s.done) }()
	select {
	case <-s.done:
	case <-ctx.Done():
		s.mu.Lock()
		for c := range s.conns {
			c.Close()
		}
		s.mu.Unlock()
		<-s.done
	}
	s.t.mu.Lock()
	s.t.live--
	s.t.mu.Unlock()
	return nil
}

func suffix() string {
	b := make([]byte, 4)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// testNetns is a named network namespace (amb-agt-*), removed at cleanup.
// migrateReq reads net.ipv4.tcp_migrate_req inside n.
func migrateReq(t *testing.T, n *testNetns) string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "exec", n.name, "sysctl", "-n", "net.ipv4.tcp_migrate_req").CombinedOutput()
	if err != nil {
		t.Fatalf("%v %s", err, out)
	}
	return strings.TrimSpace(string(out))
}

type testNetns struct {
	name string
	path string
	file *os.File
}

// newNetns creates a netns with lo up and addrs on lo (a pod whose IP
// only needs to be found, not routed).
func newNetns(t testing.TB, addrs ...string) *testNetns {
	t.Helper()
	name := "amb-agt-" + suffix()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer orig.Close()
	h, err := netns.NewNamed(name)
	if err != nil {
		t.Fatal(err)
	}
	defer netns.Set(orig)
	h.Close()
	t.Cleanup(func() { netns.DeleteNamed(name) })
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	netlink.LinkSetUp(lo)
	for _, a := range addrs {
		pfx, err := netlink.ParseAddr(a)
		if err != nil {
			t.Fatal(err)
		}
		if err := netlink.AddrAdd(lo, pfx); err != nil {
			t.Fatal(err)
		}
	}
	n := &testNetns{name: name, path: "/var/run/netns/" + name}
	if n.file, err = os.Open(n.path); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.file.Close() })
	return n
}

func run(t testing.TB, argv ...string) {
	t.Helper()
	if out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(argv, " "), err, out)
	}
}

// newPair creates a pod netns (podIP/24 on a veth) and a peer netns
// (peerIP) on the other end, running a plaintext server on peerIP:8080
// that answers "plain\n".
func newPair(t testing.TB, podIP, peerIP string) (pod, peer *testNetns) {
	t.Helper()
	pod, peer = newNetns(t), newNetns(t)
	a, b := "va"+suffix()[:6], "vb"+suffix()[:6]
	run(t, "ip", "link", "add", a, "netns", pod.name, "type", "veth", "peer", "name", b, "netns", peer.name)
	run(t, "ip", "-n", pod.name, "addr", "add", podIP+"/24", "dev", a)
	run(t, "ip", "-n", peer.name, "addr", "add", peerIP+"/24", "dev", b)
	run(t, "ip", "-n", pod.name, "link", "set", a, "up")
	run(t, "ip", "-n", peer.name, "link", "set", b, "up")
	serveLines(t, peer, peerIP+":8080", "plain")
	return pod, peer
}

// serveLines runs an app in n on addr, until the test ends: each
// connection gets greeting and a newline, then its lines echoed back, so
// a test tells the app's answer from the capture's ("captured:<port>").
func serveLines(t testing.TB, n *testNetns, addr, greeting string) {
	t.Helper()
	testenv.ServeInNetns(t, n.name, addr, greeting, testenv.Echo)
}

// testHostRules is a host-rule Manager on a netns of its own standing in
// for the host's, returned with it for the tests that look at the
// kernel's rules there; cfg gives the backend and the run bound. IPv4
// only, as the tests' pods are, and a reconcile pass an hour apart: in a
// test the rules change by its ADDs and DELs, not by a pass that would
// repair what the test broke on purpose.
func testHostRules(t *testing.T, cfg hostrules.Config) (*hostrules.Manager, *testNetns) {
	t.Helper()
	hostNS := newNetns(t)
	cfg.IPv4Only, cfg.Interval = true, time.Hour
	cfg.NetNS, cfg.Logger = netns.NsHandle(hostNS.file.Fd()), quietLogger()
	hr, err := hostrules.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { hr.Uninstall() })
	return hr, hostNS
}

// serveByRealTunnel has startAgent serve its pods with the real tunnel
// (mTLS by a test CA), its directory o.View as startAgent made it and its
// metrics in reg. Call it before replacing o.View: the tunnel looks pods
// up in the inventory, not in the test's view.
func serveByRealTunnel(t *testing.T, o *Options, reg prometheus.Registerer) *tunnel.Proxy {
	t.Helper()
	p, err := tunnel.New(tunnel.Config{Directory: o.View, Certificates: newTestCA(t), Logger: quietLogger(), Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	o.Tunnel = ProxyTunnel{Proxy: p}
	return p
}

// inNetns runs fn on a locked thread inside n (sockets made there stay
// in n).
func inNetns(t testing.TB, n *testNetns, fn func() error) {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// Unlocked only once back home: a thread left in another netns
		// must die with the goroutine. Not left there even so: when that
		// thread is the main one the runtime parks it instead, and
		// /proc/self/ns/net would name the pod for the rest of the run.
		orig, err := netns.Get()
		if err != nil {
			errc <- err
			return
		}
		defer orig.Close()
		if err := netns.Set(netns.NsHandle(n.file.Fd())); err != nil {
			errc <- err
			return
		}
		err = fn()
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

// dialFrom connects from inside n and returns the first line read.
func dialFrom(t testing.TB, n *testNetns, addr string) (net.Conn, string, error) {
	t.Helper()
	var c net.Conn
	var err error
	inNetns(t, n, func() error {
		c, err = net.DialTimeout("tcp", addr, 2*time.Second)
		return nil
	})
	if err != nil {
		return nil, "", err
	}
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	c.SetReadDeadline(time.Time{})
	if err != nil {
		c.Close()
		return nil, "", err
	}
	return c, strings.TrimSpace(line), nil
}

// harness is an in-process agent on a static inventory.
type harness struct {
	t       testing.TB
	a       *Agent
	inv     *inventory.Source
	tun     *echoTunnel
	dir     string
	invPath string
	sock    string
	cancel  context.CancelFunc
	done    chan error
}

func testConfig(dir, invPath string) config.Config {
	c := config.Default()
	c.NodeName = "node-a"
	c.Source = config.SourceInventory
	c.InventoryFile = invPath
	c.StateDir = dir
	c.Socket = filepath.Join(dir, "cni.sock")
	c.SnapshotFile = filepath.Join(dir, "enrollment-snapshot.json")
	c.HealthAddr = ""
	c.DrainTimeout = config.Duration{Duration: 2 * time.Second}
	c.LogLevel = "warn"
	return c
}

// agentDir makes a state directory for agents, removed at the end. It is
// under /tmp, not t.TempDir: the plugin socket's path inside it must stay
// short.
func agentDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "amb-agt-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// startAgent runs an agent on dir (created if empty) with inventory body.
func startAgent(t testing.TB, dir, inv string, opts ...func(*Options)) *harness {
	t.Helper()
	if dir == "" {
		dir = agentDir(t)
	}
	h := &harness{t: t, dir: dir, invPath: filepath.Join(dir, "inventory.yaml"), sock: filepath.Join(dir, "cni.sock"), tun: &echoTunnel{}}
	if inv != "" {
		if err := os.WriteFile(h.invPath, []byte(inv), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	cfg := testConfig(dir, h.invPath)
	if err := cfg.Finish(); err != nil {
		t.Fatal(err)
	}
	src, err := inventory.Load(inventory.Options{Path: h.invPath, NodeName: cfg.NodeName, EnrollLabel: cfg.EnrollLabel})
	if err != nil {
		t.Fatal(err)
	}
	h.inv = src
	o := Options{Config: cfg, View: src, Status: src, Tunnel: h.tun, Logger: quietLogger()}
	for _, fn := range opts {
		fn(&o)
	}
	h.a, err = New(o)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	h.done = make(chan error, 1)
	go func() { h.done <- h.a.Run(ctx) }()
	select {
	case <-h.a.Ready():
	case err := <-h.done:
		t.Fatalf("agent stopped: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("agent not ready within 30s")
	}
	t.Cleanup(h.stop)
	return h
}

func (h *harness) stop() {
	if h.cancel == nil {
		return
	}
	h.cancel()
	h.cancel = nil
	if err := <-h.done; err != nil {
		h.t.Errorf("agent: %v", err)
	}
}

func (h *harness) call(op cniproto.Op, ns, name, cid string, n *testNetns, ips ...string) (*cniproto.Response, error) {
	return h.callBackend("", op, ns, name, cid, n, ips...)
}

// callBackend is call from a plugin that installs the pod's rules with
// backend (its RuleBackend; "" is a plugin of before the field).
func (h *harness) callBackend(backend redirect.Backend, op cniproto.Op, ns, name, cid string, n *testNetns, ips ...string) (*cniproto.Response, error) {
	req := &cniproto.Request{Version: cniproto.Version, Op: op, RuleBackend: backend,
		Pod: cniproto.Pod{Namespace: ns, Name: name, UID: "uid-" + name, ContainerID: cid}}
	for _, ip := range ips {
		req.Pod.IPs = append(req.Pod.IPs, netip.MustParsePrefix(ip))
	}
	var f *os.File
	if n != nil {
		req.Pod.Netns = n.path
		f = n.file
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return cniproto.Call(ctx, h.sock, req, f)
}

func (h *harness) writeInventory(body string) {
	h.t.Helper()
	tmp := h.invPath + ".tmp"
	if err := os.WriteFile(tmp, []byte(body), 0o600); err != nil {
		h.t.Fatal(err)
	}
	if err := os.Rename(tmp, h.invPath); err != nil {
		h.t.Fatal(err)
	}
}

// eventually polls cond until it holds or 15s pass.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		if cond() {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", what)
}

// quietLogger logs warnings and errors only, so test output stays readable.
func quietLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// syncedSource is a kube.Source of node-a over client, started and
// synced before it returns, so that the agent's first pass already sees
// the client's objects. The returned ctx is the source's; both end with
// the test.
func syncedSource(t testing.TB, client kubernetes.Interface) (*kube.Source, context.Context) {
	t.Helper()
	src, err := kube.New(kube.Config{Client: client, NodeName: "node-a", Logger: quietLogger()})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() { cancel(); src.Close() })
	src.Start(ctx)
	if err := src.WaitSynced(ctx); err != nil {
		t.Fatal(err)
	}
	return src, ctx
}

func (a *Agent) podByName(key string) *pod {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.byName[key]
}

// pinCounter is a Prefetcher that counts pins per identity.
type pinCounter struct {
	mu   sync.Mutex
	pins map[string]int
}

func (c *pinCounter) Prefetch(id string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.pins == nil {
		c.pins = map[string]int{}
	}
	c.pins[id]++
	return nil
}

func (c *pinCounter) Forget(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.pins[id]--
}

func (c *pinCounter) total() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, v := range c.pins {
		n += v
	}
	return n
}

// netInterfaces names the first non-loopback link of the current netns.
func netInterfaces() (string, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return "", err
	}
	for _, l := range links {
		if l.Attrs().Name != "lo" {
			return l.Attrs().Name, nil
		}
	}
	return "", fmt.Errorf("no link besides lo")
}

// link joins two test namespaces with a veth pair, addrA on a's end and
// addrB on b's.
func link(t testing.TB, a, b *testNetns, addrA, addrB string) {
	t.Helper()
	ea, eb := "ambl-"+suffix(), "ambl-"+suffix()
	run(t, "ip", "link", "add", ea, "netns", a.name, "type", "veth", "peer", "name", eb, "netns", b.name)
	run(t, "ip", "-n", a.name, "addr", "add", addrA, "dev", ea)
	run(t, "ip", "-n", b.name, "addr", "add", addrB, "dev", eb)
	run(t, "ip", "-n", a.name, "link", "set", ea, "up")
	run(t, "ip", "-n", b.name, "link", "set", eb, "up")
}
