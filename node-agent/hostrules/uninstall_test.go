package hostrules

import (
	"net/netip"
	"os/exec"
	"strings"
	"testing"
)

// TestUninstallTwiceIPTables: `ambit-agent uninstall --unenroll-all`
// removes the host rules, and a restarted uninstaller (or one on a node
// where they were never written) runs it again. With the iptables
// backends the second run must find nothing to do, as nftables' does
// (TestSyncUninstallAndBadInput): there, `-C POSTROUTING -j AMBIT-POSTRT`
// with the chain gone exits 2 ("Couldn't load target" / "Chain ... does
// not exist"), not 1, and was reported as the uninstall failing.
func TestUninstallTwiceIPTables(t *testing.T) {
	for _, b := range backends() {
		if b.backend == BackendNFTables {
			continue
		}
		t.Run(b.name, func(t *testing.T) {
			tp := newTopo(t)
			m, _ := newManager(t, tp, b.backend)
			if err := m.Uninstall(); err != nil {
				t.Errorf("Uninstall with nothing installed: %v", err)
			}
			if err := m.Add("a", []netip.Addr{podV4}); err != nil {
				t.Fatal(err)
			}
			if err := m.Uninstall(); err != nil {
				t.Fatalf("Uninstall: %v", err)
			}
			tool := strings.Fields(b.flush)[0]
			out, err := exec.Command("ip", "netns", "exec", tp.host, tool, "-t", "nat", "-S").CombinedOutput()
			if err != nil || strings.Contains(string(out), iptDefaultChain) {
				t.Fatalf("after Uninstall %s -t nat -S: %v\n%s", tool, err, out)
			}
			if err := m.Uninstall(); err != nil {
				t.Errorf("second Uninstall: %v", err)
			}
		})
	}
}

// TestUninstallLeftoversIPTables: what other runs leave behind goes too.
// A write stopped between filling its temporary ipset and destroying it
// (an error, a crash) left "<set>-tmp", which Uninstall did not know; two
// writers that both found the jump missing (agents side by side, a
// restored save) each inserted it, and Uninstall's one -D left a jump
// that kept the chain from being deleted ("Too many links", "CHAIN_DEL
// failed"), so the uninstall failed.
func TestUninstallLeftoversIPTables(t *testing.T) {
	for _, b := range backends() {
		if b.backend == BackendNFTables {
			continue
		}
		t.Run(b.name, func(t *testing.T) {
			tp := newTopo(t)
			m, _ := newManager(t, tp, b.backend)
			if err := m.Add("a", []netip.Addr{podV4, podV6}); err != nil {
				t.Fatal(err)
			}
			tool := strings.Fields(b.flush)[0]
			tool6 := strings.Replace(tool, "iptables", "ip6tables", 1)
			for _, c := range [][]string{
				{"ipset", "create", iptDefaultSet + "-v4-tmp", "hash:ip", "comment"},
				{"ipset", "create", iptDefaultSet + "-v6-tmp", "hash:ip", "family", "inet6", "comment"},
				{tool, "-t", "nat", "-I", "POSTROUTING", "1", "-j", iptDefaultChain},
				{tool6, "-t", "nat", "-I", "POSTROUTING", "1", "-j", iptDefaultChain},
			} {
				run(t, append([]string{"ip", "netns", "exec", tp.host}, c...)...)
			}
			if err := m.Uninstall(); err != nil {
				t.Errorf("Uninstall: %v", err)
			}
			for _, c := range [][]string{{"ipset", "list", "-n"}, {tool, "-t", "nat", "-S"}, {tool6, "-t", "nat", "-S"}} {
				out, err := exec.Command("ip", append([]string{"netns", "exec", tp.host}, c...)...).CombinedOutput()
				if err != nil || strings.Contains(string(out), iptDefaultChain) || strings.Contains(string(out), iptDefaultSet) {
					t.Errorf("after Uninstall, %s: %v\n%s", strings.Join(c, " "), err, out)
				}
			}
		})
	}
}
