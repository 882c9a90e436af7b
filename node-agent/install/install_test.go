package install

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/fsnotify/fsnotify"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/install/atomicfile"
	"github.com/ambit-mesh/ambit/node-agent/install/conflist"
)

type node struct {
	bin, conf, src string
	reg            *prometheus.Registry
	m              *metrics
	log            *slog.Logger
}

func newNode(t *testing.T) *node {
	t.Helper()
	root := t.TempDir()
	n := &node{bin: filepath.Join(root, "opt/cni/bin"), conf: filepath.Join(root, "etc/cni/net.d"), src: filepath.Join(root, "image/ambit-cni"), reg: prometheus.NewRegistry()}
	for _, d := range []string{n.bin, n.conf, filepath.Dir(n.src)} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(n.src, []byte("#!/bin/sh\necho plugin v1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	n.m = newMetrics(n.reg)
	n.log = slog.New(slog.NewTextHandler(t.Output(), nil))
	return n
}

func (n *node) config() Config {
	return Config{CNIBinDir: n.bin, CNIConfDir: n.conf, PluginSource: n.src, Registerer: n.reg, Debounce: 10 * time.Millisecond, Resync: time.Hour, Logger: n.log}
}

// run starts Run in the background and returns a stop func that waits for
// it to return.
func run(t *testing.T, cfg Config) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Run(ctx, cfg) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Run: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// eventually is testenv.Eventually (10 s, 5 ms polls).
var eventually = testenv.Eventually

func hasEntry(path string) bool {
	b, err := os.ReadFile(path)
	if err != nil {
		return false
	}
	l, err := conflist.ParseList(b)
	return err == nil && l.Plugins[len(l.Plugins)-1].Type == PluginType && strings.Count(string(b), `"type":"ambit-cni"`)+strings.Count(string(b), `"type": "ambit-cni"`) == 1
}

func fixture(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("conflist", "testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// convertedConf is a node whose primary CNI config, 10-bridge.conf
// (orig), was converted into list by a Run that has stopped since: what
// an uninstall starts from.
func convertedConf(t *testing.T) (n *node, orig []byte, conf, list string) {
	t.Helper()
	n = newNode(t)
	orig = fixture(t, "10-bridge.conf")
	conf = filepath.Join(n.conf, "10-bridge.conf")
	if err := os.WriteFile(conf, orig, 0o600); err != nil {
		t.Fatal(err)
	}
	stop := run(t, n.config())
	list = filepath.Join(n.conf, "10-bridge.conflist")
	eventually(t, "converted list", func() bool { return hasEntry(list) })
	stop()
	return n, orig, conf, list
}

// wantUninstalled runs Uninstall and wants conf to hold want byte for
// byte (failing with what otherwise), and our list and backup gone.
func wantUninstalled(t *testing.T, n *node, list, conf string, want []byte, what string) {
	t.Helper()
	if err := Uninstall(context.Background(), n.config()); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(conf)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("%s: %v\n%s", what, err, got)
	}
	for _, gone := range []string{list, filepath.Join(n.conf, BackupDir)} {
		if _, err := os.Stat(gone); !os.IsNotExist(err) {
			t.Errorf("%s still exists after uninstall", gone)
		}
	}
}

// Without Serving the binary is in place at once, the entry only after
// the agent is ready: no pod may pass through the plugin before the
// agent can answer.
func TestRunWaitsForReady(t *testing.T) {
	n := newNode(t)
	orig := fixture(t, "10-calico.conflist")
	primary := filepath.Join(n.conf, "10-calico.conflist")
	if err := os.WriteFile(primary, orig, 0o640); err != nil {
		t.Fatal(err)
	}
	ready := make(chan struct{})
	var installedAt atomic.Value
	cfg := n.config()
	cfg.Ready = ready
	cfg.OnState = func(ok bool, p string) {
		if ok {
			installedAt.Store(p)
		}
	}
	run(t, cfg)

	eventually(t, "plugin binary", func() bool {
		b, err := os.ReadFile(filepath.Join(n.bin, PluginType))
		return err == nil && bytes.Contains(b, []byte("plugin v1"))
	})
	// Events in the config dir must not make it act before Ready.
	if err := os.WriteFile(filepath.Join(n.conf, "99-other.txt"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond) // > Debounce: a premature write would have happened
	if b, _ := os.ReadFile(primary); !bytes.Equal(b, orig) {
		t.Fatal("conflist written before the agent was ready")
	}
	if installedAt.Load() != nil {
		t.Fatal("OnState(true) before ready")
	}
	close(ready)
	eventually(t, "entry after ready", func() bool { return hasEntry(primary) })
	eventually(t, "OnState", func() bool { return installedAt.Load() == primary })
	fi, err := os.Stat(primary)
	if err != nil || fi.Mode().Perm() != 0o640 {
		t.Fatalf("mode not kept: %v %v", fi.Mode(), err)
	}
	if got := testutil.ToFloat64(n.m.installed); got != 1 {
		t.Fatalf("installed gauge = %v", got)
	}
	fi, _ = os.Stat(filepath.Join(n.bin, PluginType))
	if fi.Mode().Perm() != 0o755 {
		t.Fatalf("binary mode %v", fi.Mode())
	}
}

// During a surge upgrade the older agent keeps the plugin socket until
// this one is ready: the binary is copied only once this agent serves
// the socket (Serving), so the plugin on disk is never newer than the
// agent answering it. Before, it was copied as the agent started, and
// every ADD, CHECK and DEL of the surge reached the older agent in a
// protocol it refuses (a warning in its log, the request asked again).
func TestRunCopiesBinaryOnceServing(t *testing.T) {
	n := newNode(t)
	orig := fixture(t, "10-calico.conflist")
	primary := filepath.Join(n.conf, "10-calico.conflist")
	if err := os.WriteFile(primary, orig, 0o640); err != nil {
		t.Fatal(err)
	}
	// The older agent's plugin, on disk before the upgrade.
	installed := filepath.Join(n.bin, PluginType)
	if err := os.WriteFile(installed, []byte("#!/bin/sh\necho plugin v0\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	serving, ready := make(chan struct{}), make(chan struct{})
	cfg := n.config()
	cfg.Serving, cfg.Ready = serving, ready
	run(t, cfg)

	// Events in both directories must not make it copy early either.
	for _, d := range []string{n.conf, n.bin} {
		if err := os.WriteFile(filepath.Join(d, "99-other.txt"), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(100 * time.Millisecond) // > Debounce: a premature copy would have happened
	if b, _ := os.ReadFile(installed); !bytes.Contains(b, []byte("plugin v0")) {
		t.Fatalf("plugin binary replaced before this agent served the socket: %q", b)
	}
	close(serving)
	eventually(t, "plugin binary once serving", func() bool {
		b, err := os.ReadFile(installed)
		return err == nil && bytes.Contains(b, []byte("plugin v1"))
	})
	if b, _ := os.ReadFile(primary); !bytes.Equal(b, orig) {
		t.Fatal("conflist written before the agent was ready")
	}
	close(ready)
	eventually(t, "entry after ready", func() bool { return hasEntry(primary) })
}

// The primary CNI rewrites its file (as Calico and Cilium do on restart):
// we put our entry back, count it, and warn when it keeps happening.
func TestReassertAndFightDetection(t *testing.T) {
	n := newNode(t)
	orig := fixture(t, "10-flannel.conflist")
	primary := filepath.Join(n.conf, "10-flannel.conflist")
	if err := os.WriteFile(primary, orig, 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := n.config()
	cfg.FightThreshold = 3
	run(t, cfg)
	eventually(t, "first install", func() bool { return hasEntry(primary) })
	for i := 1; i <= 3; i++ {
		if err := atomicfile.Write(primary, orig, atomicfile.Options{Mode: 0o644, UID: -1, GID: -1}); err != nil {
			t.Fatal(err)
		}
		eventually(t, fmt.Sprintf("re-assert %d", i), func() bool { return hasEntry(primary) && testutil.ToFloat64(n.m.reasserts) == float64(i) })
	}
	// The fight is counted just after the third re-assertion (after its
	// write and its count): wait for it, then require exactly one.
	eventually(t, "the fight counted", func() bool { return testutil.ToFloat64(n.m.fights) > 0 })
	if got := testutil.ToFloat64(n.m.fights); got != 1 {
		t.Fatalf("fights = %v after 3 rewrites with threshold 3", got)
	}
	// A deleted binary comes back too.
	if err := os.Remove(filepath.Join(n.bin, PluginType)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "binary restored", func() bool { _, err := os.Stat(filepath.Join(n.bin, PluginType)); return err == nil })
}

// An upgrade ships a new plugin: the binary is replaced by rename (the
// old inode stays intact for any exec in progress).
func TestBinaryUpgradeIsAtomic(t *testing.T) {
	n := newNode(t)
	known := sums{} // as Run keeps it: an upgrade right after a look is still seen
	if _, err := installBinary(n.src, n.bin, known); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(n.bin, PluginType)
	old, err := os.Open(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	if changed, err := installBinary(n.src, n.bin, known); err != nil || changed {
		t.Fatalf("identical binary rewritten: %v %v", changed, err)
	}
	if err := os.WriteFile(n.src, []byte("#!/bin/sh\necho plugin v2\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if changed, err := installBinary(n.src, n.bin, known); err != nil || !changed {
		t.Fatalf("new binary not installed: %v %v", changed, err)
	}
	b, _ := os.ReadFile(dst)
	if !bytes.Contains(b, []byte("v2")) {
		t.Fatal("not upgraded")
	}
	ob := make([]byte, 64)
	k, _ := old.ReadAt(ob, 0)
	if !bytes.Contains(ob[:k], []byte("v1")) {
		t.Fatal("the old inode was written to; an exec in progress could have seen a torn binary")
	}
}

// A single-plugin .conf becomes a .conflist the runtime picks; uninstall
// puts the .conf back byte for byte, with its mode.
func TestConfConversionAndUninstall(t *testing.T) {
	n := newNode(t)
	orig := fixture(t, "10-bridge.conf")
	conf := filepath.Join(n.conf, "10-bridge.conf")
	if err := os.WriteFile(conf, orig, 0o600); err != nil {
		t.Fatal(err)
	}
	other := filepath.Join(n.conf, "99-loopback.conf")
	lo := []byte(`{"cniVersion":"0.3.1","name":"lo","type":"loopback"}`)
	if err := os.WriteFile(other, lo, 0o644); err != nil {
		t.Fatal(err)
	}
	stop := run(t, n.config())
	list := filepath.Join(n.conf, "10-bridge.conflist")
	eventually(t, "converted list", func() bool { return hasEntry(list) })
	eventually(t, "the .conf stops being picked", func() bool {
		p, _, err := conflist.FindPrimary(n.conf)
		return err == nil && p.Path == list
	})
	if _, err := os.Stat(conf); !os.IsNotExist(err) {
		t.Fatalf(".conf still there: %v", err)
	}

	// The primary CNI writes its .conf again (e.g. on restart): it sorts
	// first, so we convert again.
	if err := os.WriteFile(conf, orig, 0o600); err != nil {
		t.Fatal(err)
	}
	eventually(t, "re-conversion", func() bool {
		_, err := os.Stat(conf)
		return os.IsNotExist(err) && hasEntry(list)
	})
	stop()

	var unenrolled bool
	cfg := n.config()
	cfg.UnenrollAll = func(context.Context) error { unenrolled = true; return nil }
	if err := Uninstall(context.Background(), cfg); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(conf)
	if err != nil || !bytes.Equal(got, orig) {
		t.Fatalf("original .conf not restored byte-identical: %v\n%s", err, got)
	}
	if fi, _ := os.Stat(conf); fi.Mode().Perm() != 0o600 {
		t.Fatalf("restored mode %v", fi.Mode())
	}
	for _, gone := range []string{list, filepath.Join(n.conf, BackupDir), filepath.Join(n.bin, PluginType)} {
		if _, err := os.Stat(gone); !os.IsNotExist(err) {
			t.Errorf("%s still exists after uninstall", gone)
		}
	}
	if b, _ := os.ReadFile(other); !bytes.Equal(b, lo) {
		t.Error("an unrelated file was changed")
	}
	if !unenrolled {
		t.Error("UnenrollAll not called")
	}
	// Again: nothing left to do, no error.
	if err := Uninstall(context.Background(), n.config()); err != nil {
		t.Fatalf("second uninstall: %v", err)
	}
}

// Install then uninstall on every fixture leaves the directory as it was.
func TestUninstallByteIdentical(t *testing.T) {
	files, _ := filepath.Glob("conflist/testdata/*.conflist")
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			n := newNode(t)
			orig := fixture(t, filepath.Base(f))
			primary := filepath.Join(n.conf, filepath.Base(f))
			if err := os.WriteFile(primary, orig, 0o604); err != nil {
				t.Fatal(err)
			}
			stop := run(t, n.config())
			eventually(t, "install", func() bool { return hasEntry(primary) })
			stop()
			if err := Uninstall(context.Background(), n.config()); err != nil {
				t.Fatal(err)
			}
			got, _ := os.ReadFile(primary)
			if !bytes.Equal(got, orig) {
				t.Fatalf("not byte-identical after uninstall:\n%s", got)
			}
			fi, _ := os.Stat(primary)
			if fi.Mode().Perm() != 0o604 {
				t.Fatalf("mode %v", fi.Mode())
			}
			ents, _ := os.ReadDir(n.conf)
			if len(ents) != 1 {
				t.Fatalf("leftovers in net.d: %v", ents)
			}
		})
	}
}

// Another writer rewrites the primary config (atomically, as a CNI
// daemon does) again and again while we re-assert: a reader — the
// runtime — never sees a torn or invalid file, and when the writer stops
// our entry is there exactly once, last.
func TestConcurrentWriterNoTornFile(t *testing.T) {
	n := newNode(t)
	orig := fixture(t, "10-calico.conflist")
	primary := filepath.Join(n.conf, "10-calico.conflist")
	if err := os.WriteFile(primary, orig, 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := n.config()
	cfg.Debounce = time.Millisecond
	run(t, cfg)
	eventually(t, "install", func() bool { return hasEntry(primary) })

	stopRead := make(chan struct{})
	var reads, bad atomic.Int64
	var firstBad atomic.Value
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stopRead:
				return
			default:
			}
			b, err := os.ReadFile(primary)
			if err != nil {
				bad.Add(1)
				firstBad.CompareAndSwap(nil, err.Error())
				continue
			}
			reads.Add(1)
			if _, err := conflist.ParseList(b); err != nil {
				bad.Add(1)
				firstBad.CompareAndSwap(nil, fmt.Sprintf("%v: %q", err, b))
			}
		}
	}()
	for i := 0; i < 100; i++ {
		// Each rewrite differs (a changing field), like a CNI daemon
		// updating its config.
		b := bytes.Replace(orig, []byte(`"mtu": 0`), []byte(fmt.Sprintf(`"mtu": %d`, 1400+i)), 1)
		if err := atomicfile.Write(primary, b, atomicfile.Options{Mode: 0o644, UID: -1, GID: -1}); err != nil {
			t.Fatal(err)
		}
		if i%8 == 0 {
			time.Sleep(2 * time.Millisecond)
		}
	}
	eventually(t, "entry after the writer stopped", func() bool { return hasEntry(primary) })
	close(stopRead)
	wg.Wait()
	if bad.Load() != 0 {
		t.Fatalf("%d of %d reads saw a missing, torn or invalid file; first: %v", bad.Load(), reads.Load(), firstBad.Load())
	}
	b, _ := os.ReadFile(primary)
	if !bytes.Contains(b, []byte(`"mtu": 1499`)) {
		t.Fatalf("the other writer's last change was lost:\n%s", b)
	}
	if reads.Load() < 10 {
		t.Fatalf("reader only managed %d reads", reads.Load())
	}
	t.Logf("%d reads, %d re-assertions, %d fights", reads.Load(), int(testutil.ToFloat64(n.m.reasserts)), int(testutil.ToFloat64(n.m.fights)))
}

// No primary config yet (a fresh node before the CNI daemon starts): the
// installer waits and chains as soon as one appears.
func TestWaitsForPrimary(t *testing.T) {
	n := newNode(t)
	run(t, n.config())
	eventually(t, "binary", func() bool { _, err := os.Stat(filepath.Join(n.bin, PluginType)); return err == nil })
	primary := filepath.Join(n.conf, "10-kindnet.conflist")
	if err := atomicfile.Write(primary, fixture(t, "10-kindnet.conflist"), atomicfile.Options{Mode: 0o644, UID: -1, GID: -1}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "entry", func() bool { return hasEntry(primary) })
}

func TestConfigErrors(t *testing.T) {
	for _, c := range []Config{
		{CNIBinDir: "relative", PluginSource: "/x"},
		{PluginSource: "/x", Entry: Entry{AgentSocket: "/" + strings.Repeat("a", 120)}},
		{PluginSource: "/x", Entry: Entry{LogFile: "cni.log"}},
	} {
		if err := Run(context.Background(), c); err == nil {
			t.Errorf("Run(%+v) accepted a bad config", c)
		}
	}
	if err := Run(context.Background(), Config{CNIBinDir: t.TempDir(), CNIConfDir: t.TempDir(), PluginSource: "/nonexistent/ambit-cni"}); err == nil || !strings.Contains(err.Error(), "/nonexistent/ambit-cni") {
		t.Errorf("missing plugin source: %v", err)
	}
}

func TestEntryJSON(t *testing.T) {
	b, err := Entry{Name: "ambit-cni", AgentSocket: "/var/run/ambit/cni.sock"}.JSON()
	if err != nil {
		t.Fatal(err)
	}
	if string(b) != `{"type":"ambit-cni","name":"ambit-cni","agentSocket":"/var/run/ambit/cni.sock"}` {
		t.Fatalf("entry = %s", b)
	}
}

// A CNI daemon writing its file in place leaves it invalid for a moment:
// we must not chain into the next file meanwhile, only once the broken
// file has stayed broken for Settle.
func TestBrokenFirstFileSettles(t *testing.T) {
	n := newNode(t)
	broken := filepath.Join(n.conf, "05-cilium.conflist")
	if err := os.WriteFile(broken, []byte(`{"cniVersion":"0.3.1","name":"cil`), 0o644); err != nil {
		t.Fatal(err)
	}
	next := filepath.Join(n.conf, "10-flannel.conflist")
	orig := fixture(t, "10-flannel.conflist")
	if err := os.WriteFile(next, orig, 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := n.config().withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	c.Settle = time.Hour
	e, _ := entryOf(c.Entry)
	in := &installer{cfg: c, entry: e, m: n.m, log: n.log}
	if err := in.reconcile(); !errors.Is(err, errUnsettled) {
		t.Fatalf("reconcile with a fresh broken file first: %v", err)
	}
	if b, _ := os.ReadFile(next); !bytes.Equal(b, orig) {
		t.Fatal("chained into the next file while the first was mid-write")
	}
	old := time.Now().Add(-2 * time.Hour)
	if err := os.Chtimes(broken, old, old); err != nil {
		t.Fatal(err)
	}
	if err := in.reconcile(); err != nil {
		t.Fatal(err)
	}
	if !hasEntry(next) {
		t.Fatal("a long-broken first file must be skipped, as CRI-O does")
	}
}

// During a surge upgrade the old agent's installer yields to the new one:
// the new plugin binary and entry stay, even when the primary CNI
// rewrites its file and both installers see the event; once the new agent
// is gone again, the old one maintains the files again.
func TestYieldsToNewerAgent(t *testing.T) {
	n := newNode(t)
	primary := filepath.Join(n.conf, "10-flannel.conflist")
	orig := fixture(t, "10-flannel.conflist")
	if err := os.WriteFile(primary, orig, 0o644); err != nil {
		t.Fatal(err)
	}
	var newer atomic.Bool
	oldCfg := n.config()
	oldCfg.Entry.LogLevel = "info"
	oldCfg.Resync = 20 * time.Millisecond
	oldCfg.Yield = newer.Load
	oldCfg.Registerer = prometheus.NewRegistry()
	run(t, oldCfg)
	eventually(t, "old install", func() bool {
		b, _ := os.ReadFile(primary)
		return hasEntry(primary) && bytes.Contains(b, []byte(`"info"`))
	})

	// The new agent starts (its own binary and entry) and registers.
	newer.Store(true)
	newSrc := filepath.Join(filepath.Dir(n.src), "ambit-cni.v2")
	if err := os.WriteFile(newSrc, []byte("#!/bin/sh\necho plugin v2\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	newCfg := n.config()
	newCfg.PluginSource = newSrc
	newCfg.Entry.LogLevel = "debug"
	stopNew := run(t, newCfg)
	isNew := func() bool {
		b, _ := os.ReadFile(primary)
		bin, _ := os.ReadFile(filepath.Join(n.bin, PluginType))
		return hasEntry(primary) && bytes.Contains(b, []byte(`"debug"`)) && bytes.Contains(bin, []byte("v2"))
	}
	eventually(t, "the new agent's binary and entry", isNew)
	// The primary CNI rewrites its file: only the new agent answers.
	if err := atomicfile.Write(primary, orig, atomicfile.Options{Mode: 0o644, UID: -1, GID: -1}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "re-assertion after the rewrite", isNew)
	// Many resyncs of the old installer: not once may it put its own
	// binary or entry back.
	for end := time.Now().Add(300 * time.Millisecond); time.Now().Before(end); time.Sleep(2 * time.Millisecond) {
		if !isNew() {
			b, _ := os.ReadFile(primary)
			t.Fatalf("the old agent overwrote the new one's files:\n%s", b)
		}
	}

	// The new agent vanished (crashed): the old one takes over again.
	stopNew()
	newer.Store(false)
	if err := os.Remove(filepath.Join(n.bin, PluginType)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the old agent restoring the binary", func() bool {
		bin, err := os.ReadFile(filepath.Join(n.bin, PluginType))
		return err == nil && bytes.Contains(bin, []byte("v1"))
	})
}

// A .conf converted by an agent from before "loadOnlyInlinedPlugins" (its
// list lacks the key) is still put back byte for byte by the uninstall of
// a newer agent: an upgrade then an uninstall must not leave the node on
// a .conflist with the original stranded in the backup directory.
func TestUninstallRestoresOlderConversion(t *testing.T) {
	n, orig, conf, list := convertedConf(t)
	// What the older agent wrote: the same list without the key.
	b, err := os.ReadFile(list)
	if err != nil {
		t.Fatal(err)
	}
	old := bytes.Replace(b, []byte("  \"loadOnlyInlinedPlugins\": true,\n"), nil, 1)
	if bytes.Equal(old, b) {
		t.Fatalf("the conversion no longer has the key line this test removes:\n%s", b)
	}
	if err := os.WriteFile(list, old, 0o600); err != nil {
		t.Fatal(err)
	}
	wantUninstalled(t, n, list, conf, orig, "original .conf not restored byte-identical")
}

// A .conf converted by an agent from before "loadOnlyInlinedPlugins":
// after the upgrade its list says the key too (the .conf never ran the
// network's drop-in plugins; without the key a libcni v1.3.0+ runtime
// runs them, after ambit-cni), and uninstall still puts the original
// back byte for byte. A list that is not exactly such a conversion is
// left as it is.
func TestUpgradeMarksOlderConversion(t *testing.T) {
	n := newNode(t)
	orig := fixture(t, "10-bridge.conf")
	conf := filepath.Join(n.conf, "10-bridge.conf")
	if err := os.WriteFile(conf, orig, 0o600); err != nil {
		t.Fatal(err)
	}
	c, _ := n.config().withDefaults()
	e, _ := entryOf(c.Entry)
	in := &installer{cfg: c, entry: e, m: n.m, log: n.log}
	if err := in.reconcile(); err != nil {
		t.Fatal(err)
	}
	list := filepath.Join(n.conf, "10-bridge.conflist")
	current, err := os.ReadFile(list)
	if err != nil {
		t.Fatal(err)
	}
	// What the older agent wrote: the same list without the key.
	old := bytes.Replace(current, []byte("  \"loadOnlyInlinedPlugins\": true,\n"), nil, 1)
	if bytes.Equal(old, current) {
		t.Fatalf("the conversion no longer has the key line this test removes:\n%s", current)
	}
	if err := os.WriteFile(list, old, 0o600); err != nil {
		t.Fatal(err)
	}
	nc, err := libcni.ConfFromBytes(orig)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(n.conf, nc.Network.Name, "50-tuning.conf"), `{"cniVersion":"0.3.1","type":"tuning"}`)
	if chain := runtimeChain(t, list); chain[len(chain)-1] != "tuning" {
		t.Fatalf("the older conversion: the runtime runs %v, want the drop-in last", chain)
	}

	// The upgraded agent.
	in = &installer{cfg: c, entry: e, m: n.m, log: n.log}
	if err := in.reconcile(); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(list); !bytes.Equal(got, current) {
		t.Errorf("after the upgrade the list is\n%s\nwant what this agent converts\n%s", got, current)
	}
	if chain := runtimeChain(t, list); strings.Join(chain, ",") != "bridge,"+PluginType {
		t.Errorf("after the upgrade the runtime runs %v, want bridge then ambit-cni", chain)
	}
	if err := in.reconcile(); err != nil {
		t.Fatal(err)
	}
	if err := Uninstall(context.Background(), n.config()); err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(conf); err != nil || !bytes.Equal(got, orig) {
		t.Fatalf("original .conf not restored byte-identical: %v\n%s", err, got)
	}
	if _, err := os.Stat(list); !os.IsNotExist(err) {
		t.Errorf("%s still exists after uninstall", list)
	}

	// A list that only looks converted (someone else's edit on top) is
	// not rewritten from the backup.
	if err := in.reconcile(); err != nil {
		t.Fatal(err)
	}
	edited := bytes.Replace(old, []byte(`"name"`), []byte(`"foo": 1, "name"`), 1)
	if bytes.Equal(edited, old) {
		t.Fatal("test edit did not apply")
	}
	if err := os.WriteFile(list, edited, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := in.reconcile(); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(list); !bytes.Equal(got, edited) {
		t.Errorf("a list that is not exactly a conversion was rewritten:\n%s", got)
	}
}

// TestRunWithoutInotify: the CNI directories cannot be watched (the
// node's inotify instances are exhausted by other daemons; newWatcher
// fails with the error inotify_init1 then gives). The installer used to
// stop: the node never got our entry and never became ready. It now
// installs anyway, answers a primary CNI's rewrite by polling, and
// watches again once an instance is free.
func TestRunWithoutInotify(t *testing.T) {
	var refuse atomic.Bool
	refuse.Store(true)
	var tries atomic.Int32
	restoreWatcher(t)
	newWatcher = func() (*fsnotify.Watcher, error) {
		tries.Add(1)
		if refuse.Load() {
			return nil, fmt.Errorf("couldn't initialize inotify: %w", syscall.EMFILE)
		}
		return fsnotify.NewWatcher()
	}
	unwatchedPoll = 20 * time.Millisecond

	n := newNode(t)
	primary := filepath.Join(n.conf, "10-flannel.conflist")
	orig := fixture(t, "10-flannel.conflist")
	if err := os.WriteFile(primary, orig, 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := n.config() // Resync an hour: only the poll can see a change
	run(t, cfg)
	eventually(t, "install without a watch", func() bool { return hasEntry(primary) })
	if got := testutil.ToFloat64(n.m.watching); got != 0 {
		t.Fatalf("ambit_installer_watching = %v without a watch", got)
	}
	if err := atomicfile.Write(primary, orig, atomicfile.Options{Mode: 0o644, UID: -1, GID: -1}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "re-assertion by polling", func() bool { return hasEntry(primary) && testutil.ToFloat64(n.m.reasserts) == 1 })
	if tries.Load() < 2 {
		t.Fatalf("the watch was tried %d times while polling", tries.Load())
	}

	refuse.Store(false)
	eventually(t, "watching again", func() bool { return testutil.ToFloat64(n.m.watching) == 1 })
	// Watching, the poll looks at nothing (and Resync is an hour): only
	// the watch's event can answer this rewrite.
	if err := atomicfile.Write(primary, orig, atomicfile.Options{Mode: 0o644, UID: -1, GID: -1}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "re-assertion once watching", func() bool { return hasEntry(primary) && testutil.ToFloat64(n.m.reasserts) == 2 })
}

// restoreWatcher puts newWatcher and unwatchedPoll back once the test's
// Run has returned: registered before run's cleanup, it runs after it
// (a deferred restore ran while Run could still read them).
func restoreWatcher(t *testing.T) {
	f, p := newWatcher, unwatchedPoll
	t.Cleanup(func() { newWatcher, unwatchedPoll = f, p })
}

// TestUnwatchedPollKeepsBackoff: while the CNI directories cannot be
// watched, each look (every unwatchedPoll) reconciled at once, even with
// a failed reconcile's retry pending: a config that stays refused (here a
// primary whose plugins all come from its drop-in directory, until an
// operator moves them) was retried, with an Error logged and
// ambit_installer_errors counted, at every look instead of with the
// backoff (200ms doubling up to 30s).
func TestUnwatchedPollKeepsBackoff(t *testing.T) {
	restoreWatcher(t)
	var looks atomic.Int32
	newWatcher = func() (*fsnotify.Watcher, error) {
		looks.Add(1)
		return nil, fmt.Errorf("couldn't initialize inotify: %w", syscall.EMFILE)
	}
	unwatchedPoll = 10 * time.Millisecond

	n := newNode(t)
	primary := filepath.Join(n.conf, "10-flannel.conflist")
	writeFile(t, primary, `{"cniVersion":"1.0.0","name":"cbr0"}`)
	old := time.Now().Add(-time.Hour) // not a file being written
	if err := os.Chtimes(primary, old, old); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(n.conf, "cbr0", "50-tuning.conf"), `{"cniVersion":"0.3.1","name":"cbr0","type":"tuning"}`)
	start := time.Now()
	run(t, n.config())
	eventually(t, "the refusal", func() bool { return testutil.ToFloat64(n.m.errors) >= 1 })
	from := looks.Load()
	eventually(t, "30 more looks", func() bool { return looks.Load() >= from+30 })
	failed := int(testutil.ToFloat64(n.m.errors))
	elapsed := time.Since(start)
	// The k-th failure comes at least 200ms·(2^(k-1)-1) after the
	// first: a bound that only a retry sooner than the backoff breaks,
	// however slow the machine.
	most := 1
	for wait, sum := 200*time.Millisecond, 200*time.Millisecond; sum <= elapsed; wait, sum = 2*wait, sum+2*wait {
		most++
	}
	if failed > most {
		t.Fatalf("%d failed reconciles in %v (%d looks), at most %d with the backoff", failed, elapsed.Round(time.Millisecond), looks.Load(), most)
	}
}
