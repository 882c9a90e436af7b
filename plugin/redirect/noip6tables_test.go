package redirect

import (
	"context"
	"strings"
	"testing"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/plugin/internal/nstest"
)

// TestIPv4OnlyWithoutIp6tables: with ipv6: off (the spec's IPv6 false)
// on a node without ip6tables, a pod's iptables redirection installs and
// verifies. Before, Verify ran ip6tables-<variant>-save for the disabled
// family too and failed ("ip6tables-legacy-save not found") on every
// pod: the agent's periodic check repaired each pod at every pass, for
// good, and a CNI CHECK answered code 103. A dual-stack spec there fails
// with an error naming the missing tool and leaves nothing behind.
func TestIPv4OnlyWithoutIp6tables(t *testing.T) {
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
			if err := Verify(context.Background(), n, v4); err != nil {
				t.Errorf("IPv4-only Verify: %v", err)
			}
			var c Checked
			if err := Recheck(context.Background(), n, v4, &c); err != nil {
				t.Errorf("IPv4-only Recheck: %v", err)
			}
			if err := Uninstall(context.Background(), n); err != nil {
				t.Fatal(err)
			}

			_, err := Install(context.Background(), n, b, DefaultSpec())
			if err == nil || !strings.Contains(err.Error(), "ip6tables-") || !strings.Contains(err.Error(), "not found") {
				t.Fatalf("dual-stack install without ip6tables: %v, want an error naming the missing ip6tables tool", err)
			}
			if found, err := Installed(context.Background(), n); err != nil || len(found) != 0 {
				t.Errorf("after the failed install: %v %v, want nothing of ours", found, err)
			}
		})
	}
}
