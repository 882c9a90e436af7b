package conflist

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
)

var ours = mustEntry(`{"type":"ambit-cni","name":"ambit-cni","agentSocket":"/var/run/ambit/cni.sock"}`)

func mustEntry(s string) Entry {
	e, err := NewEntry([]byte(s))
	if err != nil {
		panic(err)
	}
	return e
}

func fixtures(t *testing.T) map[string][]byte {
	t.Helper()
	files, err := filepath.Glob("testdata/*.conflist")
	if err != nil || len(files) < 6 {
		t.Fatalf("fixtures: %v %v", files, err)
	}
	out := map[string][]byte{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		out[filepath.Base(f)] = b
	}
	return out
}

func types(t *testing.T, b []byte) []string {
	t.Helper()
	l, err := ParseList(b)
	if err != nil {
		t.Fatalf("result does not parse: %v\n%s", err, b)
	}
	var ts []string
	for _, p := range l.Plugins {
		ts = append(ts, p.Type)
	}
	return ts
}

// The runtime's own loader must accept what we write, with our entry last
// and every other plugin's bytes unchanged.
func TestEnsureOnFixtures(t *testing.T) {
	for name, orig := range fixtures(t) {
		t.Run(name, func(t *testing.T) {
			out, changed, err := Ensure(orig, ours)
			if err != nil || !changed {
				t.Fatalf("Ensure: changed=%v err=%v", changed, err)
			}
			nl, err := libcni.NetworkConfFromBytes(out)
			if err != nil {
				t.Fatalf("libcni refuses the result: %v\n%s", err, out)
			}
			if got := nl.Plugins[len(nl.Plugins)-1].Network.Type; got != "ambit-cni" {
				t.Fatalf("last plugin is %q, want ambit-cni\n%s", got, out)
			}
			before, _ := ParseList(orig)
			after, _ := ParseList(out)
			if len(after.Plugins) != len(before.Plugins)+1 {
				t.Fatalf("plugins %d -> %d", len(before.Plugins), len(after.Plugins))
			}
			for i, p := range before.Plugins {
				if !bytes.Equal(before.Raw(p), after.Raw(after.Plugins[i])) {
					t.Errorf("plugin %d (%s) bytes changed", i, p.Type)
				}
			}
			// Everything before the insertion point and the closing
			// part of the file are untouched.
			last := before.Plugins[len(before.Plugins)-1]
			if !bytes.HasPrefix(out, orig[:last.End]) || !bytes.HasSuffix(out, orig[last.End:]) {
				t.Errorf("bytes outside our entry changed:\n%s", out)
			}
			var m map[string]any
			if err := json.Unmarshal(after.Raw(after.Plugins[len(after.Plugins)-1]), &m); err != nil || m["agentSocket"] != "/var/run/ambit/cni.sock" {
				t.Errorf("our entry = %v, %v", m, err)
			}

			again, changed, err := Ensure(out, ours)
			if err != nil || changed || !bytes.Equal(again, out) {
				t.Fatalf("second Ensure not idempotent: changed=%v err=%v", changed, err)
			}

			back, changed, err := Remove(out, "ambit-cni")
			if err != nil || !changed {
				t.Fatalf("Remove: changed=%v err=%v", changed, err)
			}
			if !bytes.Equal(back, orig) {
				t.Fatalf("Remove is not the inverse of Ensure:\n--- want\n%s\n--- got\n%s", orig, back)
			}
		})
	}
}

// Changing our entry (a new socket path after an upgrade) replaces it in
// place; removal still restores the original.
func TestEnsureReplacesChangedEntry(t *testing.T) {
	for name, orig := range fixtures(t) {
		out, _, err := Ensure(orig, ours)
		if err != nil {
			t.Fatal(err)
		}
		other := mustEntry(`{"type":"ambit-cni","name":"ambit-cni","agentSocket":"/run/other.sock","logLevel":"debug"}`)
		out2, changed, err := Ensure(out, other)
		if err != nil || !changed {
			t.Fatalf("%s: replace: changed=%v err=%v", name, changed, err)
		}
		if bytes.Contains(out2, []byte("/var/run/ambit/cni.sock")) || !bytes.Contains(out2, []byte("/run/other.sock")) {
			t.Fatalf("%s: entry not replaced:\n%s", name, out2)
		}
		if n := strings.Count(string(out2), `"ambit-cni"`); n != 2 { // type and name
			t.Fatalf("%s: %d mentions of ambit-cni, want one entry\n%s", name, n, out2)
		}
		back, _, err := Remove(out2, "ambit-cni")
		if err != nil || !bytes.Equal(back, orig) {
			t.Fatalf("%s: remove after replace not byte-identical (%v):\n%s", name, err, back)
		}
	}
}

