package redirect

import (
	"context"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/plugin/internal/nstest"
)

// TestLegacyFilterOnlyStateIsFound: an IPv6-only install with
// iptables-legacy in a fresh netns is cut after its restore committed
// the filter table (the link-local refusal) and before the mangle and
// nat tables: a legacy restore takes the host's xtables lock per table,
// so a busy lock holder stops it exactly there. The netns then has a
// legacy filter table and no nat or mangle one. Install's rollback, a
// DEL, an unenroll and the switch to another engine all find our rules
// through Installed, which looked for chains of ours only where a
// legacy nat or mangle table exists: before, Installed reported [] and
// Uninstall left the chain, so a pod whose ADD or enrollment had failed
// (capture rolled back) still refused TCP to link-local addresses, and
// nothing of ours would ever remove that.
func TestLegacyFilterOnlyStateIsFound(t *testing.T) {
	testenv.RequireRoot(t)
	spec := DefaultSpec()
	spec.IPv4 = false
	for _, then := range []string{"uninstall", "install-nftables"} {
		t.Run(then, func(t *testing.T) {
			n := nstest.New(t, "flt")
			payload := iptablesPayload(spec, 6, nil)
			filterOnly, _, ok := strings.Cut(payload, "*mangle\n")
			if !ok || !strings.HasPrefix(filterOnly, "*filter\n") {
				t.Fatalf("the IPv6 payload does not commit filter first:\n%s", payload)
			}
			if _, err := runIn(context.Background(), n, filterOnly, "ip6tables-legacy-restore", "--noflush", "--wait"); err != nil {
				t.Fatal(err)
			}
			save := func() string {
				out, err := runIn(context.Background(), n, "", "ip6tables-legacy-save")
				if err != nil {
					t.Fatal(err)
				}
				return string(out)
			}
			if !strings.Contains(save(), "-A OUTPUT -j "+ChainOutput) {
				t.Fatalf("the filter-only state was not made:\n%s", save())
			}
			var names []byte
			n.Do(func(ns.NetNS) error {
				names, _ = exec.Command("cat", "/proc/net/ip6_tables_names").Output()
				return nil
			})
			t.Logf("legacy IPv6 tables in the netns: %q", strings.Fields(string(names)))

			found, err := Installed(context.Background(), n)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(found, []Backend{IptablesLegacy}) {
				t.Errorf("Installed with only our legacy filter chain there: %v, want [%s]", found, IptablesLegacy)
			}
			switch then {
			case "uninstall":
				if err := Uninstall(context.Background(), n); err != nil {
					t.Fatal(err)
				}
			case "install-nftables":
				if _, err := Install(context.Background(), n, Nftables, spec); err != nil {
					t.Fatal(err)
				}
				if err := Verify(context.Background(), n, spec); err != nil {
					t.Errorf("Verify after the nftables install: %v", err)
				}
			}
			if s := save(); strings.Contains(s, ChainOutput) {
				t.Errorf("our legacy filter chain is still there after %s:\n%s", then, s)
			}
		})
	}
}
