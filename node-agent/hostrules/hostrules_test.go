package hostrules

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/vishvananda/netns"

	"github.com/ambit-mesh/ambit/internal/testenv"
)

// topo is three network namespaces: "host" (where the Manager runs, like
// the node), "pod" (an enrolled pod behind a veth) and "remote" (another
// machine whose traffic the host forwards to the pod).
type topo struct {
	host, pod, remote       string
	hostNS, podNS, remoteNS netns.NsHandle
}

func run(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

func newTopo(t *testing.T) *topo {
	t.Helper()
	testenv.RequireRoot(t)
	b := make([]byte, 4)
	rand.Read(b)
	sfx := hex.EncodeToString(b)
	tp := &topo{host: "amb-kub-h-" + sfx, pod: "amb-kub-p-" + sfx, remote: "amb-kub-r-" + sfx}
	for _, n := range []string{tp.host, tp.pod, tp.remote} {
		run(t, "ip", "netns", "add", n)
		n := n
		t.Cleanup(func() { exec.Command("ip", "netns", "del", n).Run() })
	}
	h, p, r := tp.host, tp.pod, tp.remote
	for _, c := range [][]string{
		{"ip", "-n", h, "link", "set", "lo", "up"},
		{"ip", "-n", p, "link", "set", "lo", "up"},
		{"ip", "-n", r, "link", "set", "lo", "up"},
		{"ip", "-n", h, "link", "add", "to-pod", "type", "veth", "peer", "name", "eth0", "netns", p},
		{"ip", "-n", h, "link", "add", "to-remote", "type", "veth", "peer", "name", "eth0", "netns", r},
		{"ip", "-n", h, "addr", "add", "10.77.1.1/24", "dev", "to-pod"},
		{"ip", "-n", h, "addr", "add", "fd00:77:1::1/64", "dev", "to-pod", "nodad"},
		{"ip", "-n", h, "addr", "add", "10.77.2.1/24", "dev", "to-remote"},
		{"ip", "-n", p, "addr", "add", "10.77.1.2/24", "dev", "eth0"},
		{"ip", "-n", p, "addr", "add", "10.77.1.3/24", "dev", "eth0"}, // not enrolled
		{"ip", "-n", p, "addr", "add", "fd00:77:1::2/64", "dev", "eth0", "nodad"},
		{"ip", "-n", r, "addr", "add", "10.77.2.2/24", "dev", "eth0"},
		{"ip", "-n", h, "link", "set", "to-pod", "up"},
		{"ip", "-n", h, "link", "set", "to-remote", "up"},
		{"ip", "-n", p, "link", "set", "eth0", "up"},
		{"ip", "-n", r, "link", "set", "eth0", "up"},
		{"ip", "-n", p, "route", "add", "default", "via", "10.77.1.1"},
		{"ip", "-n", p, "-6", "route", "add", "default", "via", "fd00:77:1::1"},
		{"ip", "-n", r, "route", "add", "default", "via", "10.77.2.1"},
		{"ip", "netns", "exec", h, "sysctl", "-qw", "net.ipv4.ip_forward=1"},
	} {
		run(t, c...)
	}
	var err error
	for _, x := range []struct {
		name string
		h    *netns.NsHandle
	}{{h, &tp.hostNS}, {p, &tp.podNS}, {r, &tp.remoteNS}} {
		if *x.h, err = netns.GetFromName(x.name); err != nil {
			t.Fatal(err)
		}
		hh := *x.h
		t.Cleanup(func() { hh.Close() })
	}
	return tp
}

// inNS runs fn on a thread inside ns; sockets created there stay there.
func inNS(t *testing.T, ns netns.NsHandle, fn func()) {
	t.Helper()
	if err := testenv.RunInNetns(ns, func() error { fn(); return nil }); err != nil {
		t.Error(err)
	}
}

// server listens in the pod on every address and reports each client's
// source address back over the connection.
func (tp *topo) server(t *testing.T) {
	var ln net.Listener
	inNS(t, tp.podNS, func() {
		var err error
		ln, err = net.Listen("tcp", ":8080")
		if err != nil {
			t.Error(err)
		}
	})
	if ln == nil {
		t.FailNow()
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			fmt.Fprint(c, c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap())
			c.Close()
		}
	}()
}

