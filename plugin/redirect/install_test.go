package redirect

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/plugin/internal/nstest"
	"github.com/containernetworking/plugins/pkg/ns"
)

var backends = []Backend{Nftables, IptablesNft, IptablesLegacy}

func TestInstallVerifyUninstall(t *testing.T) {
	testenv.RequireRoot(t)
	for _, b := range backends {
		t.Run(string(b), func(t *testing.T) {
			n := nstest.New(t, "rd")
			spec := DefaultSpec()
			if err := Verify(context.Background(), n, spec); err == nil || !strings.Contains(err.Error(), "no redirection") {
				t.Fatalf("Verify on an empty netns: %v, want 'no redirection'", err)
			}
			got, err := Install(context.Background(), n, b, spec)
			if err != nil {
				t.Fatal(err)
			}
			if got != b {
				t.Fatalf("Install used %s, want %s", got, b)
			}
			if err := Verify(context.Background(), n, spec); err != nil {
				t.Fatalf("Verify after Install: %v", err)
			}
			// Idempotent: a second Install leaves exactly the same state.
			if _, err := Install(context.Background(), n, b, spec); err != nil {
				t.Fatal(err)
			}
			if err := Verify(context.Background(), n, spec); err != nil {
				t.Fatalf("Verify after a second Install: %v", err)
			}
			// A different spec is detected.
			other := spec
			other.InboundPort = 15016
			if err := Verify(context.Background(), n, other); err == nil {
				t.Fatal("Verify accepted rules installed for another inbound port")
			}
			if err := Uninstall(context.Background(), n); err != nil {
				t.Fatal(err)
			}
			if found, err := Installed(context.Background(), n); err != nil || len(found) != 0 {
				t.Fatalf("after Uninstall: %v %v", found, err)
			}
			if p := routesVerify(n, spec); len(p) != 2*2 {
				t.Fatalf("after Uninstall, routes still present: %v", p)
			}
			if err := Uninstall(context.Background(), n); err != nil {
				t.Fatalf("second Uninstall: %v", err)
			}
		})
	}
}

// The routes that bring the apps' replies back to the agent are in
// before the capture: a running pod enrolled by a label flip has live
// traffic the moment its rules land.
func TestRoutesBeforeCapture(t *testing.T) {
	testenv.RequireRoot(t)
	for _, b := range backends {
		t.Run(string(b), func(t *testing.T) {
			n := nstest.New(t, "rd")
			spec := DefaultSpec()
			called := false
			var missing []string
			testHookCaptured = func() { called, missing = true, routesVerify(n, spec) }
			defer func() { testHookCaptured = nil }()
			if _, err := Install(context.Background(), n, b, spec); err != nil {
				t.Fatal(err)
			}
			if !called {
				t.Fatal("the capture hook never ran")
			}
			if len(missing) != 0 {
				t.Errorf("the capture rules were in before their routes: %v", missing)
			}
		})
	}
}

// Switching backends leaves exactly one rule set.
func TestInstallSwitchesBackend(t *testing.T) {
	testenv.RequireRoot(t)
	n := nstest.New(t, "rd")
	spec := DefaultSpec()
	if _, err := Install(context.Background(), n, IptablesNft, spec); err != nil {
		t.Fatal(err)
	}
	if _, err := Install(context.Background(), n, Nftables, spec); err != nil {
		t.Fatal(err)
	}
	found, err := Installed(context.Background(), n)
	if err != nil || len(found) != 1 || found[0] != Nftables {
		t.Fatalf("Installed = %v, %v; want [nftables]", found, err)
	}
	if err := Verify(context.Background(), n, spec); err != nil {
		t.Fatal(err)
	}
}

// Others' rules in the same netns survive our install and removal.
func TestUninstallKeepsOthersRules(t *testing.T) {
	testenv.RequireRoot(t)
	n := nstest.New(t, "rd")
	sh := func(args ...string) string { t.Helper(); return sh(t, n, args...) }
	sh("nft", "add table inet theirs")
	sh("iptables-nft", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "-j", "ACCEPT")
	sh("ip", "rule", "add", "fwmark", "0x111", "lookup", "100", "pref", "32000")
	for _, b := range backends {
		if _, err := Install(context.Background(), n, b, DefaultSpec()); err != nil {
			t.Fatal(err)
		}
		if err := Uninstall(context.Background(), n); err != nil {
			t.Fatal(err)
		}
	}
	if !strings.Contains(sh("nft", "list", "tables"), "inet theirs") {
		t.Error("foreign nft table removed")
	}
	if !strings.Contains(sh("iptables-nft-save", "-t", "nat"), "-A OUTPUT -p udp -j ACCEPT") {
		t.Error("foreign iptables rule removed")
	}
	if !strings.Contains(sh("ip", "rule"), "32000:") {
		t.Error("foreign ip rule removed")
	}
}

func TestCheckDetectsDeletedRule(t *testing.T) {
	testenv.RequireRoot(t)
	for _, b := range backends {
		t.Run(string(b), func(t *testing.T) {
			n := nstest.New(t, "rd")
			spec := DefaultSpec()
			if _, err := Install(context.Background(), n, b, spec); err != nil {
				t.Fatal(err)
			}
			err := n.Do(func(ns.NetNS) error {
				if b == Nftables {
					return exec.Command("nft", "flush", "chain", "inet", TableName, "nat-output").Run()
				}
				return exec.Command(variantBinary(b, 4, ""), "-t", "nat", "-D", ChainOutput, "-d", "169.254.7.127/32", "-p", "tcp", "-j", "ACCEPT").Run()
			})
			if err != nil {
				t.Fatal(err)
			}
			if err := Verify(context.Background(), n, spec); err == nil {
				t.Fatal("Verify missed a deleted rule")
			} else {
				t.Logf("Verify: %v", err)
			}
		})
	}
}

// A pod with IPv6 disabled still gets enrolled by a dual-stack spec: the
// IPv6 policy routing is left out rather than failing the pod.
func TestInstallWithIPv6Disabled(t *testing.T) {
	testenv.RequireRoot(t)
	n := nstest.New(t, "rd")
	err := n.Do(func(ns.NetNS) error {
		for _, k := range []string{"all", "default", "lo"} {
			if err := os.WriteFile("/proc/sys/net/ipv6/conf/"+k+"/disable_ipv6", []byte("1"), 0o644); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	spec := DefaultSpec()
	if _, err := Install(context.Background(), n, Nftables, spec); err != nil {
		t.Fatalf("Install with IPv6 disabled: %v", err)
	}
	if err := Verify(context.Background(), n, spec); err != nil {
		t.Fatalf("Verify with IPv6 disabled: %v", err)
	}
	if err := Uninstall(context.Background(), n); err != nil {
		t.Fatal(err)
	}
}
