package podtest

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
)

// Pod is one network namespace with an address on the shared link.
type Pod struct {
	Name string // netns name (ip netns)
	Path string // /var/run/netns/<name>
	Link string // interface name inside the netns
	IP4  netip.Addr
	IP6  netip.Addr
	NS   ns.NetNS
}

// File opens the netns file (the caller closes it).
func (p *Pod) File(t testing.TB) *os.File {
	t.Helper()
	f, err := os.Open(p.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// Do runs fn on a thread inside the pod's namespace. Sockets created in fn
// (net.Listen, net.Dial) are sockets of the pod, like an app's.
func (p *Pod) Do(t testing.TB, fn func() error) {
	t.Helper()
	if err := p.NS.Do(func(ns.NetNS) error { return fn() }); err != nil {
		t.Fatal(err)
	}
}

// Run runs a command inside the pod's netns and returns its output.
func (p *Pod) Run(t testing.TB, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", append([]string{"netns", "exec", p.Name}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("in %s: %v: %v\n%s", p.Name, args, err, out)
	}
	return string(out)
}

func run(t testing.TB, args ...string) {
	t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%v: %v\n%s", args, err, out)
	}
}

// Suffix is a random hex string for unique names.
func Suffix() string {
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// NewNetns creates an empty netns amb-tun-<suffix> with lo up.
func NewNetns(t testing.TB) *Pod {
	t.Helper()
	name := "amb-tun-" + Suffix()
	run(t, "ip", "netns", "add", name)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	p := &Pod{Name: name, Path: "/var/run/netns/" + name}
	h, err := ns.GetNS(p.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	p.NS = h
	run(t, "ip", "-n", name, "link", "set", "lo", "up")
	return p
}

// Pair creates two pods on one veth link, 10.<n>.0.1-2/24 and
// fd00:<n>::1-2/64 (n random), IPv6 DAD off so addresses are usable at once.
func Pair(t testing.TB) (a, b *Pod) {
	t.Helper()
	a, b = NewNetns(t), NewNetns(t)
	sfx := Suffix()
	la, lb := "ata"+sfx, "atb"+sfx
	run(t, "ip", "link", "add", la, "netns", a.Name, "type", "veth", "peer", "name", lb, "netns", b.Name)
	var rb [1]byte
	_, _ = rand.Read(rb[:])
	n := 100 + int(rb[0])%100
	for i, p := range []*Pod{a, b} {
		link := la
		if i == 1 {
			link = lb
		}
		p.Link = link
		p.IP4 = netip.MustParseAddr(fmt.Sprintf("10.%d.0.%d", n, i+1))
		p.IP6 = netip.MustParseAddr(fmt.Sprintf("fd00:%d::%d", n, i+1))
		run(t, "ip", "netns", "exec", p.Name, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
		run(t, "ip", "-n", p.Name, "addr", "add", p.IP4.String()+"/24", "dev", link)
		run(t, "ip", "-n", p.Name, "addr", "add", p.IP6.String()+"/64", "dev", link, "nodad")
		run(t, "ip", "-n", p.Name, "link", "set", link, "up")
	}
	return a, b
}

// Redirect installs the in-pod redirection by hand, the same rules the
// CNI plugin installs (Istio's in-pod scheme, nftables):
//   - outbound TCP not from the agent (mark 0x539/0xfff) and not via lo → :15001
//   - inbound TCP to any port but 15008, not via lo, not from the probe
//     SNAT address → :15006
//   - packets of the agent's sockets tag their connection 0x111; packets of
//     such connections get fwmark 0x111, routed by table 100 to lo, so the
//     app's replies to a spoofed (transparent) source come back to the agent.
func Redirect(t testing.TB, p *Pod) {
	t.Helper()
	rules := `
table inet ambit_test {
	chain nat_out {
		type nat hook output priority -100; policy accept;
		meta l4proto != tcp return
		meta mark & 0xfff == 0x539 return
		oifname "lo" return
		tcp dport 15008 return
		meta l4proto tcp redirect to :15001
	}
	chain nat_pre {
		type nat hook prerouting priority -100; policy accept;
		meta l4proto != tcp return
		iifname "lo" return
		ip saddr 169.254.7.127 return
		ip6 saddr fd16:9254:7127:1337:ffff:ffff:ffff:ffff return
		tcp dport 15008 return
		meta l4proto tcp redirect to :15006
	}
	chain mangle_out {
		type route hook output priority -150; policy accept;
		meta mark & 0xfff == 0x539 ct mark set 0x111 return
		ct mark & 0xfff == 0x111 meta mark set 0x111
	}
	chain mangle_pre {
		type filter hook prerouting priority -150; policy accept;
		ct mark & 0xfff == 0x111 meta mark set 0x111
	}
}
`
	cmd := exec.Command("ip", "netns", "exec", p.Name, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft in %s: %v\n%s", p.Name, err, out)
	}
	for _, fam := range []string{"-4", "-6"} {
		run(t, "ip", fam, "-n", p.Name, "rule", "add", "fwmark", "0x111/0xfff", "pref", "32764", "lookup", "100")
	}
	run(t, "ip", "-4", "-n", p.Name, "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100")
	run(t, "ip", "-6", "-n", p.Name, "route", "add", "local", "::/0", "dev", "lo", "table", "100")
}
