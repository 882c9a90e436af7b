package install

import (
	"bytes"
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
	n, orig, conf, list := convertedConf(t)

	newer := bytes.Replace(orig, []byte("10.22.0.0/16"), []byte("10.99.0.0/16"), 1)
	if err := os.WriteFile(conf, newer, 0o644); err != nil {
		t.Fatal(err)
	}
	wantUninstalled(t, n, list, conf, newer, "the primary's rewritten .conf was replaced by the old original")
}

// A single-plugin .json sorts after the .conflist it is converted to
// (a .conf sorts before it, so its rewrite is the runtime's pick and is
// converted again). When the primary CNI writes its .json again, the
// runtime still reads our list: the primary's new config must reach it,
// converted, or the node keeps the old one for as long as Ambit stays.
func TestRewrittenJSONIsConvertedAgain(t *testing.T) {
	n := newNode(t)
	orig := fixture(t, "10-bridge.conf")
	js := filepath.Join(n.conf, "10-bridge.json")
	if err := os.WriteFile(js, orig, 0o644); err != nil {
		t.Fatal(err)
	}
	run(t, n.config())
	list := filepath.Join(n.conf, "10-bridge.conflist")
	eventually(t, "converted list", func() bool { return hasEntry(list) })
	eventually(t, "the .json removed", func() bool {
		_, err := os.Stat(js)
		return os.IsNotExist(err)
	})

	newer := bytes.Replace(orig, []byte("10.22.0.0/16"), []byte("10.99.0.0/16"), 1)
	if err := os.WriteFile(js, newer, 0o644); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the new .json converted into the list the runtime reads", func() bool {
		b, err := os.ReadFile(list)
		_, serr := os.Stat(js)
		return err == nil && bytes.Contains(b, []byte("10.99.0.0/16")) && hasEntry(list) && os.IsNotExist(serr)
	})
	if b, _ := os.ReadFile(filepath.Join(n.conf, BackupDir, "10-bridge.json")); !bytes.Equal(b, newer) {
		t.Fatalf("the backup is not the new .json:\n%s", b)
	}
}
