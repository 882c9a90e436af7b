package redirect

import (
	"context"
	"slices"
	"strings"
	"testing"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/plugin/internal/nstest"
)

// TestMissingToolKeepsTheRulesThere: an iptables install whose tools
// are not all on the node fails before it changes anything, so a pod's
// rules already there stay. The agent's repair meets this on a node
// without ip6tables running with IPv6 on: a pod enrolled IPv4-only with
// an iptables engine (an agent before session 16, or ipv6: off then) is
// repaired to both families with its recorded engine first. Before, that
// install replaced the IPv4 rules, failed on ip6tables-<v>-save and its
// rollback removed everything: the pod's capture was gone until the
// fallback engine put it back, for good where none could (no nf_tables).
func TestMissingToolKeepsTheRulesThere(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.PathWithoutIp6tables(t)
	for _, b := range []Backend{IptablesLegacy, IptablesNft} {
		t.Run(string(b), func(t *testing.T) {
			n := nstest.New(t, "rd")
			v4 := DefaultSpec()
			v4.IPv6 = false
			if _, err := Install(context.Background(), n, b, v4); err != nil {
				t.Fatalf("IPv4-only install: %v", err)
			}
			_, err := Install(context.Background(), n, b, DefaultSpec())
			if err == nil || !strings.Contains(err.Error(), "ip6tables-") || !strings.Contains(err.Error(), "not found") {
				t.Fatalf("dual-stack install without ip6tables: %v, want an error naming the missing ip6tables tool", err)
			}
			if found, err := Installed(context.Background(), n); err != nil || !slices.Equal(found, []Backend{b}) {
				t.Errorf("after the failed install: %v %v, want the %s rules that were there", found, err, b)
			}
			if err := Verify(context.Background(), n, v4); err != nil {
				t.Errorf("the IPv4 redirection after the failed install: %v, want it intact", err)
			}
		})
	}
}
