package state

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
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
	// A temp file left by an interrupted write long ago.
	leftover := filepath.Join(s.Dir(), ".x.json.1.tmp")
	os.WriteFile(leftover, []byte("{"), 0o600)
	old := time.Now().Add(-2 * staleTemp)
	os.Chtimes(leftover, old, old)
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

// TestListLeavesAWriteInFlight: during a surge upgrade the new agent
// lists the records (re-adoption) while the old one still writes them
// (the ADDs it accepted before the new agent took the plugin socket).
// The old agent's temp file is not a leftover of an interrupted write:
// removing it made that Put fail, the record was lost, and the new
// agent never learned the pod the old one enrolled.
func TestListLeavesAWriteInFlight(t *testing.T) {
	dir := t.TempDir()
	writer, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	lister, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	listed := make(chan int)
	go func() {
		n := 0
		for {
			select {
			case <-stop:
				listed <- n
				return
			default:
			}
			lister.List()
			n++
		}
	}()
	var failed []error
	puts := 0
	for deadline := time.Now().Add(time.Second); time.Now().Before(deadline) && len(failed) == 0; puts++ {
		p := Pod{Namespace: "apps", Name: "p", ContainerID: fmt.Sprintf("cid-%d", puts), Enrolled: true}
		if err := writer.Put(p); err != nil {
			failed = append(failed, err)
		}
	}
	close(stop)
	lists := <-listed
	if len(failed) > 0 {
		t.Fatalf("a Put failed while another store listed the records (%d puts, %d lists): %v", puts, lists, failed[0])
	}
	recs, errs := lister.List()
	if len(recs) != puts || len(errs) != 0 {
		t.Fatalf("%d records listed (%v), want the %d put", len(recs), errs, puts)
	}
	t.Logf("%d puts beside %d lists", puts, lists)
}

