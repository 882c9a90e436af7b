package redirect

import (
	"os/exec"
	"strings"
	"testing"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/plugin/internal/nstest"
	"github.com/containernetworking/plugins/pkg/ns"
)

// The policy routing speaks rtnetlink by hand, so its result is checked
// with iproute2, the tool an operator would use: the exact rule and route
// per family, a spec change (other table, beyond 255, other priority)
// replacing rather than adding, lo brought up when it is down, Verify
// noticing a deleted route, and removal leaving nothing of ours.
func TestRoutesAgainstIproute2(t *testing.T) {
	testenv.RequireRoot(t)
	n := nstest.New(t, "rt")
	ip := func(args ...string) string {
		t.Helper()
		var out []byte
		err := n.Do(func(ns.NetNS) error {
			var err error
			out, err = exec.Command("ip", args...).CombinedOutput()
			return err
		})
		if err != nil {
			t.Fatalf("ip %v: %v: %s", args, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	ours := func(fam string) (rules, routes string) {
		t.Helper()
		var rl []string
		for _, l := range strings.Split(ip(fam, "rule", "show"), "\n") {
			if strings.Contains(l, "proto 167") {
				rl = append(rl, strings.Join(strings.Fields(l), " "))
			}
		}
		return strings.Join(rl, "\n"), ip(fam, "route", "show", "table", "all", "proto", "167")
	}
	ip("link", "set", "lo", "down")

	spec := DefaultSpec()
	if err := routesInstall(n, spec); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(ip("link", "show", "lo"), ",UP") {
		t.Fatal("lo is still down after routesInstall")
	}
	for fam, want := range map[string][2]string{
		"-4": {"32764: from all fwmark 0x111/0xfff lookup 100 proto 167", "local default dev lo table 100 scope host"},
		"-6": {"32764: from all fwmark 0x111/0xfff lookup 100 proto 167", "local default dev lo table 100 metric 1024 pref medium"},
	} {
		rules, routes := ours(fam)
		if rules != want[0] || routes != want[1] {
			t.Errorf("ip %s after install:\nrules  %q\nroutes %q\nwant   %q\n       %q", fam, rules, routes, want[0], want[1])
		}
	}
	if p := routesVerify(n, spec); len(p) != 0 {
		t.Fatalf("routesVerify after install: %v", p)
	}

	// A changed spec replaces ours; FRA_TABLE/RTA_TABLE carry tables > 255.
	moved := spec
	moved.RouteTable, moved.RulePriority = 4242, 30000
	if err := routesInstall(n, moved); err != nil {
		t.Fatal(err)
	}
	for _, fam := range []string{"-4", "-6"} {
		rules, routes := ours(fam)
		if rules != "30000: from all fwmark 0x111/0xfff lookup 4242 proto 167" || strings.Count(routes, "\n") != 0 || !strings.Contains(routes, "table 4242") {
			t.Errorf("ip %s after the spec moved:\nrules  %q\nroutes %q", fam, rules, routes)
		}
	}
	if p := routesVerify(n, moved); len(p) != 0 {
		t.Fatalf("routesVerify after the move: %v", p)
	}
	if p := routesVerify(n, spec); len(p) == 0 {
		t.Fatal("routesVerify accepted table 4242 for a spec that wants table 100")
	}

	ip("-6", "route", "del", "local", "default", "dev", "lo", "table", "4242")
	if p := routesVerify(n, moved); len(p) != 1 || !strings.Contains(p[0], "IPv6 route local default dev lo table 4242 missing") {
		t.Fatalf("routesVerify after deleting the IPv6 route: %v", p)
	}

	if err := routesUninstall(n); err != nil {
		t.Fatal(err)
	}
	for _, fam := range []string{"-4", "-6"} {
		if rules, routes := ours(fam); rules != "" || routes != "" {
			t.Errorf("ip %s after uninstall: rules %q routes %q", fam, rules, routes)
		}
	}
}
