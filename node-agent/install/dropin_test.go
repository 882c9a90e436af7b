package install

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/prometheus/client_golang/prometheus/testutil"
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

// chainHas says whether the runtime chain runs ambit-cni, and whether
// last.
func chainHas(chain []string) (has, last bool) {
	for _, c := range chain {
		if c == PluginType {
			has = true
		}
	}
	return has, has && chain[len(chain)-1] == PluginType
}

// TestDropInPluginsStayChained: a plugin config in /etc/cni/net.d/<network
// name>/ runs after the list's own plugins (libcni v1.3.0 on), so
// ambit-cni chained into the list cannot run last. It stays chained (an
// ambient pod must never start without its redirection), and the
// installer says so: the warning names the files and the fix, and
// ambit_installer_plugins_after counts them. With the drop-in gone, or
// "loadOnlyInlinedPlugins": true, it is last again and the gauge 0.
func TestDropInPluginsStayChained(t *testing.T) {
	n := newNode(t)
	var logs bytes.Buffer
	n.log = slog.New(slog.NewTextHandler(&logs, nil))
	orig := fixture(t, "10-flannel.conflist") // network "cbr0"
	primary := filepath.Join(n.conf, "10-flannel.conflist")
	writeFile(t, primary, string(orig))
	dropIn := filepath.Join(n.conf, "cbr0", "50-tuning.conf")
	writeFile(t, dropIn, `{"cniVersion":"0.3.1","name":"cbr0","type":"tuning","sysctl":{"net.core.somaxconn":"500"}}`)

	c, _ := n.config().withDefaults()
	e, _ := entryOf(c.Entry)
	in := &installer{cfg: c, entry: e, m: n.m, log: n.log}
	if err := in.reconcile(); err != nil {
		t.Fatalf("reconcile with a drop-in: %v", err)
	}
	chain := runtimeChain(t, primary)
	if has, _ := chainHas(chain); !has || chain[len(chain)-1] != "tuning" {
		t.Fatalf("the runtime runs %v, want ambit-cni chained, the drop-in after it", chain)
	}
	if got := testutil.ToFloat64(n.m.after); got != 1 {
		t.Fatalf("ambit_installer_plugins_after = %v, want 1", got)
	}
	if !strings.Contains(logs.String(), "50-tuning.conf") || !strings.Contains(logs.String(), "loadOnlyInlinedPlugins") {
		t.Fatalf("no warning naming the drop-in and the fix:\n%s", logs.String())
	}
	if err := in.reconcile(); err != nil {
		t.Fatal(err)
	}
	if k := strings.Count(logs.String(), "drop-in directory run after"); k != 1 {
		t.Fatalf("the warning was logged %d times for one unchanged drop-in", k)
	}

	// The drop-in goes: last, gauge 0.
	os.RemoveAll(filepath.Dir(dropIn))
	if err := in.reconcile(); err != nil {
		t.Fatal(err)
	}
	if _, last := chainHas(runtimeChain(t, primary)); !last {
		t.Fatalf("runtime chain %v", runtimeChain(t, primary))
	}
	if got := testutil.ToFloat64(n.m.after); got != 0 {
		t.Fatalf("ambit_installer_plugins_after = %v after the drop-in went", got)
	}

	// A drop-in appears after we chained: the entry stays.
	writeFile(t, dropIn, `{"cniVersion":"0.3.1","name":"cbr0","type":"tuning"}`)
	if err := in.reconcile(); err != nil {
		t.Fatal(err)
	}
	if has, _ := chainHas(runtimeChain(t, primary)); !has {
		t.Fatalf("runtime chain %v lost ambit-cni", runtimeChain(t, primary))
	}

	// Only *.conf files count, as in libcni.
	os.Remove(dropIn)
	writeFile(t, filepath.Join(n.conf, "cbr0", "notes.json"), `{"type":"tuning"}`)
	if err := in.reconcile(); err != nil {
		t.Fatalf("a .json in the network's directory (libcni ignores it): %v", err)
	}
	if _, last := chainHas(runtimeChain(t, primary)); !last || testutil.ToFloat64(n.m.after) != 0 {
		t.Fatalf("runtime chain %v, gauge %v", runtimeChain(t, primary), testutil.ToFloat64(n.m.after))
	}

	// The list keeps to its own plugins: drop-ins do not run, we are last.
	only := strings.Replace(string(orig), `"cniVersion": "0.3.1",`, `"cniVersion": "0.3.1", "loadOnlyInlinedPlugins": true,`, 1)
	writeFile(t, primary, only)
	writeFile(t, dropIn, `{"cniVersion":"0.3.1","name":"cbr0","type":"tuning"}`)
	if err := in.reconcile(); err != nil {
		t.Fatalf("loadOnlyInlinedPlugins true: %v", err)
	}
	if _, last := chainHas(runtimeChain(t, primary)); !last || testutil.ToFloat64(n.m.after) != 0 {
		t.Fatalf("runtime chain %v, gauge %v", runtimeChain(t, primary), testutil.ToFloat64(n.m.after))
	}
}

