package install

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
)

// runtimeChain is the plugin types the runtime runs for the list at path:
// libcni's own loader (ConfListFromFile, what containerd's go-cni and
// CRI-O's ocicni call for a .conflist), which since containernetworking/cni
// v1.3.0 appends the *.conf files of <dir>/<network name>/.
func runtimeChain(t *testing.T, path string) []string {
	t.Helper()
	l, err := libcni.ConfListFromFile(path)
	if err != nil {
		t.Fatalf("libcni cannot load %s: %v", path, err)
	}
	var types []string
	for _, p := range l.Plugins {
		types = append(types, p.Network.Type)
	}
	return types
}

func writeFile(t *testing.T, path, s string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestDropInPluginsRefused: a plugin config in /etc/cni/net.d/<network
// name>/ runs after the list's own plugins (libcni v1.3.0 on), so ambit-cni
// chained into the list would not run last and that plugin could change
// the pod's netns after the redirection was installed. The installer
// refuses such a list, saying which files and what to do, and takes its
// entry out if the drop-in appeared after it chained; with the drop-in
// gone, or "loadOnlyInlinedPlugins": true, it chains and is last.
func TestDropInPluginsRefused(t *testing.T) {
	n := newNode(t)
	orig := fixture(t, "10-flannel.conflist") // network "cbr0"
	primary := filepath.Join(n.conf, "10-flannel.conflist")
	writeFile(t, primary, string(orig))
	dropIn := filepath.Join(n.conf, "cbr0", "50-tuning.conf")
	writeFile(t, dropIn, `{"cniVersion":"0.3.1","name":"cbr0","type":"tuning","sysctl":{"net.core.somaxconn":"500"}}`)

	c, _ := n.config().withDefaults()
	e, _ := entryOf(c.Entry)
	in := &installer{cfg: c, entry: e, m: n.m, log: n.log}
	err := in.reconcile()
	if chain := runtimeChain(t, primary); chain[len(chain)-1] != PluginType && strings.Contains(strings.Join(chain, ","), PluginType) {
		t.Fatalf("the runtime runs %v: ambit-cni chained but not last (installer said %v)", chain, err)
	}
	if err == nil || !strings.Contains(err.Error(), dropIn) || !strings.Contains(err.Error(), "loadOnlyInlinedPlugins") {
		t.Fatalf("reconcile = %v, want a refusal naming %s and the fix", err, dropIn)
	}
	if b, _ := os.ReadFile(primary); !bytes.Equal(b, orig) {
		t.Fatalf("refused list was written:\n%s", b)
	}

	// The drop-in goes: chained, last.
	os.RemoveAll(filepath.Dir(dropIn))
	if err := in.reconcile(); err != nil {
		t.Fatal(err)
	}
	if chain := runtimeChain(t, primary); chain[len(chain)-1] != PluginType {
		t.Fatalf("runtime chain %v", chain)
	}

	// A drop-in appears after we chained: our entry comes out.
	writeFile(t, dropIn, `{"cniVersion":"0.3.1","name":"cbr0","type":"tuning"}`)
	if err := in.reconcile(); err == nil {
		t.Fatal("a drop-in after our entry was accepted")
	}
	if b, _ := os.ReadFile(primary); !bytes.Equal(b, orig) {
		t.Fatalf("entry left in a list whose drop-ins run after it:\n%s", b)
	}
	if chain := runtimeChain(t, primary); strings.Contains(strings.Join(chain, ","), PluginType) {
		t.Fatalf("runtime chain %v still has ambit-cni", chain)
	}

	// Only *.conf files count, as in libcni.
	os.Remove(dropIn)
	writeFile(t, filepath.Join(n.conf, "cbr0", "notes.json"), `{"type":"tuning"}`)
	if err := in.reconcile(); err != nil {
		t.Fatalf("a .json in the network's directory (libcni ignores it): %v", err)
	}
	if chain := runtimeChain(t, primary); chain[len(chain)-1] != PluginType {
		t.Fatalf("runtime chain %v", chain)
	}

	// The list keeps to its own plugins: drop-ins do not run, we are last.
	only := strings.Replace(string(orig), `"cniVersion": "0.3.1",`, `"cniVersion": "0.3.1", "loadOnlyInlinedPlugins": true,`, 1)
	writeFile(t, primary, only)
	writeFile(t, dropIn, `{"cniVersion":"0.3.1","name":"cbr0","type":"tuning"}`)
	if err := in.reconcile(); err != nil {
		t.Fatalf("loadOnlyInlinedPlugins true: %v", err)
	}
	if chain := runtimeChain(t, primary); chain[len(chain)-1] != PluginType {
		t.Fatalf("runtime chain %v", chain)
	}
}

// A .conflist without "plugins" whose plugins all come from its directory
// is what a libcni v1.3.0+ runtime uses; chaining into the next file
// would leave every pod unenrolled while the installer reported success.
func TestDropInOnlyListIsThePrimary(t *testing.T) {
	n := newNode(t)
	first := filepath.Join(n.conf, "05-dropins.conflist")
	writeFile(t, first, `{"cniVersion":"1.0.0","name":"dd"}`)
	// Not a file being written (the installer waits for those).
	old := time.Now().Add(-time.Hour)
	os.Chtimes(first, old, old)
	writeFile(t, filepath.Join(n.conf, "dd", "10-bridge.conf"), `{"cniVersion":"1.0.0","name":"dd","type":"bridge"}`)
	next := filepath.Join(n.conf, "10-flannel.conflist")
	orig := fixture(t, "10-flannel.conflist")
	writeFile(t, next, string(orig))
	if chain := runtimeChain(t, first); len(chain) != 1 || chain[0] != "bridge" {
		t.Fatalf("libcni loads %v from %s", chain, first)
	}

	c, _ := n.config().withDefaults()
	e, _ := entryOf(c.Entry)
	in := &installer{cfg: c, entry: e, m: n.m, log: n.log}
	err := in.reconcile()
	if b, _ := os.ReadFile(next); !bytes.Equal(b, orig) {
		t.Fatalf("chained into %s, which the runtime does not use (%s comes first): %v", next, first, err)
	}
	if err == nil || !strings.Contains(err.Error(), first) {
		t.Fatalf("reconcile = %v, want a refusal naming %s", err, first)
	}
}

// A single-plugin .conf is loaded without drop-ins (libcni reads them for
// lists only); converting it to a list would start running them, after
// ambit-cni. Refused the same way, the .conf left as it is.
func TestDropInsBlockConversion(t *testing.T) {
	n := newNode(t)
	conf := filepath.Join(n.conf, "10-bridge.conf")
	orig := fixture(t, "10-bridge.conf")
	writeFile(t, conf, string(orig))
	nc, err := libcni.ConfFromBytes(orig)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(n.conf, nc.Network.Name, "50-tuning.conf"), `{"cniVersion":"0.3.1","type":"tuning"}`)

	c, _ := n.config().withDefaults()
	e, _ := entryOf(c.Entry)
	in := &installer{cfg: c, entry: e, m: n.m, log: n.log}
	err = in.reconcile()
	if _, serr := os.Stat(filepath.Join(n.conf, "10-bridge.conflist")); serr == nil {
		t.Fatalf("converted although the network's drop-ins would run after ambit-cni (reconcile: %v): runtime chain %v", err, runtimeChain(t, filepath.Join(n.conf, "10-bridge.conflist")))
	}
	if err == nil || !strings.Contains(err.Error(), "50-tuning.conf") {
		t.Fatalf("reconcile = %v, want a refusal naming the drop-in", err)
	}
	if b, _ := os.ReadFile(conf); !bytes.Equal(b, orig) {
		t.Fatal(".conf changed")
	}
}

// While Run keeps the entry, a drop-in directory appearing takes it out
// at once (an event, not the hourly resync), and its removal puts it back;
// a directory made again at the same path is watched again.
func TestDropInWatched(t *testing.T) {
	n := newNode(t)
	orig := fixture(t, "10-flannel.conflist")
	primary := filepath.Join(n.conf, "10-flannel.conflist")
	writeFile(t, primary, string(orig))
	run(t, n.config())
	eventually(t, "entry", func() bool { return hasEntry(primary) })

	dir := filepath.Join(n.conf, "cbr0")
	for round := 0; round < 2; round++ {
		os.Mkdir(dir, 0o755)
		eventually(t, "the empty drop-in directory to be watched", func() bool { return hasEntry(primary) })
		time.Sleep(50 * time.Millisecond) // the reconcile that adds the watch
		writeFile(t, filepath.Join(dir, "50-tuning.conf"), `{"cniVersion":"0.3.1","type":"tuning"}`)
		eventually(t, "entry out after a drop-in appeared", func() bool { b, _ := os.ReadFile(primary); return bytes.Equal(b, orig) })
		os.RemoveAll(dir)
		eventually(t, "entry back after the drop-in went", func() bool { return hasEntry(primary) })
	}
}
