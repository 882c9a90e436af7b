package install

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/fsnotify/fsnotify"
)

// restoreHashing puts hashed and racyWindow back once the test's Run
// has returned (registered before run's cleanup, it runs after it).
func restoreHashing(t *testing.T) {
	h, w := hashed, racyWindow
	t.Cleanup(func() { hashed, racyWindow = h, w })
}

// TestUnwatchedLookDoesNotRehash: while the CNI directories cannot be
// watched, every look (every second) read and sha256-hashed the
// installed plugin binary and its source, tens of MB each, for as long
// as inotify stayed exhausted. A look at an unchanged binary now reads
// neither; a same-size rewrite whose mtime was set back is still seen
// (its ctime moved) and repaired at the next look.
func TestUnwatchedLookDoesNotRehash(t *testing.T) {
	restoreWatcher(t)
	restoreHashing(t)
	var looks, reads atomic.Int32
	newWatcher = func() (*fsnotify.Watcher, error) {
		looks.Add(1)
		return nil, fmt.Errorf("couldn't initialize inotify: %w", syscall.EMFILE)
	}
	unwatchedPoll = 10 * time.Millisecond
	hashed = func(string) { reads.Add(1) }

	n := newNode(t)
	primary := filepath.Join(n.conf, "10-flannel.conflist")
	if err := os.WriteFile(primary, fixture(t, "10-flannel.conflist"), 0o644); err != nil {
		t.Fatal(err)
	}
	run(t, n.config())
	eventually(t, "install without a watch", func() bool { return hasEntry(primary) })

	// Files written less than racyWindow ago are read at each look;
	// then the looks settle.
	from, fromReads := looks.Load(), reads.Load()
	eventually(t, "5 looks that read no file", func() bool {
		if r := reads.Load(); r != fromReads {
			from, fromReads = looks.Load(), r
		}
		return looks.Load() >= from+5
	})
	from, fromReads = looks.Load(), reads.Load()
	eventually(t, "30 more looks", func() bool { return looks.Load() >= from+30 })
	if got := reads.Load() - fromReads; got != 0 {
		t.Fatalf("%d files read in %d looks at an unchanged binary", got, looks.Load()-from)
	}

	// Same inode, size and mtime: only the ctime tells.
	dst := filepath.Join(n.bin, PluginType)
	want, err := os.ReadFile(n.src)
	if err != nil {
		t.Fatal(err)
	}
	before, err := os.Stat(dst)
	if err != nil {
		t.Fatal(err)
	}
	evil := bytes.Replace(want, []byte("plugin"), []byte("evil!!"), 1)
	if len(evil) != len(want) || bytes.Equal(evil, want) {
		t.Fatal("test bug: the replacement must differ at the same size")
	}
	if err := os.WriteFile(dst, evil, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(dst, before.ModTime(), before.ModTime()); err != nil {
		t.Fatal(err)
	}
	after, err := os.Stat(dst)
	if err != nil {
		t.Fatal(err)
	}
	if !os.SameFile(before, after) || after.Size() != before.Size() || !after.ModTime().Equal(before.ModTime()) {
		t.Fatal("test bug: the rewrite must keep the inode, size and mtime")
	}
	eventually(t, "the rewritten binary repaired", func() bool {
		b, err := os.ReadFile(dst)
		return err == nil && bytes.Equal(b, want)
	})
}

// TestRecentFileReadAgain: file times come from a coarse clock, so a
// write just after a read can leave a file's stamp as it was. A file
// changed less than racyWindow before it was read is read again at the
// next look.
func TestRecentFileReadAgain(t *testing.T) {
	restoreHashing(t)
	var reads atomic.Int32
	hashed = func(string) { reads.Add(1) }
	p := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(p, []byte("v1"), 0o644); err != nil {
		t.Fatal(err)
	}
	known := sums{}
	look := func() [32]byte {
		t.Helper()
		s, err := known.sum(p)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	racyWindow = time.Hour // every file was just written
	look()
	look()
	if got := reads.Load(); got != 2 {
		t.Fatalf("a file written within the racy window was read %d times in 2 looks", got)
	}
	racyWindow = 0
	first := look()
	if look() != first {
		t.Fatal("sum changed for an unchanged file")
	}
	if got := reads.Load(); got != 3 {
		t.Fatalf("a settled file was read %d times in 2 looks, want 1", got-2)
	}
}
