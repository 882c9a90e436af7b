package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
	"github.com/ambit-mesh/ambit/plugin/internal/nstest"
	"github.com/ambit-mesh/ambit/plugin/redirect"
	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	cniversion "github.com/containernetworking/cni/pkg/version"
	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
)

// responder is the minimal stand-in for the node agent: it enrolls pods
// of namespaces listed in enroll (installing their redirection, as the
// agent does since protocol version 2), skips the rest, and records what
// it got.
type responder struct {
	socket  string
	mu      sync.Mutex
	reqs    []cniproto.Request
	fds     int // requests that carried a netns fd
	enroll  map[string]bool
	spec    redirect.Spec
	delay   time.Duration
	errMsg  string
	addTook time.Duration // the last add's handling time (agent work)
}

func newResponder(t testing.TB, enroll ...string) *responder {
	t.Helper()
	r := &responder{socket: filepath.Join(t.TempDir(), "cni.sock"), enroll: map[string]bool{}, spec: redirect.DefaultSpec()}
	for _, n := range enroll {
		r.enroll[n] = true
	}
	l, err := cniproto.Listen(r.socket)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	srv := &cniproto.Server{Handler: r.handle, Timeout: 10 * time.Second}
	go func() { srv.Serve(ctx, l); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return r
}

func (r *responder) handle(ctx context.Context, req *cniproto.Request, netns *os.File) *cniproto.Response {
	start := time.Now()
	defer func() {
		if req.Op == cniproto.OpAdd {
			r.mu.Lock()
			r.addTook = time.Since(start)
			r.mu.Unlock()
		}
	}()
	if netns != nil {
		defer netns.Close()
	}
	r.mu.Lock()
	r.reqs = append(r.reqs, *req)
	if netns != nil {
		r.fds++
	}
	delay, errMsg, enroll, spec := r.delay, r.errMsg, r.enroll[req.Pod.Namespace], r.spec
	r.mu.Unlock()
	if delay > 0 {
		select {
		case <-time.After(delay):
		case <-ctx.Done():
		}
	}
	if errMsg != "" {
		return &cniproto.Response{Error: errMsg}
	}
	if req.Op == cniproto.OpGC {
		return &cniproto.Response{Decision: cniproto.Skip}
	}
	var sp *redirect.Spec
	if enroll && req.Op != cniproto.OpDel {
		sp = &spec
	}
	return r.netnsWork(req, netns, sp)
}

// netnsWork is the agent's part of a version 2 request, as the agent
// does it (node-agent/agent rulesAnswer, delWithRules): ADD installs the
// redirection, CHECK verifies it (or that a skipped pod has none), DEL
// removes it.
func (r *responder) netnsWork(req *cniproto.Request, f *os.File, sp *redirect.Spec) *cniproto.Response {
	fail := func(code uint, err error) *cniproto.Response {
		return &cniproto.Response{Error: err.Error(), Code: code}
	}
	ok := &cniproto.Response{Decision: cniproto.Skip}
	if sp != nil {
		ok = &cniproto.Response{Decision: cniproto.Enroll, Redirect: sp}
	}
	if f == nil || req.Version < 2 {
		// A version 1 plugin (an older binary under test) installs
		// itself.
		return ok
	}
	n, err := ns.GetNS(fmt.Sprintf("/proc/self/fd/%d", f.Fd()))
	if err != nil {
		return fail(cniproto.CodeIO, err)
	}
	defer n.Close()
	switch {
	case req.Op == cniproto.OpDel:
		if err := redirect.Uninstall(context.Background(), n); err != nil {
			return fail(cniproto.CodeIO, err)
		}
	case req.Op == cniproto.OpAdd && sp != nil:
		if _, err := redirect.Install(context.Background(), n, req.RuleBackend, *sp); err != nil {
			return fail(cniproto.CodeRedirect, fmt.Errorf("installing the redirection: %w", err))
		}
	case req.Op == cniproto.OpCheck && sp != nil:
		if err := redirect.Verify(context.Background(), n, *sp); err != nil {
			return fail(cniproto.CodeCheck, err)
		}
	case req.Op == cniproto.OpCheck:
		if found, err := redirect.Installed(context.Background(), n); err != nil || len(found) > 0 {
			return fail(cniproto.CodeCheck, fmt.Errorf("not enrolled but holds %v rules (%v)", found, err))
		}
	}
	return ok
}

// takeAddTime returns the last add's handling time and clears it.
func (r *responder) takeAddTime() time.Duration {
	r.mu.Lock()
	defer r.mu.Unlock()
	d := r.addTook
	r.addTook = 0
	return d
}

func (r *responder) ops() []cniproto.Op {
	r.mu.Lock()
	defer r.mu.Unlock()
	var ops []cniproto.Op
	for _, q := range r.reqs {
		ops = append(ops, q.Op)
	}
	return ops
}

func (r *responder) last() cniproto.Request {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.reqs[len(r.reqs)-1]
}

// fdCount is how many requests came with a network namespace's fd; read
// under the lock, as the agent's handler may still be counting.
func (r *responder) fdCount() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.fds
}

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// node is a network namespace standing in for a Kubernetes node: the CNI
// chain runs in it, so its bridge and addresses never touch the host.
type node struct {
	t       testing.TB
	ns      ns.NetNS
	set     testenv.PluginSet
	cni     *libcni.CNIConfig
	list    *libcni.NetworkConfigList
	ambit   map[string]any // our conflist entry, for direct runs
	bin     string
	subnet4 netip.Prefix
	subnet6 netip.Prefix
}

