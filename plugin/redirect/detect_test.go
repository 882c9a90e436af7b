package redirect

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestDetectIptablesSaveBounded: the host's legacy saves do not finish
// (stand-ins here: a real save cannot be made that slow on demand; on a
// node it is kube-proxy's legacy ruleset in the hundreds of thousands of
// rules, read while the node is busy). The detection still answers, by
// the bound, and leaves no process behind; and it picks legacy: a save
// that outlasts the bound, while the other variant's finished, reads the
// bigger ruleset, the one the host uses. Counting it as not installed
// chose nft with "only the nft variant is installed" on exactly the
// nodes whose kube-proxy is legacy, for the life of the process (the
// answer is kept), and the host rules then sat in the variant nothing
// else uses. Before the bound, the detection never returned.
func TestDetectIptablesSaveBounded(t *testing.T) {
	dir := t.TempDir()
	const marker = "3600.4242" // a sleep only this test runs
	scripts := map[string]string{
		"iptables-legacy-save":  "#!/bin/sh\nsleep " + marker + "\n",
		"ip6tables-legacy-save": "#!/bin/sh\nsleep " + marker + "\n",
		"iptables-nft-save":     "#!/bin/sh\necho '*nat'\necho '-A POSTROUTING -j X'\n",
		"ip6tables-nft-save":    "#!/bin/sh\n",
	}
	for name, body := range scripts {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv("PATH", dir+string(os.PathListSeparator)+os.Getenv("PATH"))
	defer func(d time.Duration) { saveTimeout = d }(saveTimeout)
	saveTimeout = 300 * time.Millisecond

	got, why := detectIptables(runSave)
	t.Logf("detected %s: %s", got, why)
	if got != IptablesLegacy || !strings.Contains(why, "did not finish") {
		t.Errorf("detected %s (%s), want %s, the variant whose saves outlast the bound", got, why, IptablesLegacy)
	}
	if out, err := exec.Command("pgrep", "-f", "sleep "+marker).Output(); err == nil {
		t.Errorf("the hung saves' processes are left: %s", out)
	}
}

// TestDetectIptablesLongLine: a host save with a line past 64 KiB (a
// rule with long comments or matches; synthetic here, since iptables
// cannot be made to print one on demand) before the rules and the
// kubelet's hint chain. The detection reads past it: it counts every
// rule of each variant and sees the hint, so it picks the variant the
// host uses. Before, bufio.Scanner's 64 KiB limit ended the reading of
// that save at the long line, silently: the legacy variant counted 0
// rules (nft, 2, won) and its hint was never seen.
func TestDetectIptablesLongLine(t *testing.T) {
	long := `-A INPUT -m comment --comment "` + strings.Repeat("x", 100<<10) + `" -j ACCEPT`
	save := func(m map[string]string) func(string) ([]byte, saveResult) {
		return func(bin string) ([]byte, saveResult) {
			s, ok := m[bin]
			if !ok {
				return nil, saveAbsent
			}
			return []byte(s), saveDone
		}
	}
	for _, c := range []struct {
		name string
		m    map[string]string
		want Backend
		why  string
	}{
		{"counts past the long line", map[string]string{
			"iptables-legacy-save": "*filter\n:INPUT ACCEPT [0:0]\n" + long + "\n-A INPUT -j A\n-A INPUT -j B\n-A INPUT -j C\nCOMMIT\n",
			"iptables-nft-save":    "*filter\n-A INPUT -j A\n-A INPUT -j B\nCOMMIT\n",
		}, IptablesLegacy, "4 legacy rules and 2 nft rules"},
		{"a hint past the long line", map[string]string{
			"iptables-legacy-save": "*filter\n" + long + "\n*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n",
			"iptables-nft-save":    "*filter\n-A INPUT -j A\n-A INPUT -j B\nCOMMIT\n",
		}, IptablesLegacy, "KUBE-IPTABLES-HINT"},
	} {
		got, why := detectIptables(save(c.m))
		if got != c.want || !strings.Contains(why, c.why) {
			t.Errorf("%s: detected %s (%s), want %s (%s)", c.name, got, why, c.want, c.why)
		}
	}
}

// TestSaveLinesPastALongLine: the pod netns's save read by install,
// verify, the rule check and removal, with a line past 64 KiB (someone
// else's rule) before ours. Our chains, rules and jumps after it are
// found: before, the reading ended at the long line, so a removal left
// our rules in place and a check called them missing.
func TestSaveLinesPastALongLine(t *testing.T) {
	long := `-A PREROUTING -m comment --comment "` + strings.Repeat("y", 100<<10) + `" -j ACCEPT`
	save := []byte("*nat\n:PREROUTING ACCEPT [0:0]\n:" + ChainPrerouting + " - [0:0]\n" + long + "\n" +
		"-A PREROUTING -j " + ChainPrerouting + "\n-A " + ChainPrerouting + " -p tcp -j REDIRECT --to-ports 15006\nCOMMIT\n")
	rules, jumps, chains := ourSaveLines(save)
	if len(rules["nat"]) != 1 || jumps["nat -A PREROUTING -j "+ChainPrerouting] != 1 || !chains["nat "+ChainPrerouting] {
		t.Errorf("ourSaveLines past a long line: rules %v, jumps %v, chains %v; want our rule, jump and chain", rules, jumps, chains)
	}
	if lines := saveLines(save); !lines["nat -A "+ChainPrerouting+" -p tcp -j REDIRECT --to-ports 15006"] || !lines["nat "+long] {
		t.Errorf("saveLines past a long line: %d lines, want ours and the long one", len(lines))
	}
	if p := removalPayload(save); !strings.Contains(p, "-D PREROUTING -j "+ChainPrerouting) || !strings.Contains(p, "-X "+ChainPrerouting) {
		t.Errorf("removal payload past a long line does not remove our jump and chain:\n%s", p)
	}
}
