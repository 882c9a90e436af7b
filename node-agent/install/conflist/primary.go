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
	// DropIns are the plugin configs a libcni v1.3.0+ runtime runs after
	// the list's own plugins (see DropIns); none for a .conf/.json, which
	// never loads them (and whose conversion keeps it so: Convert).
	DropIns []string
	// Inline are the types of a list's own plugins, in order.
	Inline []string
	// Name is the network's name (as libcni reads it).
	Name string
	// CNIVersion is the version the runtime gives every plugin of the
	// network: libcni's reading of "cniVersion" and, for a list,
	// "cniVersions" (v1.3.0+); "" when the file names none.
	CNIVersion string
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
		p := &Primary{Path: f, IsList: isList, Data: b, Info: fi}
		if p.Name, p.CNIVersion, p.DropIns, p.Inline, err = dropInsOf(f, b); err != nil {
			skipped = append(skipped, Skipped{f, err})
			continue
		}
		return p, skipped, nil
	}
	return nil, skipped, ErrNoPrimary
}

// DropIns lists the plugin configurations libcni adds to the network list
// named name read from a file in dir: since containernetworking/cni
// v1.3.0, ConfListFromFile (which containerd's go-cni and CRI-O's ocicni
// call for every .conflist) appends the *.conf files of <dir>/<name>/, in
// file name order, after the list's own "plugins", unless the list sets
// "loadOnlyInlinedPlugins": true (libcni/conf.go NetworkConfFromFile).
// Older libcni ignores them. Listed with libcni's own ConfFiles, so the
// same files count (a .json or .conflist there does not).
func DropIns(dir, name string) ([]string, error) {
	files, err := libcni.ConfFiles(filepath.Join(dir, name), []string{".conf"})
	if err != nil {
		return nil, fmt.Errorf("reading the network's plugin directory: %w", err)
	}
	sort.Strings(files)
	return files, nil
}

// dropInsOf is DropIns for the config at path with content b (valid, per
// Loads), for a list that does not keep to its inlined plugins, and the
// types of a list's own plugins. A single-plugin file names its network
// and has neither. Also the network's name and cniVersion.
func dropInsOf(path string, b []byte) (name, version string, dropIns, inline []string, err error) {
	if !strings.HasSuffix(path, ".conflist") {
		c, err := libcni.NetworkPluginConfFromBytes(b)
		if err != nil {
			return "", "", nil, nil, err
		}
		return c.Network.Name, c.Network.CNIVersion, nil, nil, nil
	}
	l, err := libcni.NetworkConfFromBytes(b)
	if err != nil {
		return "", "", nil, nil, err
	}
	for _, pl := range l.Plugins {
		inline = append(inline, pl.Network.Type)
	}
	if l.LoadOnlyInlinedPlugins || l.Name == "" {
		// An unnamed network is refused as such elsewhere.
		return l.Name, l.CNIVersion, nil, inline, nil
	}
	dropIns, err = DropIns(filepath.Dir(path), l.Name)
	return l.Name, l.CNIVersion, dropIns, inline, err
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
			// libcni v1.3.0+ takes the plugins from the directory
			// named after the network; a runtime with it uses this
			// file (the installer then refuses it: the drop-ins
			// would run after ambit-cni). Older libcni refuses it.
			if d, _ := DropIns(filepath.Dir(path), l.Name); len(d) > 0 && l.Name != "" {
				return nil
			}
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
