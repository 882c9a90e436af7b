package install

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// ambit-cni refuses a config whose cniVersion it does not support
// (plugin/dispatch.go, checkVersion), ADD and DEL alike, and the entry
// inherits the list's version. Chained into such a list it fails every
// pod of the node on containerd, meshed or not, and their deletion too;
// CRI-O (ocicni validates each plugin's versions) drops the whole network.
// The installer must not chain there, and takes out an entry already in
// such a list; a list whose cniVersions (libcni v1.3.0+) lead to a
// supported version is chained.
func TestUnsupportedCNIVersionNotChained(t *testing.T) {
	n := newNode(t)
	c, _ := n.config().withDefaults()
	e, _ := entryOf(c.Entry)
	var installed *bool
	c.OnState = func(ok bool, _ string) { installed = &ok }
	in := &installer{cfg: c, entry: e, m: n.m, log: n.log}
	primary := filepath.Join(n.conf, "10-net.conflist")

	for _, tc := range []struct{ name, list string }{
		{"no cniVersion", `{"name":"net","plugins":[{"type":"bridge"}]}`},
		{"older than 0.3.0", `{"cniVersion":"0.2.0","name":"net","plugins":[{"type":"bridge"}]}`},
		{"newer than the plugin", `{"cniVersion":"1.2.0","name":"net","plugins":[{"type":"bridge"}]}`},
		{"our entry already there", `{"name":"net","plugins":[{"type":"bridge"},{"type":"ambit-cni","name":"ambit-cni"}]}`},
	} {
		writeFile(t, primary, tc.list)
		installed = nil
		err := in.reconcile()
		if err == nil || !strings.Contains(err.Error(), "cniVersion") {
			t.Errorf("%s: reconcile = %v, want a refusal naming the cniVersion", tc.name, err)
		}
		if installed == nil || *installed {
			t.Errorf("%s: reported installed", tc.name)
		}
		if has, _ := chainHas(runtimeChain(t, primary)); has {
			t.Errorf("%s: ambit-cni in the runtime's chain %v", tc.name, runtimeChain(t, primary))
		}
	}

	writeFile(t, primary, `{"cniVersions":["0.4.0","1.0.0"],"name":"net","plugins":[{"type":"bridge"}]}`)
	if err := in.reconcile(); err != nil {
		t.Fatalf("cniVersions leading to 1.0.0: %v", err)
	}
	if _, last := chainHas(runtimeChain(t, primary)); !last {
		t.Fatalf("runtime chain %v", runtimeChain(t, primary))
	}
}

// The versions the installer accepts are the plugin's.
func TestPluginVersionsMatchThePlugin(t *testing.T) {
	src, err := os.ReadFile(filepath.Join("..", "..", "plugin", "dispatch.go"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^var supportedVersions = \[\]string\{(.*)\}$`).FindSubmatch(src)
	if m == nil {
		t.Fatal("supportedVersions not found in plugin/dispatch.go")
	}
	want := `"` + strings.Join(pluginVersions, `", "`) + `"`
	if !bytes.Equal(m[1], []byte(want)) {
		t.Fatalf("plugin supports %s, the installer accepts %s", m[1], want)
	}
}
