package conflist

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
)

// runtimePick is the file a libcni runtime uses from dir: the lexically
// first that libcni loads, as CRI-O (ocicni) does; containerd (go-cni)
// loads the same first file and fails if it is invalid instead of moving
// on. A .conf/.json must also have a "type" (both runtimes check it).
func runtimePick(t *testing.T, dir string) string {
	t.Helper()
	files, err := libcni.ConfFiles(dir, Extensions)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if strings.HasSuffix(f, ".conflist") {
			if l, err := libcni.ConfListFromFile(f); err == nil && len(l.Plugins) > 0 {
				return f
			}
			continue
		}
		if c, err := libcni.ConfFromFile(f); err == nil && c.Network.Type != "" {
			return f
		}
	}
	return ""
}

// The file the installer chains into must be the file the runtime uses,
// whatever the first file looks like: a file we skip but the runtime
// loads leaves every pod unenrolled, with the installer reporting
// success.
func TestFindPrimaryAgreesWithRuntime(t *testing.T) {
	second := `{"cniVersion":"1.0.0","name":"second","plugins":[{"type":"bridge"}]}`
	firsts := map[string]string{
		"plain":                 `{"cniVersion":"1.0.0","name":"first","plugins":[{"type":"ptp"}]}`,
		"CRLF":                  "{\r\n  \"cniVersion\": \"1.0.0\",\r\n  \"name\": \"first\",\r\n  \"plugins\": [\r\n    {\"type\": \"ptp\"}\r\n  ]\r\n}\r\n",
		"UTF-8 BOM":             "\ufeff" + `{"cniVersion":"1.0.0","name":"first","plugins":[{"type":"ptp"}]}`,
		"odd whitespace":        "\t\n {\t\"cniVersion\"\n:\r\"1.0.0\" ,\"name\"  :\"first\",\n\n\"plugins\":[\t{\"type\":\"ptp\"}\n\t]\t}\n\n\t ",
		"plugins empty":         `{"cniVersion":"1.0.0","name":"first","plugins":[]}`,
		"no plugins":            `{"cniVersion":"1.0.0","name":"first"}`,
		"duplicate name":        `{"cniVersion":"1.0.0","name":"x","name":"first","plugins":[{"type":"ptp"}]}`,
		"duplicate plugins":     `{"cniVersion":"1.0.0","name":"first","plugins":[],"plugins":[{"type":"ptp"}]}`,
		"duplicate plugins 2":   `{"cniVersion":"1.0.0","name":"first","plugins":[{"type":"ptp"}],"plugins":[{"type":"macvlan"},{"type":"portmap"}]}`,
		"duplicate in plugin":   `{"cniVersion":"1.0.0","name":"first","plugins":[{"type":"ptp","type":"macvlan"}]}`,
		"empty name":            `{"cniVersion":"1.0.0","name":"","plugins":[{"type":"ptp"}]}`,
		"type not a string":     `{"cniVersion":"1.0.0","name":"first","plugins":[{"type":5}]}`,
		"Type capitalised":      `{"cniVersion":"1.0.0","name":"first","plugins":[{"Type":"ptp"}]}`,
		"bad capabilities":      `{"cniVersion":"1.0.0","name":"first","plugins":[{"type":"ptp","capabilities":"all"}]}`,
		"bad disableCheck":      `{"cniVersion":"1.0.0","name":"first","disableCheck":"maybe","plugins":[{"type":"ptp"}]}`,
		"bad cniVersions":       `{"cniVersion":"1.0.0","cniVersions":["x"],"name":"first","plugins":[{"type":"ptp"}]}`,
		"trailing garbage":      `{"cniVersion":"1.0.0","name":"first","plugins":[{"type":"ptp"}]} x`,
		"two objects":           `{"cniVersion":"1.0.0","name":"first","plugins":[{"type":"ptp"}]} {}`,
		"null cniVersion":       `{"cniVersion":null,"name":"first","plugins":[{"type":"ptp"}]}`,
		"plugin with null ipam": `{"cniVersion":"1.0.0","name":"first","plugins":[{"type":"ptp","ipam":null}]}`,
	}
	for name, first := range firsts {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			os.WriteFile(filepath.Join(dir, "10-first.conflist"), []byte(first), 0o644)
			os.WriteFile(filepath.Join(dir, "20-second.conflist"), []byte(second), 0o644)
			want := runtimePick(t, dir)
			p, _, err := FindPrimary(dir)
			got := ""
			if err == nil {
				got = p.Path
			}
			if got != want {
				t.Fatalf("the runtime uses %q, the installer would chain into %q (%v)", filepath.Base(want), filepath.Base(got), err)
			}
			if err != nil {
				return
			}
			out, _, err := Ensure(p.Data, ours)
			if name == "empty name" {
				// libcni loads it, but every plugin refuses a
				// network without a name: no chain to join, and
				// the installer says so rather than move on.
				if err == nil {
					t.Fatal("Ensure chained into a network without a name")
				}
				return
			}
			if err != nil {
				t.Fatalf("Ensure on the runtime's file: %v", err)
			}
			// What the runtime then loads: the same plugins, ours
			// last; and uninstall gives the original bytes back.
			before, err := libcni.NetworkConfFromBytes(p.Data)
			if err != nil {
				t.Fatal(err)
			}
			after, err := libcni.NetworkConfFromBytes(out)
			if err != nil {
				t.Fatalf("the runtime cannot load what Ensure wrote: %v\n%s", err, out)
			}
			if len(after.Plugins) != len(before.Plugins)+1 || after.Plugins[len(after.Plugins)-1].Network.Type != "ambit-cni" || after.Name != before.Name {
				t.Fatalf("the runtime sees %d plugins, last %q, name %q:\n%s", len(after.Plugins), after.Plugins[len(after.Plugins)-1].Network.Type, after.Name, out)
			}
			for i, pl := range before.Plugins {
				if !bytes.Equal(pl.Bytes, after.Plugins[i].Bytes) {
					t.Fatalf("plugin %d changed: %s -> %s", i, pl.Bytes, after.Plugins[i].Bytes)
				}
			}
			back, _, err := Remove(out, "ambit-cni")
			if err != nil || !bytes.Equal(back, p.Data) {
				t.Fatalf("Remove did not restore the original (%v):\n%q\n%q", err, back, p.Data)
			}
		})
	}
}