// sourceSeen connects from ns to dst and returns the source the pod saw.
func sourceSeen(t *testing.T, ns netns.NsHandle, dst string) string {
	t.Helper()
	var c net.Conn
	var err error
	inNS(t, ns, func() {
		d := net.Dialer{Timeout: 5 * time.Second}
		c, err = d.Dial("tcp", dst)
	})
	if err != nil {
		t.Fatalf("dial %s: %v", dst, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read from %s: %v", dst, err)
	}
	return string(b)
}

func newManager(t *testing.T, tp *topo, backend string) (*Manager, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	m, err := New(Config{Backend: backend, NetNS: tp.hostNS, Interval: 50 * time.Millisecond, Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Uninstall() })
	return m, reg
}

var (
	podV4  = netip.MustParseAddr("10.77.1.2")
	podV6  = netip.MustParseAddr("fd00:77:1::2")
	probe4 = "169.254.7.127"
	probe6 = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"
)

func backends() []struct{ name, backend, flush string } {
	return []struct{ name, backend, flush string }{
		{"nftables", BackendNFTables, "nft flush ruleset"},
		{"iptables-nft", "iptables-nft", "iptables-nft -t nat -F"},
		{"iptables-legacy", "iptables-legacy", "iptables-legacy -t nat -F"},
	}
}

func TestProbeSNATOnlyForLocalTrafficToEnrolledPods(t *testing.T) {
	for _, bc := range backends() {
		t.Run(bc.name, func(t *testing.T) {
			tp := newTopo(t)
			tp.server(t)
			m, _ := newManager(t, tp, bc.backend)
			if got := m.Backend(); got != bc.backend {
				t.Fatalf("backend = %s", got)
			}
			// Before enrollment the host's own address is seen.
			if got := sourceSeen(t, tp.hostNS, "10.77.1.2:8080"); got != "10.77.1.1" {
				t.Fatalf("before Add: source %s", got)
			}
			if err := m.Add("uid-1", []netip.Addr{podV4, podV6}); err != nil {
				t.Fatal(err)
			}
			if got := sourceSeen(t, tp.hostNS, "10.77.1.2:8080"); got != probe4 {
				t.Fatalf("local v4 probe: source %s, want %s", got, probe4)
			}
			if got := sourceSeen(t, tp.hostNS, "[fd00:77:1::2]:8080"); got != probe6 {
				t.Fatalf("local v6 probe: source %s, want %s", got, probe6)
			}
			// Forwarded traffic keeps its source.
			if got := sourceSeen(t, tp.remoteNS, "10.77.1.2:8080"); got != "10.77.2.2" {
				t.Fatalf("forwarded: source %s, want 10.77.2.2", got)
			}
			// An address of the pod that is not in the set is untouched.
			if got := sourceSeen(t, tp.hostNS, "10.77.1.3:8080"); got != "10.77.1.1" {
				t.Fatalf("not enrolled IP: source %s", got)
			}
			if err := m.Remove("uid-1", []netip.Addr{podV4, podV6}); err != nil {
				t.Fatal(err)
			}
			if got := sourceSeen(t, tp.hostNS, "10.77.1.2:8080"); got != "10.77.1.1" {
				t.Fatalf("after Remove: source %s", got)
			}
			if m.Repairs() != 0 {
				t.Fatalf("repairs = %d without any tampering", m.Repairs())
			}
		})
	}
}

func TestFlushedRulesAreRepaired(t *testing.T) {
	for _, bc := range backends() {
		t.Run(bc.name, func(t *testing.T) {
			tp := newTopo(t)
			tp.server(t)
			m, reg := newManager(t, tp, bc.backend)
			if err := m.Add("uid-1", []netip.Addr{podV4, podV6}); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan struct{})
			go func() { m.Run(ctx); close(done) }()
			t.Cleanup(func() { cancel(); <-done })

			run(t, append([]string{"ip", "netns", "exec", tp.host}, strings.Fields(bc.flush)...)...)
			testenv.Eventually(t, "a repair", func() bool { return m.Repairs() >= 1 })
			if got := sourceSeen(t, tp.hostNS, "10.77.1.2:8080"); got != probe4 {
				t.Fatalf("after repair: source %s", got)
			}
			// The set alone emptied (entries deleted behind our back).
			n := m.Repairs()
			if bc.backend == BackendNFTables {
				run(t, "ip", "netns", "exec", tp.host, "nft", "flush", "set", "inet", "ambit-host", "probes-v4")
			} else {
				run(t, "ip", "netns", "exec", tp.host, "ipset", "flush", "ambit-probes-v4")
			}
			testenv.Eventually(t, "a second repair", func() bool { return m.Repairs() > n })
			if got := sourceSeen(t, tp.hostNS, "10.77.1.2:8080"); got != probe4 {
				t.Fatalf("after set repair: source %s", got)
			}
			if n := testenv.Metric(t, reg, "ambit_host_rules_repairs_total", nil); n < 2 {
				t.Fatalf("ambit_host_rules_repairs_total = %v, want the 2 repairs or more exported", n)
			}
		})
	}
}

