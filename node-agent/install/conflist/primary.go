package conflist

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/containernetworking/cni/libcni"
)

// Extensions are the file name endings runtimes load from the CNI config
// directory (libcni's ConfFiles as containerd and CRI-O call it).
var Extensions = []string{".conf", ".conflist", ".json"}

// ErrNoPrimary means the directory holds no valid configuration yet: the
// primary CNI has not written its file.
var ErrNoPrimary = errors.New("no valid CNI configuration in the directory yet")

// Primary is the file the runtime uses.
type Primary struct {
	Path string
	// IsList is false for a single-plugin .conf/.json that must be
	// converted before chaining.
	IsList bool
	Data   []byte
	Info   os.FileInfo
}

// Skipped is a candidate that sorted before the primary but is not valid,
// so the runtime passes over it too (CRI-O) or fails on it (containerd).
type Skipped struct {
	Path   string
	Reason error
}

// IsCandidate reports whether a file name is one a runtime would load.
func IsCandidate(name string) bool {
	if strings.HasPrefix(name, ".") && strings.Contains(name, ".ambit-tmp-") {
		return false
	}
	ext := filepath.Ext(name)
	for _, e := range Extensions {
		if ext == e {
			return true
		}
	}
	return false
}

// Candidates lists, sorted, the files of dir a runtime would consider.
func Candidates(dir string) ([]string, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range ents {
		if e.IsDir() || !IsCandidate(e.Name()) {
			continue
		}
		p := filepath.Join(dir, e.Name())
		if e.Type()&os.ModeSymlink != 0 {
			// libcni follows links; a link to a directory is skipped.
			// A link we cannot follow stays: FindPrimary reports it
			// (the runtime on the host may well follow it).
			if fi, err := os.Stat(p); err == nil && fi.IsDir() {
				continue
			}
		}
		out = append(out, p)
	}
	sort.Strings(out)
	return out, nil
}

// FindPrimary returns the lexically first valid configuration in dir, and
// the invalid ones it passed over on the way.
func FindPrimary(dir string) (*Primary, []Skipped, error) {
	files, err := Candidates(dir)
	if err != nil {
		return nil, nil, fmt.Errorf("listing CNI config directory: %w", err)
	}
	var skipped []Skipped
	for _, f := range files {
		b, fi, err := ReadFile(f)
		if err != nil {
			if dst, lerr := os.Readlink(f); lerr == nil && errors.Is(err, os.ErrNotExist) {
				// Inside the agent's container only the CNI
				// directory is mounted: an absolute link out of it
				// dangles here while the runtime follows it.
				skipped = append(skipped, Skipped{f, fmt.Errorf("link to %s cannot be followed from here (the target must be visible to the installer: use a relative link inside the CNI config directory or mount the target's directory at the same path)", dst)})
				continue
			}
			if errors.Is(err, os.ErrNotExist) {
				continue // removed while we looked
			}
			skipped = append(skipped, Skipped{f, err})
			continue
		}
		isList := strings.HasSuffix(f, ".conflist")
		if err := Loads(f, b); err != nil {
			skipped = append(skipped, Skipped{f, err})
			continue
		}
		return &Primary{Path: f, IsList: isList, Data: b, Info: fi}, skipped, nil
	}
	return nil, skipped, ErrNoPrimary
}

// Loads reports whether a runtime loads b, the content of the file at
// path, as a network: with libcni's own parsers, which containerd
// (go-cni) and CRI-O (ocicni) call, plus the non-empty "type" both
// require of a single-plugin file. Our splicer's rules are no
// substitute: a file the runtime loads but we skipped (a key given
// twice, an empty "plugins" followed by a full one) had us chain ambit-cni
// into the next file while every pod started from this one, unenrolled;
// one we accepted but the runtime skips (a mistyped "capabilities" or
// "disableCheck", "cniVersion": null) had us chain into a file no pod
// used.
func Loads(path string, b []byte) error {
	if strings.HasSuffix(path, ".conflist") {
		l, err := libcni.NetworkConfFromBytes(b)
		if err != nil {
			return err
		}
		if len(l.Plugins) == 0 {
			// libcni would look for the plugins in a directory
			// named after the network; there is no list to chain
			// into.
			return errors.New("no \"plugins\" list")
		}
		return nil
	}
	c, err := libcni.NetworkPluginConfFromBytes(b)
	if err != nil {
		return err
	}
	if c.Network.Type == "" {
		return errors.New("missing 'type'")
	}
	return nil
}

// ReadFile reads a configuration file of at most MaxSize bytes.
func ReadFile(path string) ([]byte, os.FileInfo, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, nil, fmt.Errorf("%s is not a regular file", path)
	}
	b, err := io.ReadAll(io.LimitReader(f, MaxSize+1))
	if err != nil {
		return nil, nil, err
	}
	if len(b) > MaxSize {
		return nil, nil, fmt.Errorf("%s is larger than %d bytes", path, MaxSize)
	}
	return b, fi, nil
}

// ListName returns the .conflist name a converted .conf/.json gets.
func ListName(confPath string) string {
	return strings.TrimSuffix(confPath, filepath.Ext(confPath)) + ".conflist"
}