// A primary CNI that rewrites its list may leave our old entry in the
// middle (it appended its own plugin after ours) or duplicate it: we end up
// exactly once, last.
func TestEnsureMovesAndDeduplicates(t *testing.T) {
	cases := map[string]string{
		"middle":    `{"name":"n","cniVersion":"1.0.0","plugins":[{"type":"bridge"},{"type":"ambit-cni","agentSocket":"/old"},{"type":"portmap"}]}`,
		"first":     `{"name":"n","cniVersion":"1.0.0","plugins":[{"type":"ambit-cni"},{"type":"bridge"}]}`,
		"duplicate": `{"name":"n","cniVersion":"1.0.0","plugins":[{"type":"bridge"},{"type":"ambit-cni"},{"type":"ambit-cni"},{"type":"ambit-cni","x":1}]}`,
		"leading":   `{"name":"n","cniVersion":"1.0.0","plugins":[{"type":"ambit-cni"},{"type":"ambit-cni"},{"type":"bridge"}]}`,
	}
	for name, in := range cases {
		out, changed, err := Ensure([]byte(in), ours)
		if err != nil || !changed {
			t.Fatalf("%s: changed=%v err=%v", name, changed, err)
		}
		ts := types(t, out)
		if ts[len(ts)-1] != "ambit-cni" || strings.Count(strings.Join(ts, ","), "ambit-cni") != 1 {
			t.Fatalf("%s: plugins %v\n%s", name, ts, out)
		}
		if _, err := libcni.NetworkConfFromBytes(out); err != nil {
			t.Fatalf("%s: libcni: %v", name, err)
		}
	}
}

func TestRefusesNonPrimary(t *testing.T) {
	if _, _, err := Ensure([]byte(`{"name":"n","plugins":[{"type":"ambit-cni"}]}`), ours); err == nil {
		t.Fatal("Ensure accepted a list of only our plugin")
	}
	if _, _, err := Remove([]byte(`{"name":"n","plugins":[{"type":"ambit-cni"}]}`), "ambit-cni"); err == nil {
		t.Fatal("Remove emptied a list")
	}
	bad := []string{
		``, `[]`, `{}`, `{"name":"n"}`, `{"name":"n","plugins":[]}`, `{"name":"","plugins":[{"type":"x"}]}`,
		`{"name":"n","plugins":[{"type":""}]}`, `{"name":"n","plugins":[1]}`, `{"name":"n","plugins":[{"type":"x"}]} {}`,
		`{"name":"n","plugins":[{"type":"x"}`,
	}
	for _, b := range bad {
		if _, _, err := Ensure([]byte(b), ours); err == nil {
			t.Errorf("Ensure(%q) succeeded", b)
		}
	}
}

func TestConvertConf(t *testing.T) {
	orig, err := os.ReadFile("testdata/10-bridge.conf")
	if err != nil {
		t.Fatal(err)
	}
	l, err := Convert(orig)
	if err != nil {
		t.Fatal(err)
	}
	nl, err := libcni.NetworkConfFromBytes(l)
	if err != nil {
		t.Fatalf("libcni refuses the converted list: %v\n%s", err, l)
	}
	if nl.Name != "mynet" || nl.CNIVersion != "0.4.0" || len(nl.Plugins) != 1 || nl.Plugins[0].Network.Type != "bridge" {
		t.Fatalf("converted list = %+v", nl)
	}
	pl, _ := ParseList(l)
	if !bytes.Equal(pl.Raw(pl.Plugins[0]), bytes.TrimSpace(orig)) {
		t.Fatal("the original object was not embedded verbatim")
	}
	// libcni's own in-memory conversion gives the same plugin bytes.
	c, err := libcni.ConfFromBytes(orig)
	if err != nil {
		t.Fatal(err)
	}
	ref, err := libcni.ConfListFromConf(c)
	if err != nil {
		t.Fatal(err)
	}
	if ref.Name != nl.Name || ref.CNIVersion != nl.CNIVersion {
		t.Fatalf("libcni converts to %s/%s, we to %s/%s", ref.Name, ref.CNIVersion, nl.Name, nl.CNIVersion)
	}
	for _, bad := range []string{`{"name":"x"}`, `{"type":"x","plugins":[]}`, `[1]`, `{"type":"x"} trailing`} {
		if _, err := Convert([]byte(bad)); err == nil {
			t.Errorf("Convert(%q) succeeded", bad)
		}
	}
}

