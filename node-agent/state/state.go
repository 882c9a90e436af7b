package state

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"
	"unicode/utf8"

	"golang.org/x/sys/unix"
)

// Pod is the record of one pod sandbox the agent was told about at ADD.
type Pod struct {
	Namespace   string `json:"namespace"`
	Name        string `json:"name"`
	UID         string `json:"uid,omitempty"`
	ContainerID string `json:"containerID"`
	// IfName is the CNI_IFNAME of the ADD that made the record: a
	// sandbox may have more attachments through the chain (Multus), and
	// the DEL of another one leaves the sandbox served. Empty in records
	// of agents before it, and of pods found by live enrollment.
	IfName string `json:"ifName,omitempty"`
	// Networks are the CNI networks (conflist names) in which the
	// sandbox has an attachment through ambit-cni, as ADD, CHECK and GC
	// told (node-agent/agent/networks.go). A GC of one network forgets
	// the sandbox only when it was in no other. "" stands for the
	// network of the record's own attachment (IfName) while it is
	// unknown: the plugin or the agent that wrote the record predates
	// network names. Empty means [""].
	Networks []string `json:"networks,omitempty"`
	// Netns is the runtime's path of the namespace (a bind mount that
	// lives as long as the sandbox), NetnsInode its inode when it was
	// handed to us, so a reused path is detected.
	Netns      string `json:"netns,omitempty"`
	NetnsInode uint64 `json:"netnsInode,omitempty"`
	// IPs are the pod's addresses; re-adoption checks the namespace
	// still holds one of them.
	IPs []netip.Addr `json:"ips,omitempty"`
	// Enrolled: redirection and listeners were set up.
	Enrolled bool `json:"enrolled"`
	// Identity is the SPIFFE ID the pod is served as.
	Identity string `json:"identity,omitempty"`
	// IPv4/IPv6: the families its redirection was built for.
	IPv4 bool `json:"ipv4,omitempty"`
	IPv6 bool `json:"ipv6,omitempty"`
	// Backend is the rule engine used, when the agent installed the rules
	// itself (live enrollment); empty when the plugin did.
	Backend string `json:"backend,omitempty"`
	// MigrateReq: net.ipv4.tcp_migrate_req is set in the pod's
	// namespace (agents before node-agent/podsysctl never managed to;
	// re-adoption sets it where this is false).
	MigrateReq bool      `json:"migrateReq,omitempty"`
	Since      time.Time `json:"since"`
}

// Key names the record of a container ID.
func Key(containerID string) string {
	h := sha256.Sum256([]byte(containerID))
	return hex.EncodeToString(h[:16])
}

// Store is the pods/ directory.
type Store struct{ dir string }

// Open creates <stateDir>/pods (0700) if needed.
func Open(stateDir string) (*Store, error) {
	dir := filepath.Join(stateDir, "pods")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("state: %w", err)
	}
	return &Store{dir: dir}, nil
}

// Dir is the directory of the records.
func (s *Store) Dir() string { return s.dir }

// Put writes a record atomically.
func (s *Store) Put(p Pod) error {
	b, err := encode(p)
	if err != nil {
		return err
	}
	return WriteFileAtomic(filepath.Join(s.dir, FileName(p.ContainerID)), b, 0o600)
}

// encode is a record's file content, refusing what would not come back
// as written.
func encode(p Pod) ([]byte, error) {
	if p.ContainerID == "" {
		return nil, errors.New("state: record without a container ID")
	}
	// JSON turns invalid UTF-8 into U+FFFD: such a record would come back
	// different (a container ID that no longer hashes to the file name, so
	// List would drop it and the pod would never be re-adopted; a netns
	// path that names another file). Refused here, where the caller logs
	// it, rather than lost silently at the next restart.
	for _, f := range []struct{ name, v string }{
		{"namespace", p.Namespace}, {"name", p.Name}, {"uid", p.UID}, {"containerID", p.ContainerID}, {"ifName", p.IfName},
		{"netns", p.Netns}, {"identity", p.Identity}, {"backend", p.Backend}, {"networks", strings.Join(p.Networks, ",")},
	} {
		if !utf8.ValidString(f.v) {
			return nil, fmt.Errorf("state: record of %q: %s %q is not valid UTF-8", p.ContainerID, f.name, f.v)
		}
	}
	b, err := json.Marshal(p)
	if err != nil {
		return nil, fmt.Errorf("state: %w", err)
	}
	return b, nil
}

