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
