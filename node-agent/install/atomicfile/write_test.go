package atomicfile

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestWriteReplaceAndLeftovers(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "10-x.conflist")
	if err := Write(p, []byte("one"), Options{Mode: 0o640, UID: -1, GID: -1}); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(p); fi.Mode().Perm() != 0o640 {
		t.Fatalf("mode %v", fi.Mode())
	}
	// Replace based on stale content is refused and changes nothing.
	if err := Replace(p, []byte("stale"), []byte("two"), Options{Mode: 0o640, UID: -1, GID: -1}); !errors.Is(err, ErrChanged) {
		t.Fatalf("stale Replace: %v", err)
	}
	if b, _ := os.ReadFile(p); string(b) != "one" {
		t.Fatalf("content %q after refused Replace", b)
	}
	if err := Replace(p, []byte("one"), []byte("two"), Options{Mode: 0o600, UID: os.Getuid(), GID: os.Getgid()}); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(p); string(b) != "two" {
		t.Fatalf("content %q", b)
	}
	// No temporary file survives, success or failure.
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if strings.Contains(e.Name(), TempMarker) {
			t.Errorf("leftover %s", e.Name())
		}
	}
	if len(ents) != 1 {
		t.Errorf("directory holds %d entries", len(ents))
	}
	if err := Write(filepath.Join(dir, "x"+TempMarker+"1"), nil, Options{Mode: 0o644, UID: -1, GID: -1}); err == nil {
		t.Error("wrote a file named like our temporaries")
	}
	if err := Remove(filepath.Join(dir, "missing")); err != nil {
		t.Errorf("removing a missing file: %v", err)
	}
}

// The swap behind Replace: it goes through when path still holds what the
// caller read, and when another writer got in between (the window a check
// before a plain rename leaves open), that writer's file stays.
func TestExchangeKeepsAConcurrentWrite(t *testing.T) {
	dir := t.TempDir()
	path, tmp := filepath.Join(dir, "10-x.conflist"), filepath.Join(dir, ".10-x.conflist"+TempMarker+"1")
	os.WriteFile(path, []byte("read"), 0o644)
	os.WriteFile(tmp, []byte("ours"), 0o644)
	if ok, err := exchange(tmp, path, []byte("read")); !ok || err != nil {
		t.Fatalf("exchange over an unchanged file: %v %v", ok, err)
	}
	if b, _ := os.ReadFile(path); string(b) != "ours" {
		t.Fatalf("path holds %q, want ours", b)
	}
	if _, err := os.Stat(tmp); !os.IsNotExist(err) {
		t.Fatalf("temporary file left: %v", err)
	}

	os.WriteFile(path, []byte("theirs"), 0o644) // written after we read "read"
	os.WriteFile(tmp, []byte("ours again"), 0o644)
	ok, err := exchange(tmp, path, []byte("ours"))
	if !ok || !errors.Is(err, ErrChanged) {
		t.Fatalf("exchange over a changed file: %v %v, want ErrChanged", ok, err)
	}
	if b, _ := os.ReadFile(path); string(b) != "theirs" {
		t.Fatalf("the other writer's file was lost: path holds %q", b)
	}
	if _, err := os.Stat(tmp); !os.IsNotExist(err) {
		t.Fatalf("temporary file left: %v", err)
	}
}