// nodeOpts shape the conflist.
type nodeOpts struct {
	backend    redirect.Backend
	withAmbit  bool
	socket     string
	extra      map[string]any
	cniVersion string
}

func sysctl(t testing.TB, n ns.NetNS, key, val string) {
	t.Helper()
	err := n.Do(func(ns.NetNS) error {
		return os.WriteFile(filepath.Join("/proc/sys", key), []byte(val), 0o644)
	})
	if err != nil {
		t.Fatalf("sysctl %s: %v", key, err)
	}
}

func newNode(t testing.TB, set testenv.PluginSet, o nodeOpts) *node {
	t.Helper()
	n := &node{t: t, ns: nstest.New(t, "node"), set: set}
	// No duplicate address detection: addresses are usable at once.
	sysctl(t, n.ns, "net/ipv6/conf/all/accept_dad", "0")
	sysctl(t, n.ns, "net/ipv6/conf/default/accept_dad", "0")
	err := n.ns.Do(func(ns.NetNS) error { return exec.Command("ip", "link", "set", "lo", "up").Run() })
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 2)
	rand.Read(b)
	n.subnet4 = netip.MustParsePrefix(fmt.Sprintf("10.%d.%d.0/24", 200+int(b[0])%50, b[1]))
	n.subnet6 = netip.MustParsePrefix(fmt.Sprintf("fd00:a:%x::/64", uint16(b[0])<<8|uint16(b[1])))
	version := o.cniVersion
	if version == "" {
		version = set.MaxCNIVersion
	}
	tmp := t.TempDir()
	plugins := []any{
		map[string]any{"type": "bridge", "bridge": "ambp" + randHex(4), "isGateway": true, "isDefaultGateway": true, "ipMasq": false,
			"ipam": map[string]any{"type": "host-local", "dataDir": filepath.Join(tmp, "ipam"),
				"ranges": []any{[]any{map[string]any{"subnet": n.subnet4.String()}}, []any{map[string]any{"subnet": n.subnet6.String()}}}}},
		map[string]any{"type": "portmap", "capabilities": map[string]bool{"portMappings": true}},
	}
	if o.withAmbit {
		n.bin = testenv.Binary(t, "ambit-cni")
		n.ambit = map[string]any{"type": "ambit-cni", "agentSocket": o.socket, "logFile": filepath.Join(tmp, "cni.log"),
			"snapshotFile": filepath.Join(tmp, "snapshot.json"), "ruleBackend": string(o.backend), "agentTimeout": "10s", "logLevel": "warn"}
		for k, v := range o.extra {
			n.ambit[k] = v
		}
		plugins = append(plugins, n.ambit)
	}
	conf, _ := json.Marshal(map[string]any{"cniVersion": version, "name": "ambit-test", "plugins": plugins})
	list, err := libcni.ConfListFromBytes(conf)
	if err != nil {
		t.Fatal(err)
	}
	n.list = list
	path := []string{set.Dir}
	if n.bin != "" {
		path = append(path, filepath.Dir(n.bin))
	}
	// The exec is given here: with nil, libcni (v1.3.1 ensureExec)
	// creates its default on first use without a lock, a data race in the
	// test, not the plugin, when the first ADDs run concurrently
	// (TestConcurrentAdds under -race).
	exe := &invoke.DefaultExec{RawExec: &invoke.RawExec{Stderr: os.Stderr}, PluginDecoder: cniversion.PluginDecoder{}}
	n.cni = libcni.NewCNIConfigWithCacheDir(path, filepath.Join(tmp, "cache"), exe)
	return n
}

