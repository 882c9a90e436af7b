package install

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/ambit-mesh/ambit/node-agent/install/atomicfile"
)

// installBinary puts src at dir/ambit-cni unless an identical file is
// there already. The copy is renamed into place, so a runtime exec'ing the
// plugin meanwhile runs either the old or the new binary, never a partial
// one ("text file busy" cannot happen either: rename does not write to
// the running inode). known (may be nil) saves reading both files again
// when neither changed since the last call.
func installBinary(src, dir string, known sums) (changed bool, err error) {
	dst := filepath.Join(dir, PluginType)
	want, err := known.sum(src)
	if err != nil {
		return false, fmt.Errorf("reading plugin binary %s: %w", src, err)
	}
	if have, err := known.sum(dst); err == nil && have == want {
		return false, nil
	}
	in, err := os.Open(src)
	if err != nil {
		return false, err
	}
	defer in.Close()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return false, err
	}
	if err := atomicfile.WriteFrom(dst, in, atomicfile.Options{Mode: 0o755, UID: -1, GID: -1}); err != nil {
		return false, fmt.Errorf("installing %s: %w", dst, err)
	}
	delete(known, dst)
	return true, nil
}

func removeBinary(dir string) (bool, error) {
	dst := filepath.Join(dir, PluginType)
	if _, err := os.Lstat(dst); errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	return true, atomicfile.Remove(dst)
}

// sums remembers files' sha256 with the stamp they had when read. The
// installer looks at the plugin binary (tens of MB) and its source at
// every reconcile: every second while the CNI directories cannot be
// watched, possibly for days, and at every event in the bin directory.
// Reading and hashing both each time was a steady CPU and disk cost for
// nothing; an unchanged stamp now stands for unchanged content.
type sums map[string]stampedSum

type stampedSum struct {
	stamp fileStamp
	sum   [32]byte
}

// fileStamp is what any change to a file moves. The inode catches a
// replacement by rename, the size a truncation; the ctime catches the
// rest, a same-size rewrite whose mtime was set back included: the
// kernel sets it at every write or attribute change and no user can set
// it.
type fileStamp struct {
	dev, ino     uint64
	size         int64
	mode         os.FileMode
	mtime, ctime int64 // ns
}

func stampOf(fi os.FileInfo) (fileStamp, bool) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fileStamp{}, false
	}
	return fileStamp{
		dev: uint64(st.Dev), ino: st.Ino, size: fi.Size(), mode: fi.Mode(),
		mtime: fi.ModTime().UnixNano(), ctime: st.Ctim.Nano(),
	}, true
}

// racyWindow: a file whose ctime is less than this before it was read is
// hashed again at the next look. File times come from the kernel's
// coarse clock (a tick, up to 10 ms, on kernels before 6.13's multigrain
// timestamps), so a write just after our read could leave every field of
// the stamp as it was; once the ctime is older than a tick, any later
// write moves it. A second is far more than a tick and costs, after a
// write, a hash or two more. A var for tests.
var racyWindow = time.Second

// hashed, when set (tests), is called for every file sum reads.
var hashed func(path string)

// sum is p's sha256 (following links, as the runtime's exec does),
// read again only when p's stamp moved since known last read it.
func (known sums) sum(p string) ([32]byte, error) {
	fi, err := os.Stat(p)
	if err != nil {
		delete(known, p)
		return [32]byte{}, err
	}
	if c, ok := known[p]; ok {
		if st, ok := stampOf(fi); ok && st == c.stamp {
			return c.sum, nil
		}
	}
	// The time before the stamp of what is read: a write after that
	// stamp comes later than this.
	now := time.Now()
	f, err := os.Open(p)
	if err != nil {
		delete(known, p)
		return [32]byte{}, err
	}
	defer f.Close()
	if fi, err = f.Stat(); err != nil {
		delete(known, p)
		return [32]byte{}, err
	}
	if hashed != nil {
		hashed(p)
	}
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		delete(known, p)
		return [32]byte{}, err
	}
	var s [32]byte
	h.Sum(s[:0])
	st, ok := stampOf(fi)
	// A ctime in the future (the clock was set back) is not trusted
	// either, until the clock passes it.
	if ok && known != nil && now.Sub(time.Unix(0, st.ctime)) >= racyWindow {
		known[p] = stampedSum{st, s}
	} else {
		delete(known, p)
	}
	return s, nil
}
