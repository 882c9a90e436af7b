package atomicfile

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// TempMarker is part of every temporary file name this package creates, so
// watchers can ignore events on them.
const TempMarker = ".ambit-tmp-"

// ErrChanged is returned by Replace when the target no longer holds the
// bytes the caller based its change on: someone else wrote it meanwhile.
var ErrChanged = errors.New("file changed underneath")

// Options are the attributes the new file gets.
type Options struct {
	// Mode is the permission bits of the new file.
	Mode os.FileMode
	// UID and GID own the new file; -1 leaves the creator's.
	UID, GID int
}

// Attrs returns the mode and owner of an existing file, so a rewrite keeps
// them.
func Attrs(fi os.FileInfo) Options {
	o := Options{Mode: fi.Mode().Perm(), UID: -1, GID: -1}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		o.UID, o.GID = int(st.Uid), int(st.Gid)
	}
	return o
}

// Write atomically replaces (or creates) path with data.
func Write(path string, data []byte, o Options) error {
	return replace(path, nil, data, o)
}

// WriteFrom atomically replaces path with everything read from r.
func WriteFrom(path string, r io.Reader, o Options) error {
	return writeTemp(path, o, func(f *os.File) error {
		_, err := io.Copy(f, r)
		return err
	}, nil)
}

// Replace atomically replaces path with data, but only if path still holds
// exactly old; otherwise it returns ErrChanged and leaves the other
// writer's file in place. The swap is renameat2(RENAME_EXCHANGE): what it
// took out of path is compared with old afterwards, and if another writer
// got in between the check and the swap, the swap is undone — so that
// writer's change is not lost (a plain rename would overwrite it). Where
// the filesystem cannot exchange, a check right before a plain rename
// narrows the race to microseconds.
func Replace(path string, old, data []byte, o Options) error {
	if old == nil {
		old = []byte{}
	}
	return replace(path, old, data, o)
}

func replace(path string, old, data []byte, o Options) error {
	return writeTemp(path, o, func(f *os.File) error {
		_, err := f.Write(data)
		return err
	}, func() error {
		if old == nil {
			return nil
		}
		cur, err := os.ReadFile(path)
		if err != nil {
			return fmt.Errorf("%w: %s: %v", ErrChanged, path, err)
		}
		if !bytes.Equal(cur, old) {
			return fmt.Errorf("%w: %s", ErrChanged, path)
		}
		return nil
	}, old)
}

// exchange swaps tmp and path, then checks that what came out of path is
// old; if not, it swaps back and reports ErrChanged. ok is false when the
// filesystem cannot exchange (the caller renames instead).
func exchange(tmp, path string, old []byte) (ok bool, err error) {
	if err := unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, path, unix.RENAME_EXCHANGE); err != nil {
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EOPNOTSUPP) {
			return false, nil
		}
		if errors.Is(err, unix.ENOENT) {
			return true, fmt.Errorf("%w: %s vanished", ErrChanged, path)
		}
		return true, fmt.Errorf("exchanging %s and %s: %w", tmp, path, err)
	}
	prev, err := os.ReadFile(tmp)
	if err == nil && bytes.Equal(prev, old) {
		os.Remove(tmp)
		return true, nil
	}
	// Another writer replaced path between our check and the swap: put
	// its file back.
	if berr := unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, path, unix.RENAME_EXCHANGE); berr != nil {
		return true, fmt.Errorf("%w: %s, and restoring the other writer's file failed: %v", ErrChanged, path, berr)
	}
	os.Remove(tmp)
	return true, fmt.Errorf("%w: %s (during the swap)", ErrChanged, path)
}

// writeTemp writes a temporary file with fill and moves it to path. With
// check, path must pass it first; with expect (Replace), the move is an
// exchange verified against expect.
func writeTemp(path string, o Options, fill func(*os.File) error, check func() error, expect ...[]byte) (err error) {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	if strings.Contains(base, TempMarker) {
		return fmt.Errorf("refusing to write %s: its name looks like one of our temporary files", path)
	}
	f, err := os.CreateTemp(dir, "."+base+TempMarker+"*")
	if err != nil {
		return fmt.Errorf("creating temporary file for %s: %w", path, err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err = fill(f); err != nil {
		return fmt.Errorf("writing %s: %w", tmp, err)
	}
	if o.UID >= 0 || o.GID >= 0 {
		// Without CAP_CHOWN (the agent does not have it) only a
		// no-op chown succeeds: a file owned by someone else then
		// becomes root's, which every runtime reads the same.
		if err = f.Chown(o.UID, o.GID); err != nil && !errors.Is(err, syscall.EPERM) {
			return fmt.Errorf("chown %s: %w", tmp, err)
		}
		err = nil
	}
	// Chmod after chown: chown may clear setuid bits, and CreateTemp
	// made the file 0600 whatever the umask.
	if err = f.Chmod(o.Mode.Perm()); err != nil {
		return fmt.Errorf("chmod %s: %w", tmp, err)
	}
	if err = f.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", tmp, err)
	}
	if err = f.Close(); err != nil {
		return fmt.Errorf("closing %s: %w", tmp, err)
	}
	if check != nil {
		if err = check(); err != nil {
			return err
		}
	}
	if len(expect) == 1 && expect[0] != nil {
		var swapped bool
		if swapped, err = exchange(tmp, path, expect[0]); swapped {
			if err != nil {
				return err
			}
			return syncDir(dir)
		}
	}
	if err = os.Rename(tmp, path); err != nil {
		return fmt.Errorf("renaming %s to %s: %w", tmp, path, err)
	}
	return syncDir(dir)
}

// Remove deletes path and makes the removal durable. A missing file is
// not an error.
func Remove(path string) error {
	if err := os.Remove(path); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	return syncDir(filepath.Dir(path))
}

// Rename moves from to to atomically and durably.
func Rename(from, to string) error {
	if err := os.Rename(from, to); err != nil {
		return err
	}
	if err := syncDir(filepath.Dir(to)); err != nil {
		return err
	}
	if filepath.Dir(from) != filepath.Dir(to) {
		return syncDir(filepath.Dir(from))
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("opening directory %s to fsync: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil && !errors.Is(err, syscall.EINVAL) {
		return fmt.Errorf("fsync directory %s: %w", dir, err)
	}
	return nil
}
