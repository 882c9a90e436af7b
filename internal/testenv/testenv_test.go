package testenv

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// TestSweepBinDirs: the sweep removes the binary directory of a process
// that is gone (unlocked, older than a minute) and keeps one a live
// process holds and one just made (its maker may not have locked it yet).
func TestSweepBinDirs(t *testing.T) {
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp)
	old := time.Now().Add(-time.Hour)
	mk := func(name string, mtime time.Time) string {
		d := filepath.Join(tmp, name)
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(d, "ambit-cni"), []byte("x"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(d, mtime, mtime); err != nil {
			t.Fatal(err)
		}
		return d
	}
	dead := mk(binPrefix+"dead", old)
	live := mk(binPrefix+"live", old)
	young := mk(binPrefix+"young", time.Now())
	other := mk("ambit-bin-123", old) // not ours to judge: no lock protocol
	f, err := os.Open(live)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// A lock on its own open file description conflicts with the sweep's
	// even within this process, as another process's would.
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		t.Fatal(err)
	}
	sweepBinDirs()
	if _, err := os.Stat(dead); !os.IsNotExist(err) {
		t.Errorf("dead process's directory kept: %v", err)
	}
	for _, d := range []string{live, young, other} {
		if _, err := os.Stat(filepath.Join(d, "ambit-cni")); err != nil {
			t.Errorf("%s: %v", filepath.Base(d), err)
		}
	}
}

// TestBinDirRemoved: the directory binDir makes is locked while the
// process lives and gone after RemoveBinaries.
func TestBinDirRemoved(t *testing.T) {
	t.Setenv("TMPDIR", t.TempDir())
	t.Cleanup(RemoveBinaries)
	d, err := binDir()
	if err != nil {
		t.Fatal(err)
	}
	if d2, _ := binDir(); d2 != d {
		t.Fatalf("second binDir %s, first %s", d2, d)
	}
	f, err := os.Open(d)
	if err != nil {
		t.Fatal(err)
	}
	err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
	f.Close()
	if err != syscall.EWOULDBLOCK {
		t.Fatalf("flock of a live process's directory: %v, want EWOULDBLOCK", err)
	}
	RemoveBinaries()
	if _, err := os.Stat(d); !os.IsNotExist(err) {
		t.Fatalf("after RemoveBinaries: %v", err)
	}
}