// Update is Put for a record that exists: one that is missing is not
// written (ok false). An agent rewriting the record of a pod it serves
// (a refresh, a repaired backend) must not bring back a record another
// agent of the node removed meanwhile (its DEL during a surge upgrade):
// this agent would then never release the pod, and a later one would
// adopt a deleted sandbox. A look before a rename left a window (a
// removal between the two was undone, and under load it was: the
// records test lost the race 7 times in 40), so the new record is
// exchanged with the old one (renameat2 RENAME_EXCHANGE), which fails
// when there is none. On a filesystem that cannot exchange, the look
// and the rename are what is left.
func (s *Store) Update(p Pod) (ok bool, err error) {
	b, err := encode(p)
	if err != nil {
		return false, err
	}
	ok, err = writeAtomic(filepath.Join(s.dir, FileName(p.ContainerID)), b, 0o600, exchange)
	if err != nil {
		return false, fmt.Errorf("state: %w", err)
	}
	return ok, nil
}

// beforeMove, if set, runs between writing a temp file and moving it
// into place (tests: a removal in that window).
var beforeMove func(path string)

// exchange moves tmp to path only if a file is there: the swap is
// atomic, and afterwards tmp holds the file path held, which is removed.
func exchange(tmp, path string) (bool, error) {
	err := unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, path, unix.RENAME_EXCHANGE)
	switch {
	case err == nil:
		os.Remove(tmp)
		return true, nil
	case errors.Is(err, unix.ENOENT):
		return false, nil
	case errors.Is(err, unix.EINVAL), errors.Is(err, unix.ENOSYS), errors.Is(err, unix.EOPNOTSUPP):
		if _, err := os.Lstat(path); errors.Is(err, os.ErrNotExist) {
			return false, nil
		} else if err != nil {
			return false, err
		}
		if err := os.Rename(tmp, path); err != nil {
			return false, err
		}
		return true, nil
	default:
		return false, err
	}
}

// Delete removes the record of containerID; a missing record is fine.
func (s *Store) Delete(containerID string) error {
	err := os.Remove(filepath.Join(s.dir, Key(containerID)+".json"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("state: %w", err)
	}
	return nil
}

// staleTemp is how old a temp file must be for List to take it for the
// leftover of an interrupted write. A younger one may be a write in
// flight: during a surge upgrade the new agent lists the records while
// the old one still writes them (the ADDs it accepted before the new
// agent took the plugin socket), and removing its temp file made that
// Put fail and the record of the pod it enrolled was lost. A write takes
// milliseconds (seconds on a congested disk, for the fsync).
const staleTemp = time.Minute

// List reads every record. Unreadable records are returned as errors
// alongside the good ones, so one bad file never blocks re-adoption of
// the rest. One that is not a JSON object (a torn write from before
// atomic renames, a truncated hand edit) is removed. A JSON object this
// version cannot use (a field of another type, another file name) is
// left: it may be another agent version's, beside this one in a surge or
// a rollback, and that agent takes a record removed by another agent of
// the node for the pod's DEL and releases a running pod. Temp files of
// interrupted writes older than staleTemp are removed.
func (s *Store) List() ([]Pod, []error) {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, []error{fmt.Errorf("state: %w", err)}
	}
	var out []Pod
	var errs []error
	for _, e := range ents {
		name := e.Name()
		if strings.HasPrefix(name, ".") && strings.HasSuffix(name, ".tmp") {
			if info, err := e.Info(); err == nil && time.Since(info.ModTime()) > staleTemp {
				os.Remove(filepath.Join(s.dir, name)) // interrupted write
			}
			continue
		}
		if !strings.HasSuffix(name, ".json") {
			continue
		}
		path := filepath.Join(s.dir, name)
		b, err := os.ReadFile(path)
		if errors.Is(err, os.ErrNotExist) {
			continue // deleted since the directory was read
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("state: %w", err))
			continue
		}
		var obj map[string]json.RawMessage
		if err := json.Unmarshal(b, &obj); err != nil || obj == nil {
			if err == nil {
				err = errors.New("not a JSON object")
			}
			errs = append(errs, fmt.Errorf("state: %s: %v (removed)", path, err))
			os.Remove(path)
			continue
		}
		var p Pod
		if err := json.Unmarshal(b, &p); err != nil || p.ContainerID == "" || Key(p.ContainerID)+".json" != name {
			if err == nil {
				err = errors.New("record does not match its file name")
			}
			errs = append(errs, fmt.Errorf("state: %s: %v (left in place: another agent version's record?)", path, err))
			continue
		}
		out = append(out, p)
	}
	return out, errs
}