// TestPluginsAfterZeroWhileNotChained: ambit_installer_plugins_after
// counts plugins that run after ambit-cni. While the installer refuses
// the config (here the list's own plugins are gone, all of them in the
// drop-in directory, and ambit-cni is taken out) or there is no primary,
// ambit-cni does not run at all: nothing runs after it, and the gauge
// must not keep the count from when it was chained (installed says 0).
func TestPluginsAfterZeroWhileNotChained(t *testing.T) {
	n := newNode(t)
	primary := filepath.Join(n.conf, "10-flannel.conflist")
	writeFile(t, primary, string(fixture(t, "10-flannel.conflist"))) // network "cbr0"
	writeFile(t, filepath.Join(n.conf, "cbr0", "50-tuning.conf"), `{"cniVersion":"0.3.1","name":"cbr0","type":"tuning"}`)
	c, _ := n.config().withDefaults()
	e, _ := entryOf(c.Entry)
	in := &installer{cfg: c, entry: e, m: n.m, log: n.log}
	if err := in.reconcile(); err != nil {
		t.Fatal(err)
	}
	if got := testutil.ToFloat64(n.m.after); got != 1 {
		t.Fatalf("chained with a drop-in: ambit_installer_plugins_after = %v, want 1", got)
	}

	writeFile(t, primary, `{"cniVersion":"1.0.0","name":"cbr0"}`)
	old := time.Now().Add(-time.Hour)
	os.Chtimes(primary, old, old)
	if err := in.reconcile(); err == nil {
		t.Fatal("a list whose plugins all come from the drop-in directory was accepted")
	}
	if has, _ := chainHas(runtimeChain(t, primary)); has {
		t.Fatalf("ambit-cni still in the runtime's chain %v", runtimeChain(t, primary))
	}
	if got := testutil.ToFloat64(n.m.installed); got != 0 {
		t.Fatalf("refused: ambit_installer_installed = %v", got)
	}
	if got := testutil.ToFloat64(n.m.after); got != 0 {
		t.Errorf("refused (ambit-cni not chained): ambit_installer_plugins_after = %v, want 0", got)
	}

	// Chained again, then no primary at all.
	writeFile(t, primary, string(fixture(t, "10-flannel.conflist")))
	if err := in.reconcile(); err != nil || testutil.ToFloat64(n.m.after) != 1 {
		t.Fatalf("chained again: %v, gauge %v", err, testutil.ToFloat64(n.m.after))
	}
	os.Remove(primary)
	if err := in.reconcile(); err != nil {
		t.Fatal(err)
	}
	if got := testutil.ToFloat64(n.m.after); got != 0 {
		t.Errorf("no primary config: ambit_installer_plugins_after = %v, want 0", got)
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
// lists only): its conversion to a list says "loadOnlyInlinedPlugins", so
// the runtime keeps running just the plugin it ran, with ambit-cni last.
func TestConversionKeepsDropInsOut(t *testing.T) {
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
	if err := in.reconcile(); err != nil {
		t.Fatal(err)
	}
	chain := runtimeChain(t, filepath.Join(n.conf, "10-bridge.conflist"))
	if strings.Join(chain, ",") != "bridge,"+PluginType {
		t.Fatalf("the runtime runs %v after the conversion, want bridge then ambit-cni (the drop-in was never run for the .conf)", chain)
	}
	if got := testutil.ToFloat64(n.m.after); got != 0 {
		t.Fatalf("ambit_installer_plugins_after = %v", got)
	}
}

// While Run keeps the entry, a drop-in appearing is seen at once (an
// event, not the hourly resync), and so is its removal; a directory made
// again at the same path is watched again.
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
		eventually(t, "the drop-in counted", func() bool { return testutil.ToFloat64(n.m.after) == 1 && hasEntry(primary) })
		os.RemoveAll(dir)
		eventually(t, "the drop-in's removal seen", func() bool { return testutil.ToFloat64(n.m.after) == 0 && hasEntry(primary) })
	}
}

// A drop-in written after reconcile read the network's directory but
// before it watched it sends no event. The installer must still see it
// at once, not at the hourly resync: it reconciles again after watching
// a directory for the first time. Before, the drop-in went uncounted
// until the resync (TestDropInWatched's steps with a random delay
// instead of its sleep: 4 of 1,800 rounds; this test: 3 of 3 runs).
func TestDropInWrittenBeforeTheWatch(t *testing.T) {
	n := newNode(t)
	primary := filepath.Join(n.conf, "10-flannel.conflist")
	writeFile(t, primary, string(fixture(t, "10-flannel.conflist")))
	dir := filepath.Join(n.conf, "cbr0")
	written := make(chan error, 1)
	fired := false // Run's goroutine only
	beforeWatch = func(d string) {
		if d == dir && !fired {
			fired = true
			written <- os.WriteFile(filepath.Join(dir, "50-tuning.conf"), []byte(`{"cniVersion":"0.3.1","type":"tuning"}`), 0o644)
		}
	}
	t.Cleanup(func() { beforeWatch = nil }) // after Run's stop (cleanups run last first)
	run(t, n.config())
	// Chained first, so nothing the installer writes afterwards makes an
	// event that would have it look again anyway.
	eventually(t, "entry", func() bool { return hasEntry(primary) })
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-written:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the drop-in directory was never watched")
	}
	eventually(t, "the drop-in written before the watch counted", func() bool {
		return testutil.ToFloat64(n.m.after) == 1 && hasEntry(primary)
	})
}
