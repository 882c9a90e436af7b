package install

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
)

// The primary CNI writes its single-plugin .conf again while no installer
// runs (the agent replaced by the uninstall overlay, or the manifests
// deleted first and the overlay run later): the runtime uses that file
// (it sorts before our .conflist) and it is the primary's current config.
// Uninstall must keep it, not put the stale original from the backup
// over it.
func TestUninstallKeepsRewrittenConf(t *testing.T) {
	n := newNode(t)
	orig := fixture(t, "10-bridge.conf")
	conf := filepath.Join(n.conf, "10-bridge.conf")
	if err := os.WriteFile(conf, orig, 0o600); err != nil {
		t.Fatal(err)
	}
	stop := run(t, n.config())
	list := filepath.Join(n.conf, "10-bridge.conflist")
	eventually(t, "converted list", func() bool { return hasEntry(list) })
	stop()

	newer := bytes.Replace(orig, []byte("10.22.0.0/16"), []byte("10.99.0.0/16"), 1)
	if err := os.WriteFile(conf, newer, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := Uninstall(context.Background(), n.config()); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(conf)
	if err != nil || !bytes.Equal(got, newer) {
		t.Fatalf("the primary's rewritten .conf was replaced by the old original: %v\n%s", err, got)
	}
	for _, gone := range []string{list, filepath.Join(n.conf, BackupDir)} {
		if _, err := os.Stat(gone); !os.IsNotExist(err) {
			t.Errorf("%s still exists after uninstall", gone)
		}
	}
}
