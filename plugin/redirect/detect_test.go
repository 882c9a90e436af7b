package redirect

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestDetectIptablesSaveBounded: the host's legacy saves hang (a wedged
// binary; stand-ins here, since a real save cannot be made to). The
// detection still answers, from the variant whose saves ran, and leaves
// no process behind. Before, each save ran unbounded: the detection, and
// the first install with backend "iptables" (a plugin request) or the
// host rules' start waiting on it, never returned.
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
	if got != IptablesNft || !strings.Contains(why, "only the nft variant") {
		t.Errorf("detected %s (%s), want %s from the saves that ran", got, why, IptablesNft)
	}
	if out, err := exec.Command("pgrep", "-f", "sleep "+marker).Output(); err == nil {
		t.Errorf("the hung saves' processes are left: %s", out)
	}
}
