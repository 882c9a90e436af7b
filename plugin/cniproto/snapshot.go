package cniproto

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"time"
)

// The enrollment snapshot lets the plugin answer one question without the
// agent: "could this pod be enrolled?". The agent alone knows labels; it
// writes this file (atomically) whenever its view of namespaces changes,
// and the plugin reads it only when the agent is unreachable:
//
//   - namespace excluded                        → pass, unenrolled
//   - snapshot missing or unreadable            → fail closed
//   - namespace ambient, or some pod opts in    → fail closed, "try again later"
//   - otherwise                                 → pass, unenrolled
//
// so an agent outage never holds up pods that would not be enrolled, and
// never lets a pod that would be enrolled start in plaintext (residual
// risk: a namespace labelled while the agent is down; see docs/plugin.md).

// DefaultSnapshotPath is where the agent writes the snapshot on the node.
const DefaultSnapshotPath = "/var/run/ambit/enrollment-snapshot.json"

// SnapshotVersion is the format this build reads and writes.
const SnapshotVersion = 1

// MaxSnapshotSize bounds the file the plugin reads (100k namespaces of 40
// bytes fit).
const MaxSnapshotSize = 4 << 20

// Snapshot is the agent's node-local summary of which namespaces may hold
// enrolled pods.
type Snapshot struct {
	Version   int       `json:"version"`
	Generated time.Time `json:"generated"`
	// LabelKey is the enrollment label the agent evaluated (for humans).
	LabelKey string `json:"labelKey"`
	// ExcludedNamespaces are never enrolled.
	ExcludedNamespaces []string `json:"excludedNamespaces"`
	// AmbientNamespaces carry the enrollment label themselves.
	AmbientNamespaces []string `json:"ambientNamespaces"`
	// OptInNamespaces hold at least one pod, anywhere in the cluster,
	// that opts in by its own label: a new pod there might too.
	OptInNamespaces []string `json:"optInNamespaces"`
}

// SnapshotVerdict is what a snapshot says about a namespace.
type SnapshotVerdict int

const (
	// NotEnrolled: no pod of the namespace can be enrolled.
	NotEnrolled SnapshotVerdict = iota
	// MayEnroll: a pod there may need the agent.
	MayEnroll
	// Excluded: the namespace is excluded from the mesh.
	Excluded
)

func (v SnapshotVerdict) String() string {
	return [...]string{"not-enrolled", "may-enroll", "excluded"}[v]
}

// Verdict classifies namespace.
func (s *Snapshot) Verdict(namespace string) SnapshotVerdict {
	switch {
	case slices.Contains(s.ExcludedNamespaces, namespace):
		return Excluded
	case slices.Contains(s.AmbientNamespaces, namespace), slices.Contains(s.OptInNamespaces, namespace):
		return MayEnroll
	}
	return NotEnrolled
}

// Validate reports the first problem with a snapshot.
func (s *Snapshot) Validate() error {
	if s.Version != SnapshotVersion {
		return fmt.Errorf("snapshot version %d not supported (this build reads %d)", s.Version, SnapshotVersion)
	}
	if s.Generated.IsZero() {
		return errors.New("snapshot has no generated time")
	}
	for field, list := range map[string][]string{"excludedNamespaces": s.ExcludedNamespaces, "ambientNamespaces": s.AmbientNamespaces, "optInNamespaces": s.OptInNamespaces} {
		for i, ns := range list {
			if err := checkName(fmt.Sprintf("%s[%d]", field, i), ns, 253); err != nil {
				return fmt.Errorf("snapshot: %w", err)
			}
		}
	}
	return nil
}

// DecodeSnapshot parses and validates snapshot bytes.
func DecodeSnapshot(b []byte) (*Snapshot, error) {
	if len(b) > MaxSnapshotSize {
		return nil, fmt.Errorf("snapshot of %d bytes exceeds the %d byte limit", len(b), MaxSnapshotSize)
	}
	var s Snapshot
	if err := decodeStrictN(b, &s, MaxSnapshotSize); err != nil {
		return nil, fmt.Errorf("malformed snapshot: %w", err)
	}
	if err := s.Validate(); err != nil {
		return nil, err
	}
	return &s, nil
}

// ReadSnapshot reads and validates the snapshot at path.
func ReadSnapshot(path string) (*Snapshot, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("reading enrollment snapshot: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, MaxSnapshotSize+1))
	if err != nil {
		return nil, fmt.Errorf("reading enrollment snapshot %s: %w", path, err)
	}
	s, err := DecodeSnapshot(b)
	if err != nil {
		return nil, fmt.Errorf("enrollment snapshot %s: %w", path, err)
	}
	return s, nil
}

// WriteSnapshot validates s and replaces path atomically: a temporary
// file in the same directory, synced, renamed over path, and the
// directory synced, so a reader sees the old or the new snapshot, never a
// torn one, even across a crash.
func WriteSnapshot(path string, s *Snapshot) error {
	if err := s.Validate(); err != nil {
		return err
	}
	b, err := marshalIndent(s)
	if err != nil {
		return err
	}
	if len(b) > MaxSnapshotSize {
		return fmt.Errorf("snapshot of %d bytes exceeds the %d byte limit", len(b), MaxSnapshotSize)
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("creating %s: %w", dir, err)
	}
	tmp, err := os.CreateTemp(dir, ".enrollment-snapshot-*")
	if err != nil {
		return fmt.Errorf("writing enrollment snapshot: %w", err)
	}
	defer os.Remove(tmp.Name()) // no-op after the rename
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return fmt.Errorf("writing enrollment snapshot: %w", err)
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("syncing enrollment snapshot: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("replacing %s: %w", path, err)
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

func marshalIndent(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := newEncoder(&buf)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