// pod is one sandbox: its netns and runtime identity.
type pod struct {
	ns        ns.NetNS
	name      string // netns name
	rt        *libcni.RuntimeConf
	namespace string
	result    *current.Result
	ip4, ip6  netip.Addr
}

func (n *node) newPod(namespace string) *pod {
	n.t.Helper()
	name := nstest.Name("pod")
	netns, err := nstest.Create(name)
	if err != nil {
		n.t.Fatal(err)
	}
	n.t.Cleanup(func() { nstest.Delete(netns, name) })
	p := &pod{ns: netns, name: name, namespace: namespace}
	sysctl(n.t, netns, "net/ipv6/conf/all/accept_dad", "0")
	sysctl(n.t, netns, "net/ipv6/conf/default/accept_dad", "0")
	// The runtime brings lo up before any plugin runs.
	if err := netns.Do(func(ns.NetNS) error { return exec.Command("ip", "link", "set", "lo", "up").Run() }); err != nil {
		n.t.Fatal(err)
	}
	p.rt = &libcni.RuntimeConf{ContainerID: "ctr-" + randHex(8), NetNS: netns.Path(), IfName: "eth0",
		Args: [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", namespace}, {"K8S_POD_NAME", "pod-" + randHex(3)}, {"K8S_POD_UID", randHex(8)}, {"K8S_POD_INFRA_CONTAINER_ID", "infra"}}}
	return p
}

// in runs f with the calling thread in the node namespace, so the
// plugins libcni execs start there.
func (n *node) in(f func() error) error {
	return n.ns.Do(func(ns.NetNS) error { return f() })
}

func (n *node) add(p *pod) error {
	var res types.Result
	err := n.in(func() error {
		var err error
		res, err = n.cni.AddNetworkList(context.Background(), n.list, p.rt)
		return err
	})
	if err != nil {
		return err
	}
	p.result, err = current.NewResultFromResult(res)
	if err != nil {
		return err
	}
	for _, ip := range p.result.IPs {
		a, _ := netip.AddrFromSlice(ip.Address.IP)
		if a.Unmap().Is4() {
			p.ip4 = a.Unmap()
		} else {
			p.ip6 = a
		}
	}
	return nil
}

func (n *node) del(p *pod) error {
	return n.in(func() error { return n.cni.DelNetworkList(context.Background(), n.list, p.rt) })
}

func (n *node) check(p *pod) error {
	return n.in(func() error { return n.cni.CheckNetworkList(context.Background(), n.list, p.rt) })
}

// runAmbit execs ambit-cni alone, as a runtime would, with conf as stdin;
// it returns stdout and the CNI error the plugin printed, if any.
func runAmbit(t testing.TB, bin, command string, conf []byte, env ...string) ([]byte, *types.Error) {
	t.Helper()
	cmd := exec.Command(bin)
	cmd.Env = append([]string{"CNI_COMMAND=" + command, "CNI_IFNAME=eth0", "CNI_PATH=/nonexistent", "PATH=" + os.Getenv("PATH")}, env...)
	cmd.Stdin = bytes.NewReader(conf)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err == nil {
		return stdout.Bytes(), nil
	}
	var e types.Error
	if jerr := json.Unmarshal(stdout.Bytes(), &e); jerr != nil {
		t.Fatalf("ambit-cni %s failed without a CNI error on stdout: %v\nstdout: %s\nstderr: %s", command, err, stdout.String(), stderr.String())
	}
	if e.Msg == "" {
		t.Fatalf("CNI error without a message: %s", stdout.String())
	}
	return stdout.Bytes(), &e
}

// directConf is our conflist entry with prevResult, as the runtime builds
// it for the last plugin of the chain.
func (n *node) directConf(p *pod, mutate func(map[string]any)) []byte {
	n.t.Helper()
	m := map[string]any{"cniVersion": n.list.CNIVersion, "name": "ambit-test"}
	for k, v := range n.ambit {
		m[k] = v
	}
	if p != nil && p.result != nil {
		res, err := p.result.GetAsVersion(n.list.CNIVersion)
		if err != nil {
			n.t.Fatal(err)
		}
		var buf bytes.Buffer
		res.PrintTo(&buf)
		var raw map[string]any
		json.Unmarshal(buf.Bytes(), &raw)
		m["prevResult"] = raw
	}
	if mutate != nil {
		mutate(m)
	}
	b, _ := json.Marshal(m)
	return b
}

func (p *pod) env(netns string) []string {
	args := ""
	for _, a := range p.rt.Args {
		args += a[0] + "=" + a[1] + ";"
	}
	if netns == "" {
		netns = p.rt.NetNS
	}
	return []string{"CNI_CONTAINERID=" + p.rt.ContainerID, "CNI_NETNS=" + netns, "CNI_ARGS=" + args}
}

// noRules asserts the pod netns holds nothing of ours.
func noRules(t testing.TB, p *pod) {
	t.Helper()
	found, err := redirect.Installed(context.Background(), p.ns)
	if err != nil {
		t.Fatal(err)
	}
	if len(found) != 0 {
		t.Fatalf("pod netns holds %v rules, want none", found)
	}
	err = p.ns.Do(func(ns.NetNS) error {
		out, err := exec.Command("ip", "rule").CombinedOutput()
		if bytes.Contains(out, []byte("lookup 100")) {
			return fmt.Errorf("ip rule still routes to table 100:\n%s", out)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
}

// --- sockets ---

type accepted struct {
	port int
	conn *net.TCPConn
}

// listenAll opens TCP listeners on ports (both families) inside netns and
// reports every accepted connection on the returned channel.
func listenAll(t testing.TB, netns ns.NetNS, ports ...int) <-chan accepted {
	t.Helper()
	ch := make(chan accepted, 16)
	for _, port := range ports {
		for _, network := range []string{"tcp4", "tcp6"} {
			var l net.Listener
			err := netns.Do(func(ns.NetNS) error {
				var err error
				l, err = net.Listen(network, fmt.Sprintf(":%d", port))
				return err
			})
			if err != nil {
				t.Fatalf("listen %s :%d: %v", network, port, err)
			}
			t.Cleanup(func() { l.Close() })
			go func(port int) {
				for {
					c, err := l.Accept()
					if err != nil {
						return
					}
					ch <- accepted{port, c.(*net.TCPConn)}
				}
			}(port)
		}
	}
	return ch
}

func expectAccept(t testing.TB, ch <-chan accepted, port int, what string) *net.TCPConn {
	t.Helper()
	select {
	case a := <-ch:
		t.Cleanup(func() { a.conn.Close() })
		if a.port != port {
			t.Fatalf("%s: landed on port %d, want %d", what, a.port, port)
		}
		return a.conn
	case <-time.After(5 * time.Second):
		t.Fatalf("%s: no connection arrived on port %d", what, port)
	}
	return nil
}

// dialFrom connects from inside netns, optionally from a fixed source
// address and with SO_MARK.
func dialFrom(t testing.TB, netns ns.NetNS, src netip.Addr, mark int, dst netip.AddrPort) net.Conn {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second}
	if src.IsValid() {
		d.LocalAddr = &net.TCPAddr{IP: src.AsSlice()}
	}
	if mark != 0 {
		d.Control = func(_, _ string, c syscall_RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, mark) })
			if err != nil {
				return err
			}
			return serr
		}
	}
	var c net.Conn
	err := netns.Do(func(ns.NetNS) error {
		var err error
		c, err = d.Dial("tcp", dst.String())
		return err
	})
	if err != nil {
		t.Fatalf("dial %s from %s: %v", dst, src, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// originalDst reads SO_ORIGINAL_DST (IP6T_SO_ORIGINAL_DST for IPv6): the
// destination before REDIRECT rewrote it.
func originalDst(t testing.TB, c *net.TCPConn) netip.AddrPort {
	t.Helper()
	raw, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	local := c.LocalAddr().(*net.TCPAddr).AddrPort().Addr()
	var out netip.AddrPort
	var serr error
	raw.Control(func(fd uintptr) {
		var buf [28]byte
		l := uint32(len(buf))
		level := unix.SOL_IP
		if !local.Unmap().Is4() {
			level = unix.SOL_IPV6
		}
		_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, fd, uintptr(level), 80, uintptr(unsafePointer(&buf[0])), uintptr(unsafePointer(&l)), 0)
		if e != 0 {
			serr = e
			return
		}
		port := uint16(buf[2])<<8 | uint16(buf[3])
		if level == unix.SOL_IP {
			out = netip.AddrPortFrom(netip.AddrFrom4([4]byte(buf[4:8])), port)
		} else {
			out = netip.AddrPortFrom(netip.AddrFrom16([16]byte(buf[8:24])), port)
		}
	})
	if serr != nil {
		t.Fatalf("SO_ORIGINAL_DST: %v", serr)
	}
	return out
}
