package install

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/ambit-mesh/ambit/node-agent/install/atomicfile"
)

// installBinary puts src at dir/ambit-cni unless an identical file is
// there already. The copy is renamed into place, so a runtime exec'ing the
// plugin meanwhile runs either the old or the new binary, never a partial
// one ("text file busy" cannot happen either: rename does not write to
// the running inode).
func installBinary(src, dir string) (changed bool, err error) {
	dst := filepath.Join(dir, PluginType)
	want, err := fileSum(src)
	if err != nil {
		return false, fmt.Errorf("reading plugin binary %s: %w", src, err)
	}
	if have, err := fileSum(dst); err == nil && bytes.Equal(have, want) {
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
	return true, nil
}

func removeBinary(dir string) (bool, error) {
	dst := filepath.Join(dir, PluginType)
	if _, err := os.Lstat(dst); errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	return true, atomicfile.Remove(dst)
}

func fileSum(p string) ([]byte, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return nil, err
	}
	return h.Sum(nil), nil
}
