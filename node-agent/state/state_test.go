package state

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestPutListDelete(t *testing.T) {
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	p := Pod{Namespace: "a", Name: "p", ContainerID: "c/../weird id", Netns: "/var/run/netns/x", IPs: []netip.Addr{netip.MustParseAddr("10.0.0.1")}, Enrolled: true}
	if err := s.Put(p); err != nil {
		t.Fatal(err)
	}
	if err := s.Put(Pod{Namespace: "a", Name: "q", ContainerID: "c2"}); err != nil {
		t.Fatal(err)
	}
	// A torn or foreign file is reported and removed, the rest still load.
	bad := filepath.Join(s.Dir(), "0123.json")
	os.WriteFile(bad, []byte("{not json"), 0o600)
	os.WriteFile(filepath.Join(s.Dir(), ".x.json.1.tmp"), []byte("{"), 0o600)
	got, errs := s.List()
	if len(got) != 2 || len(errs) != 1 || !strings.Contains(errs[0].Error(), "0123.json") {
		t.Fatalf("list: %+v %v", got, errs)
	}
	if _, err := os.Stat(bad); !os.IsNotExist(err) {
		t.Fatal("bad record not removed")
	}
	if err := s.Delete("c/../weird id"); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete("never-there"); err != nil {
		t.Fatal(err)
	}
	got, _ = s.List()
	if len(got) != 1 || got[0].ContainerID != "c2" {
		t.Fatalf("after delete: %+v", got)
	}
	if err := s.Put(Pod{}); err == nil {
		t.Fatal("record without container ID accepted")
	}
	ents, _ := os.ReadDir(s.Dir())
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), ".tmp") {
			t.Fatalf("temp file left: %s", e.Name())
		}
	}
}

func TestNamesRead(t *testing.T) {
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	p := Pod{Namespace: "a", Name: "p", ContainerID: "cid-1", Enrolled: true}
	if err := s.Put(p); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(s.Dir(), ".x.json.1.tmp"), []byte("{"), 0o600)
	os.WriteFile(filepath.Join(s.Dir(), "0123.json"), []byte(`{"containerID":"other"}`), 0o600)
	names, err := s.Names()
	if err != nil || len(names) != 2 {
		t.Fatalf("names: %v %v", names, err)
	}
	got, err := s.Read(FileName("cid-1"))
	if err != nil || got.Name != "p" || !got.Enrolled {
		t.Fatalf("read: %+v %v", got, err)
	}
	if _, err := s.Read("0123.json"); err == nil || !strings.Contains(err.Error(), "does not match") {
		t.Fatalf("a record under another's name: %v", err)
	}
	if _, err := s.Read("../x.json"); err == nil {
		t.Fatal("a path outside the store was read")
	}
	s.Delete("cid-1")
	if _, err := s.Read(FileName("cid-1")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("deleted record: %v", err)
	}
}