func TestFindPrimary(t *testing.T) {
	dir := t.TempDir()
	write := func(name, s string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := FindPrimary(dir); err != ErrNoPrimary {
		t.Fatalf("empty dir: %v", err)
	}
	write("99-loopback.conf", `{"cniVersion":"0.3.1","name":"lo","type":"loopback"}`)
	write("20-b.conflist", `{"name":"b","plugins":[{"type":"bridge"}]}`)
	write("10-broken.conflist", `{"name":"half`)
	write("05-notes.txt", `{"name":"x","plugins":[{"type":"bridge"}]}`)
	write(".10-a.conflist.ambit-tmp-123", `{"name":"x","plugins":[{"type":"bridge"}]}`)
	if err := os.Mkdir(filepath.Join(dir, "00-dir.conflist"), 0o755); err != nil {
		t.Fatal(err)
	}
	p, skipped, err := FindPrimary(dir)
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Base(p.Path) != "20-b.conflist" || !p.IsList {
		t.Fatalf("primary = %s", p.Path)
	}
	if len(skipped) != 1 || filepath.Base(skipped[0].Path) != "10-broken.conflist" {
		t.Fatalf("skipped = %v", skipped)
	}
	write("15-a.json", `{"name":"a","type":"bridge"}`)
	if p, _, _ = FindPrimary(dir); filepath.Base(p.Path) != "15-a.json" || p.IsList {
		t.Fatalf("primary = %+v", p)
	}
	// The runtime's own listing agrees on the order.
	files, err := libcni.ConfFiles(dir, Extensions)
	if err != nil {
		t.Fatal(err)
	}
	ours, _ := Candidates(dir)
	if strings.Join(files, ",") != strings.Join(ours, ",") {
		t.Fatalf("libcni lists %v, we list %v", files, ours)
	}
}

func FuzzEnsureRemove(f *testing.F) {
	for _, g := range []string{"testdata/10-calico.conflist", "testdata/10-kindnet.conflist", "testdata/20-compact.conflist", "testdata/30-crlf.conflist"} {
		b, err := os.ReadFile(g)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte(`{"name":"n","plugins":[{"type":"ambit-cni"},{"type":"b"}]}`))
	f.Add([]byte(`{"name":"n","plugins":[{"type":"b","type":"ambit-cni"}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		out, changed, err := Ensure(b, ours)
		if err != nil {
			return
		}
		if !Has(out, "ambit-cni") {
			t.Fatalf("Ensure succeeded without our entry")
		}
		if again, ch, err := Ensure(out, ours); err != nil || ch || !bytes.Equal(again, out) {
			t.Fatalf("not idempotent: %v %v", ch, err)
		}
		back, _, err := Remove(out, "ambit-cni")
		if err != nil {
			t.Fatalf("Remove after Ensure: %v", err)
		}
		if Has(back, "ambit-cni") {
			t.Fatal("Remove left our entry")
		}
		if changed && !Has(b, "ambit-cni") && !bytes.Equal(back, b) {
			t.Fatalf("Remove(Ensure(b)) != b\n%q\n%q", b, back)
		}
	})
}

func FuzzConvert(f *testing.F) {
	b, _ := os.ReadFile("testdata/10-bridge.conf")
	f.Add(b)
	f.Add([]byte(`{"type":"x","name":"\u2028"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		out, err := Convert(b)
		if err != nil {
			return
		}
		if _, err := ParseList(out); err != nil {
			t.Fatal(err)
		}
	})
}
