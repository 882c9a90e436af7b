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