func TestIPReuseByAnotherPod(t *testing.T) {
	tp := newTopo(t)
	tp.server(t)
	m, _ := newManager(t, tp, BackendNFTables)
	if err := m.Add("old", []netip.Addr{podV4}); err != nil {
		t.Fatal(err)
	}
	// The IP is reused by a new pod before the old one's removal arrives.
	if err := m.Add("new", []netip.Addr{podV4}); err != nil {
		t.Fatal(err)
	}
	if err := m.Remove("old", []netip.Addr{podV4}); err != nil {
		t.Fatal(err)
	}
	if got := m.Entries()[podV4]; got != "new" {
		t.Fatalf("owner = %q, want new", got)
	}
	if err := m.Reconcile(); err != nil {
		t.Fatal(err)
	}
	if m.Repairs() != 0 {
		t.Fatal("kernel set disagrees with the owner table (element comment not updated?)")
	}
	if got := sourceSeen(t, tp.hostNS, "10.77.1.2:8080"); got != probe4 {
		t.Fatalf("new owner's probes: source %s", got)
	}
	if err := m.Remove("new", []netip.Addr{podV4}); err != nil {
		t.Fatal(err)
	}
	if got := sourceSeen(t, tp.hostNS, "10.77.1.2:8080"); got != "10.77.1.1" {
		t.Fatalf("after the owner left: source %s", got)
	}
}

func TestSyncUninstallAndBadInput(t *testing.T) {
	tp := newTopo(t)
	tp.server(t)
	m, _ := newManager(t, tp, BackendNFTables)
	if err := m.Sync(map[string][]netip.Addr{"a": {podV4}, "b": {netip.MustParseAddr("10.77.1.9")}}); err != nil {
		t.Fatal(err)
	}
	if got := sourceSeen(t, tp.hostNS, "10.77.1.2:8080"); got != probe4 {
		t.Fatalf("after Sync: source %s", got)
	}
	// Sync replaces: a is gone.
	if err := m.Sync(map[string][]netip.Addr{"b": {netip.MustParseAddr("10.77.1.9")}}); err != nil {
		t.Fatal(err)
	}
	if m.Repairs() != 0 {
		t.Fatalf("changing the desired state counted %d repairs", m.Repairs())
	}
	if got := sourceSeen(t, tp.hostNS, "10.77.1.2:8080"); got != "10.77.1.1" {
		t.Fatalf("after second Sync: source %s", got)
	}
	for _, bad := range []struct {
		uid string
		ips []netip.Addr
	}{{"", []netip.Addr{podV4}}, {"x", []netip.Addr{{}}}, {"x", []netip.Addr{netip.MustParseAddr("127.0.0.1")}}, {"x", []netip.Addr{netip.MustParseAddr("::")}}} {
		if err := m.Add(bad.uid, bad.ips); err == nil {
			t.Fatalf("Add(%q, %v) accepted", bad.uid, bad.ips)
		}
	}
	if got := m.Entries(); len(got) != 1 {
		t.Fatalf("bad input changed state: %v", got)
	}
	// Operators read the rule with the nft tool: it must decode it.
	listed, err := exec.Command("ip", "netns", "exec", tp.host, "nft", "list", "table", "inet", "ambit-host").CombinedOutput()
	if err != nil {
		t.Fatalf("nft list: %v\n%s", err, listed)
	}
	t.Logf("nft list table inet ambit-host:\n%s", listed)
	for _, want := range []string{"meta skuid", "snat ip to 169.254.7.127", "snat ip6 to fd16:9254:7127:1337:ffff:ffff:ffff:ffff", `comment "b"`, "hook postrouting priority"} {
		if !strings.Contains(string(listed), want) {
			t.Errorf("nft list lacks %q", want)
		}
	}
	if err := m.Uninstall(); err != nil {
		t.Fatal(err)
	}
	// A reconcile loop still running must not bring them back.
	if err := m.Reconcile(); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("ip", "netns", "exec", tp.host, "nft", "list", "ruleset").CombinedOutput()
	if err != nil || strings.Contains(string(out), "ambit") {
		t.Fatalf("after Uninstall the ruleset still has ours: %v\n%s", err, out)
	}
	if err := m.Uninstall(); err != nil {
		t.Fatalf("second Uninstall: %v", err)
	}
	if _, err := New(Config{Backend: "pf"}); err == nil {
		t.Fatal("unknown backend accepted")
	}
	if _, err := New(Config{ProbeSNATv4: netip.MustParseAddr("fd00::1")}); err == nil {
		t.Fatal("v6 ProbeSNATv4 accepted")
	}
}