// Names lists the file names of the records (as List reads them), for a
// caller that follows records written by another agent (node-agent/agent,
// a surge upgrade) without reading every one each time.
func (s *Store) Names() ([]string, error) {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("state: %w", err)
	}
	out := make([]string, 0, len(ents))
	for _, e := range ents {
		if n := e.Name(); strings.HasSuffix(n, ".json") && !strings.HasPrefix(n, ".") {
			out = append(out, n)
		}
	}
	return out, nil
}

// FileName is the name of containerID's record, as Names lists it.
func FileName(containerID string) string { return Key(containerID) + ".json" }

// Read reads the record named name (from Names). A record gone meanwhile
// is an error satisfying errors.Is(err, os.ErrNotExist); a bad one is an
// error too, left for List to remove.
func (s *Store) Read(name string) (Pod, error) {
	if strings.ContainsRune(name, '/') || !strings.HasSuffix(name, ".json") {
		return Pod{}, fmt.Errorf("state: %q is not a record name", name)
	}
	b, err := os.ReadFile(filepath.Join(s.dir, name))
	if err != nil {
		return Pod{}, fmt.Errorf("state: %w", err)
	}
	var p Pod
	if err := json.Unmarshal(b, &p); err != nil {
		return Pod{}, fmt.Errorf("state: %s: %w", name, err)
	}
	if p.ContainerID == "" || FileName(p.ContainerID) != name {
		return Pod{}, fmt.Errorf("state: %s: record does not match its file name", name)
	}
	return p, nil
}

// WriteFileAtomic writes b to path so readers see the old or the new
// content, never a mix: a temp file in the same directory, fsync, rename,
// fsync of the directory.
func WriteFileAtomic(path string, b []byte, mode os.FileMode) error {
	_, err := writeAtomic(path, b, mode, func(tmp, path string) (bool, error) {
		return true, os.Rename(tmp, path)
	})
	return err
}

// writeAtomic writes b to a temp file beside path, fsyncs it, and has
// move put it in place; moved false (nothing written) leaves path as it
// was. The directory is fsynced after a move.
func writeAtomic(path string, b []byte, mode os.FileMode, move func(tmp, path string) (bool, error)) (moved bool, err error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return false, err
	}
	tmp := f.Name()
	defer func() {
		if !moved {
			os.Remove(tmp)
		}
	}()
	if _, err := f.Write(b); err != nil {
		f.Close()
		return false, err
	}
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return false, err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return false, err
	}
	if err := f.Close(); err != nil {
		return false, err
	}
	if beforeMove != nil {
		beforeMove(path)
	}
	if moved, err = move(tmp, path); err != nil || !moved {
		return false, err
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return true, nil
}