// TestListRemovesStaleTempFiles: a temp file left by an interrupted write
// (a crash between create and rename) is removed once it is old enough
// not to be a write in flight.
func TestListRemovesStaleTempFiles(t *testing.T) {
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	stale := filepath.Join(s.Dir(), ".a.json.1.tmp")
	fresh := filepath.Join(s.Dir(), ".b.json.2.tmp")
	for _, p := range []string{stale, fresh} {
		if err := os.WriteFile(p, []byte("{"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	old := time.Now().Add(-2 * staleTemp)
	if err := os.Chtimes(stale, old, old); err != nil {
		t.Fatal(err)
	}
	if recs, errs := s.List(); len(recs) != 0 || len(errs) != 0 {
		t.Fatalf("list: %v %v", recs, errs)
	}
	if _, err := os.Stat(stale); !os.IsNotExist(err) {
		t.Fatalf("stale temp file not removed: %v", err)
	}
	if _, err := os.Stat(fresh); err != nil {
		t.Fatalf("fresh temp file (a write in flight) removed: %v", err)
	}
}

// TestUpdate: Update rewrites a record that exists and never writes back
// one that was removed (by another agent of the node, whose removal it
// is).
func TestUpdate(t *testing.T) {
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	p := Pod{Namespace: "apps", Name: "a", ContainerID: "cid-a", Since: time.Now().UTC()}
	if ok, err := s.Update(p); ok || err != nil {
		t.Fatalf("Update of a missing record: %v %v, want false <nil>", ok, err)
	}
	if _, err := s.Read(FileName("cid-a")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a missing record was written: %v", err)
	}
	if err := s.Put(p); err != nil {
		t.Fatal(err)
	}
	p.Backend = "nftables"
	if ok, err := s.Update(p); !ok || err != nil {
		t.Fatalf("Update of a record: %v %v, want true <nil>", ok, err)
	}
	if got, err := s.Read(FileName("cid-a")); err != nil || got.Backend != "nftables" {
		t.Fatalf("after Update: %+v %v", got, err)
	}
}

// TestUpdateRacingARemoval: another agent removes the record after
// Update has written its temp file and before it is moved into place
// (the window the look-then-rename had: the agent's repair rewrote the
// record a surge agent's DEL had just removed, so no agent ever released
// the pod). The removal stands, Update says it wrote nothing, and no
// temp file is left behind.
func TestUpdateRacingARemoval(t *testing.T) {
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	p := Pod{Namespace: "apps", Name: "a", ContainerID: "cid-a", Since: time.Now().UTC()}
	if err := s.Put(p); err != nil {
		t.Fatal(err)
	}
	beforeMove = func(string) {
		if err := s.Delete("cid-a"); err != nil {
			t.Error(err)
		}
	}
	defer func() { beforeMove = nil }()
	p.Backend = "nftables"
	if ok, err := s.Update(p); ok || err != nil {
		t.Fatalf("Update racing a removal: %v %v, want false <nil>", ok, err)
	}
	if _, err := s.Read(FileName("cid-a")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the removed record came back: %v", err)
	}
	if names, err := os.ReadDir(s.Dir()); err != nil || len(names) != 0 {
		t.Fatalf("left in the directory: %v %v", names, err)
	}
	// And when nothing removes it, the exchange leaves only the new record.
	beforeMove = nil
	if err := s.Put(p); err != nil {
		t.Fatal(err)
	}
	p.Backend = "iptables-nft"
	if ok, err := s.Update(p); !ok || err != nil {
		t.Fatalf("Update: %v %v", ok, err)
	}
	if got, err := s.Read(FileName("cid-a")); err != nil || got.Backend != "iptables-nft" {
		t.Fatalf("after Update: %+v %v", got, err)
	}
	if names, err := os.ReadDir(s.Dir()); err != nil || len(names) != 1 {
		t.Fatalf("after Update the directory holds %v %v, want the record alone", names, err)
	}
}

// TestListSkipsARecordRemovedMeanwhile: a record deleted between List's
// directory read and its file read (a DEL, another agent of the node
// during a surge) is simply not there: no error, so the agent does not
// log "pod record unreadable" for a pod that just left. (A dangling
// link stands in for the removal, which no test can time.)
func TestListSkipsARecordRemovedMeanwhile(t *testing.T) {
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Put(Pod{Namespace: "a", Name: "q", ContainerID: "c2"}); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(s.Dir(), "gone"), filepath.Join(s.Dir(), Key("c3")+".json")); err != nil {
		t.Fatal(err)
	}
	got, errs := s.List()
	if len(got) != 1 || got[0].ContainerID != "c2" || len(errs) != 0 {
		t.Fatalf("list: %+v, errors %v; want c2 alone and no error", got, errs)
	}
}

// TestListKeepsAnotherVersionsRecord: a record that is a whole JSON
// object this version cannot use (a field of another type, a file name
// from another naming) may be another agent version's, written during a
// surge or before a rollback. Removing it was taken by that agent, still
// running beside this one, for this agent's DEL of the pod: it released
// the pod (its connections reset) while its sandbox ran on, and this
// agent never served it either. Reported, left in place. A file that is
// not JSON at all (torn, truncated, empty) is no agent's: removed.
func TestListKeepsAnotherVersionsRecord(t *testing.T) {
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Put(Pod{Namespace: "a", Name: "good", ContainerID: "c0", Enrolled: true}); err != nil {
		t.Fatal(err)
	}
	keep := map[string]string{
		FileName("c1"): `{"namespace":"a","name":"p","containerID":"c1","enrolled":true,"ips":[{"addr":"10.0.0.1","prefixLen":24}]}`,
		FileName("c2"): `{"namespace":"a","name":"q","containerID":"c2","enrolled":"yes"}`,
		"v3-c3.json":   `{"version":3,"namespace":"a","name":"r","containerID":"c3","enrolled":true}`,
	}
	drop := map[string]string{
		FileName("c4"): `{"namespace":"a","name":"s","contai`,
		FileName("c5"): ``,
		FileName("c6"): `null`,
	}
	for _, m := range []map[string]string{keep, drop} {
		for n, b := range m {
			if err := os.WriteFile(filepath.Join(s.Dir(), n), []byte(b), 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	got, errs := s.List()
	if len(got) != 1 || got[0].ContainerID != "c0" || len(errs) != len(keep)+len(drop) {
		t.Fatalf("list: %+v %v", got, errs)
	}
	for n := range keep {
		if _, err := os.Stat(filepath.Join(s.Dir(), n)); err != nil {
			t.Errorf("%s (%s) removed: %v", n, keep[n], err)
		}
	}
	for n := range drop {
		if _, err := os.Stat(filepath.Join(s.Dir(), n)); !os.IsNotExist(err) {
			t.Errorf("%s (%q) kept: %v", n, drop[n], err)
		}
	}
	// Still there, so reported again: the agent logs them at start.
	if _, errs := s.List(); len(errs) != len(keep) {
		t.Fatalf("second list: %v", errs)
	}
}