func TestKubeletUIDNarrowsTheMatch(t *testing.T) {
	tp := newTopo(t)
	tp.server(t)
	for _, c := range []struct {
		uid  uint32
		want string
	}{{0, probe4}, {4242, "10.77.1.1"}} { // the test dials as root (uid 0)
		uid := c.uid
		m, err := New(Config{Backend: BackendNFTables, NetNS: tp.hostNS, KubeletUID: &uid})
		if err != nil {
			t.Fatal(err)
		}
		if err := m.Add("u", []netip.Addr{podV4}); err != nil {
			t.Fatal(err)
		}
		if got := sourceSeen(t, tp.hostNS, "10.77.1.2:8080"); got != c.want {
			t.Fatalf("KubeletUID %d: source %s, want %s", uid, got, c.want)
		}
		if err := m.Uninstall(); err != nil {
			t.Fatal(err)
		}
	}
}

func TestNFTablesDeletionRepairedByNotification(t *testing.T) {
	tp := newTopo(t)
	tp.server(t)
	// An interval that never fires within the test: only the kernel's
	// change notification can trigger the repair.
	m, err := New(Config{Backend: BackendNFTables, NetNS: tp.hostNS, Interval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Uninstall() })
	if err := m.Add("uid-1", []netip.Addr{podV4}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { m.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	for _, cmd := range [][]string{
		{"nft", "delete", "table", "inet", "ambit-host"},
		{"nft", "delete", "element", "inet", "ambit-host", "probes-v4", "{ 10.77.1.2 }"},
		{"nft", "flush", "chain", "inet", "ambit-host", "postrouting"},
	} {
		// The monitor may still be subscribing when the first command runs;
		// repeat it until a repair shows (a second delete of a deleted
		// table fails, which is fine).
		n := m.Repairs()
		testenv.Eventually(t, fmt.Sprintf("repair after %v", cmd), func() bool {
			exec.Command("ip", append([]string{"netns", "exec", tp.host}, cmd...)...).Run()
			deadline := time.Now().Add(time.Second)
			for time.Now().Before(deadline) {
				if m.Repairs() > n {
					return true
				}
				time.Sleep(5 * time.Millisecond)
			}
			return false
		})
		if got := sourceSeen(t, tp.hostNS, "10.77.1.2:8080"); got != probe4 {
			t.Fatalf("after %v: source %s", cmd, got)
		}
	}
}

// TestIPv4Only: on a host without IPv6 NAT (agent config ipv6: off) the
// Manager writes no IPv6 set, rule or ip6tables chain, ignores pods' IPv6
// addresses, still SNATs IPv4 probes, and finds nothing to repair.
func TestIPv4Only(t *testing.T) {
	for _, bc := range backends() {
		t.Run(bc.name, func(t *testing.T) {
			tp := newTopo(t)
			tp.server(t)
			m, err := New(Config{Backend: bc.backend, NetNS: tp.hostNS, Interval: 50 * time.Millisecond, IPv4Only: true})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { m.Uninstall() })
			if err := m.Add("uid-1", []netip.Addr{podV4, podV6}); err != nil {
				t.Fatal(err)
			}
			if got := sourceSeen(t, tp.hostNS, "10.77.1.2:8080"); got != probe4 {
				t.Fatalf("local v4 probe: source %s, want %s", got, probe4)
			}
			if got := sourceSeen(t, tp.hostNS, "[fd00:77:1::2]:8080"); got == probe6 {
				t.Fatalf("v6 probe SNATed with IPv4Only")
			}
			if got := m.Entries(); len(got) != 1 || got[podV4] != "uid-1" {
				t.Fatalf("entries %v, want only %s", got, podV4)
			}
			var cmd []string
			switch bc.backend {
			case BackendNFTables:
				cmd = []string{"nft", "list", "ruleset"}
			default:
				cmd = []string{strings.Replace(bc.backend, "iptables", "ip6tables", 1), "-t", "nat", "-S"}
			}
			out, err := exec.Command("ip", append([]string{"netns", "exec", tp.host}, cmd...)...).CombinedOutput()
			if err != nil {
				t.Fatalf("%v: %v\n%s", cmd, err, out)
			}
			for _, bad := range []string{"probes-v6", "ip6 ", "AMBIT"} {
				if strings.Contains(string(out), bad) {
					t.Errorf("IPv6 state %q written with IPv4Only:\n%s", bad, out)
				}
			}
			if err := m.Reconcile(); err != nil || m.Repairs() != 0 {
				t.Fatalf("reconcile of intact v4-only state: err %v, %d repairs", err, m.Repairs())
			}
		})
	}
}

// TestSurgeUpgradeTwoManagers: during a surge upgrade the old agent and the
// new one run side by side on the node, each with a Manager over the same
// table. The new one, before its Sync, must not take away entries the old
// one keeps (it has not re-adopted their pods yet), and the old one must
// leave alone what the new one writes once it is ready. Before Shared and
// Yield they rewrote each other's sets in turn (e2e/kube's rolling update
// logged it 25–34 times in under a second) and a probe in that window went
// out without its SNAT.
func TestSurgeUpgradeTwoManagers(t *testing.T) {
	tp := newTopo(t)
	tp.server(t)
	var newReady atomic.Bool
	old, err := New(Config{Backend: BackendNFTables, NetNS: tp.hostNS, Shared: true,
		Yield: newReady.Load, Registerer: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { old.Uninstall() })
	if err := old.Sync(map[string][]netip.Addr{"a": {podV4}}); err != nil {
		t.Fatal(err)
	}
	neu, err := New(Config{Backend: BackendNFTables, NetNS: tp.hostNS, Shared: true,
		Registerer: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	// The new agent's loop runs before it has re-adopted anything.
	if err := neu.Reconcile(); err != nil {
		t.Fatal(err)
	}
	if got := sourceSeen(t, tp.hostNS, "10.77.1.2:8080"); got != probe4 {
		t.Fatalf("new agent's first reconcile: probe source %s, want %s (the old agent's entry was dropped)", got, probe4)
	}
	// Re-adoption adds the pods one by one; the kernel keeps the rest.
	other := netip.MustParseAddr("10.77.1.9")
	if err := old.Add("b", []netip.Addr{other}); err != nil {
		t.Fatal(err)
	}
	if err := neu.Add("a", []netip.Addr{podV4}); err != nil {
		t.Fatal(err)
	}
	if d, err := old.be.check(context.Background(), map[netip.Addr]string{podV4: "a", other: "b"}); err != nil || d != "" {
		t.Fatalf("after the new agent adopted a: drift %q, %v (want a and b both kept)", d, err)
	}
	// The new agent is done: its picture has a pod the old one never
	// saw; the old one yields and leaves it.
	third := netip.MustParseAddr("10.77.1.3")
	if err := neu.Sync(map[string][]netip.Addr{"a": {podV4}, "b": {other}, "c": {third}}); err != nil {
		t.Fatal(err)
	}
	newReady.Store(true)
	for _, m := range []*Manager{old, neu} {
		if err := m.Reconcile(); err != nil {
			t.Fatal(err)
		}
	}
	if got := sourceSeen(t, tp.hostNS, "10.77.1.3:8080"); got != probe4 {
		t.Fatalf("pod c after the old agent's reconcile: probe source %s, want %s", got, probe4)
	}
	if old.Repairs() != 0 || neu.Repairs() != 0 {
		t.Fatalf("repairs: old %d, new %d; two agents must not repair each other's entries", old.Repairs(), neu.Repairs())
	}
	// A flush is still repaired, by the agent in charge.
	run(t, "ip", "netns", "exec", tp.host, "nft", "flush", "set", "inet", "ambit-host", "probes-v4")
	if err := neu.Reconcile(); err != nil {
		t.Fatal(err)
	}
	if neu.Repairs() != 1 {
		t.Fatalf("new agent repairs after a flush = %d, want 1", neu.Repairs())
	}
	if got := sourceSeen(t, tp.hostNS, "10.77.1.2:8080"); got != probe4 {
		t.Fatalf("after the repair: probe source %s", got)
	}
}
