package redirect

import (
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

// The golden files are the reviewable record of what a pod gets; a change
// to the rules shows up as a diff of these files.
func TestRenderGolden(t *testing.T) {
	v4 := DefaultSpec()
	v4.IPv6 = false
	v6 := DefaultSpec()
	v6.IPv4 = false
	bypass := DefaultSpec()
	bypass.BypassInbound = true
	specs := map[string]Spec{"v4": v4, "v6": v6, "dual": DefaultSpec(), "dual-bypass-inbound": bypass}
	for _, b := range []Backend{Nftables, IptablesLegacy, IptablesNft} {
		for name, s := range specs {
			got, err := Render(b, s)
			if err != nil {
				t.Fatal(err)
			}
			path := filepath.Join("testdata", string(b)+"-"+name+".golden")
			if *update {
				if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
				continue
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run go test ./plugin/redirect -run Golden -update)", err)
			}
			if got != string(want) {
				t.Errorf("%s differs from the golden file:\n--- got\n%s\n--- want\n%s", path, got, want)
			}
		}
	}
}

func TestRenderFamilies(t *testing.T) {
	v4 := DefaultSpec()
	v4.IPv6 = false
	out, _ := Render(Nftables, v4)
	if strings.Contains(out, "ipv6") || strings.Contains(out, "ip -6") {
		t.Errorf("IPv4-only spec renders IPv6 rules:\n%s", out)
	}
	bypass := DefaultSpec()
	bypass.BypassInbound = true
	out, _ = Render(IptablesNft, bypass)
	if strings.Contains(out, "--to-ports 15006") {
		t.Errorf("bypassInbound still redirects inbound:\n%s", out)
	}
}

func TestRenderRejects(t *testing.T) {
	if _, err := Render("pf", DefaultSpec()); err == nil || !strings.Contains(err.Error(), "pf") {
		t.Errorf("unknown backend: %v", err)
	}
	bad := DefaultSpec()
	bad.InboundPort = bad.OutboundPort
	if _, err := Render(Nftables, bad); err == nil || !strings.Contains(err.Error(), "inboundPort") {
		t.Errorf("duplicate ports: %v", err)
	}
}

func TestParseBackend(t *testing.T) {
	for in, want := range map[string]Backend{"": Auto, "auto": Auto, "nftables": Nftables, "iptables": Iptables, "iptables-legacy": IptablesLegacy, "iptables-nft": IptablesNft} {
		if got, err := ParseBackend(in); err != nil || got != want {
			t.Errorf("ParseBackend(%q) = %q, %v", in, got, err)
		}
	}
	if _, err := ParseBackend("nft"); err == nil {
		t.Error("ParseBackend accepted nft")
	}
}

func TestDetectIptables(t *testing.T) {
	out := func(m map[string]string) func(string) ([]byte, saveResult) {
		return func(bin string) ([]byte, saveResult) {
			s, ok := m[bin]
			switch {
			case s == "SLOW":
				return nil, saveSlow
			case !ok:
				return nil, saveAbsent
			}
			return []byte(s), saveDone
		}
	}
	cases := []struct {
		name string
		m    map[string]string
		want Backend
	}{
		{"nothing installed", map[string]string{}, IptablesNft},
		{"only legacy", map[string]string{"iptables-legacy-save": ""}, IptablesLegacy},
		{"only nft", map[string]string{"iptables-nft-save": ""}, IptablesNft},
		{"both empty", map[string]string{"iptables-legacy-save": "", "iptables-nft-save": ""}, IptablesNft},
		{"legacy has more rules", map[string]string{"iptables-legacy-save": "*nat\n-A A\n-A B\n", "iptables-nft-save": "*nat\n-A A\n"}, IptablesLegacy},
		{"nft has more rules", map[string]string{"iptables-legacy-save": "-A A\n", "ip6tables-nft-save": "-A A\n-A B\n"}, IptablesNft},
		{"kubelet hint in legacy wins over counts", map[string]string{"iptables-legacy-save": ":KUBE-IPTABLES-HINT - [0:0]\n", "iptables-nft-save": "-A A\n-A B\n"}, IptablesLegacy},
		{"kubelet hint in nft", map[string]string{"iptables-legacy-save": "-A A\n-A B\n-A C\n", "iptables-nft-save": ":KUBE-KUBELET-CANARY - [0:0]\n"}, IptablesNft},
		// SLOW: the save outlasted saveTimeout (a huge ruleset).
		{"legacy save too slow: its ruleset is the larger", map[string]string{"iptables-legacy-save": "SLOW", "iptables-nft-save": "-A A\n-A B\n"}, IptablesLegacy},
		{"nft save too slow: its ruleset is the larger", map[string]string{"ip6tables-nft-save": "SLOW", "iptables-legacy-save": "-A A\n-A B\n"}, IptablesNft},
		{"a hint that was read wins over a slow save", map[string]string{"iptables-legacy-save": "SLOW", "iptables-nft-save": ":KUBE-IPTABLES-HINT - [0:0]\n"}, IptablesNft},
		{"only a slow legacy", map[string]string{"iptables-legacy-save": "SLOW"}, IptablesLegacy},
		{"both slow", map[string]string{"iptables-legacy-save": "SLOW", "iptables-nft-save": "SLOW"}, IptablesNft},
	}
	for _, c := range cases {
		got, why := detectIptables(out(c.m))
		if got != c.want {
			t.Errorf("%s: got %s (%s), want %s", c.name, got, why, c.want)
		}
	}
}
