package instance

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Dir is the registry's directory under the agent's state directory.
const Dir = "instances"

const (
	readySuffix = ".ready"
	tmpPrefix   = ".tmp-"
)

// Self is this process's registration.
type Self struct {
	dir, name string

	mu       sync.Mutex
	f        *os.File // holds the flock; nil once closed
	ready    bool
	stopping bool
	closed   bool

	// The last complete look at the registry, answered while it cannot
	// be read (the process out of descriptors): not knowing is not
	// "no other agent". Under lastMu, not mu: the directory is read
	// without holding mu.
	lastMu       sync.Mutex
	lastLive     []Peer          // live()'s last answer
	lastOthers   bool            // Others's last answer
	lastStopping map[string]bool // entries last seen stopping
}

// Peer is another live agent.
type Peer struct {
	Name  string
	Ready bool
}

// Register creates this agent's entry under stateDir/instances and locks
// it. The entry is created under a temporary name, locked, then renamed,
// so no other agent can see it unlocked and take it for a dead one.
func Register(stateDir string) (*Self, error) {
	dir := filepath.Join(stateDir, Dir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("instance registry: %w", err)
	}
	var rnd [4]byte
	rand.Read(rnd[:])
	// Zero-padded nanoseconds: names sort by start time.
	name := fmt.Sprintf("%020d-%s", time.Now().UnixNano(), hex.EncodeToString(rnd[:]))
	tmp := filepath.Join(dir, tmpPrefix+name)
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_EXCL|os.O_RDWR|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, fmt.Errorf("instance registry: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("instance registry: locking %s: %w", tmp, err)
	}
	fmt.Fprintf(f, "pid %d\n", os.Getpid())
	if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		f.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("instance registry: %w", err)
	}
	return &Self{dir: dir, name: name, f: f}, nil
}

// Name is this agent's entry name (start time and a random suffix).
func (s *Self) Name() string { return s.name }

// SetReady records that this agent serves (idempotent).
func (s *Self) SetReady() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.ready || s.stopping {
		return nil
	}
	f, err := os.OpenFile(filepath.Join(s.dir, s.name+readySuffix), os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return fmt.Errorf("instance registry: %w", err)
	}
	s.ready = true
	return f.Close()
}

// stoppingLine, appended to an entry, says its agent is shutting down.
const stoppingLine = "stopping\n"

// Stopping records that this agent is shutting down (SIGTERM): from now
// on it is no one's successor, ready or starting, although it stays
// alive (its entry locked) while it drains its connections for up to
// drainTimeout. It maintains nothing for the node meanwhile (its
// host-rule loop and installer stopped with it), so an older agent still
// running (this one's pod deleted during a surge, a rollback) must take
// the host rules, its readiness and the node's files back at once, not
// once this process exits.
//
// The mark is a line appended to the locked entry, written before the
// ready marker is removed, so no peer sees this agent as a starting
// successor in between. The ready marker goes too because agents before
// the mark existed read only that one (they see a starting successor:
// they take the host rules back, and keep answering 503 and leaving the
// node's files alone until this process exits, as before). Idempotent.
func (s *Self) Stopping() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.stopping {
		return nil
	}
	s.stopping = true
	if _, err := s.f.WriteString(stoppingLine); err != nil {
		return fmt.Errorf("instance registry: marking %s stopping: %w", s.name, err)
	}
	if err := os.Remove(filepath.Join(s.dir, s.name+readySuffix)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("instance registry: %w", err)
	}
	return nil
}

// Successor is the newest live agent that started after this one, if
// any. Entries of dead agents found on the way are removed.
func (s *Self) Successor() (Peer, bool) {
	peers := s.live()
	if len(peers) == 0 {
		return Peer{}, false
	}
	return peers[len(peers)-1], true
}

// ReadySuccessor is the newest live and ready agent that started after
// this one, if any. Not always Successor: a rollout started in the
// middle of a surge puts a third agent on the node, and the newest may
// still be starting while the middle one is ready. What is handed over
// once a successor is ready (the host probe rules) stays with the newest
// ready agent; a newer agent that is not ready does not give it back.
func (s *Self) ReadySuccessor() (Peer, bool) {
	peers := s.live()
	for i := len(peers) - 1; i >= 0; i-- {
		if peers[i].Ready {
			return peers[i], true
		}
	}
	return Peer{}, false
}

// Others reports whether another agent, older or newer, stopping or not,
// is alive on the node: records of pods it serves may still change.
// A registry that cannot be read answers as at the last look.
func (s *Self) Others() bool {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		s.lastMu.Lock()
		defer s.lastMu.Unlock()
		return s.lastOthers
	}
	others := false
	for _, e := range ents {
		n := e.Name()
		if n == s.name || strings.HasPrefix(n, tmpPrefix) || strings.HasSuffix(n, readySuffix) {
			continue
		}
		if alive(filepath.Join(s.dir, n)) {
			others = true
			break
		}
	}
	s.lastMu.Lock()
	s.lastOthers = others
	s.lastMu.Unlock()
	return others
}

// ServingPredecessor reports whether an older agent that is live, ready
// and not stopping runs on the node: one that serves the plugin socket
// now. Anything that cannot be read answers false (the caller then takes
// the socket itself, as an agent alone does).
func (s *Self) ServingPredecessor() bool {
	names, ready, err := scan(s.dir)
	if err != nil {
		return false
	}
	for _, n := range names {
		if n >= s.name || !ready[n] {
			continue
		}
		if live, stopping, err := entryState(filepath.Join(s.dir, n)); err == nil && live && !stopping {
			return true
		}
	}
	return false
}

// live lists the live agents newer than s that are not stopping, oldest
// first. What cannot be known is not taken for dead: a registry that
// cannot be read answers as at the last look, and an entry that cannot
// be opened (for any reason but its absence) is of a live agent,
// stopping if it was last seen so.
func (s *Self) live() []Peer {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		s.lastMu.Lock()
		defer s.lastMu.Unlock()
		return slices.Clone(s.lastLive)
	}
	s.lastMu.Lock()
	wasStopping := s.lastStopping
	s.lastMu.Unlock()
	seenStopping := map[string]bool{}
	readyFiles := map[string]bool{}
	var names []string
	for _, e := range ents {
		n := e.Name()
		switch {
		case strings.HasPrefix(n, tmpPrefix):
		case strings.HasSuffix(n, readySuffix):
			readyFiles[strings.TrimSuffix(n, readySuffix)] = true
		case n > s.name:
			names = append(names, n)
		}
	}
	slices.Sort(names)
	var peers []Peer
	for _, n := range names {
		live, stopping, err := entryState(filepath.Join(s.dir, n))
		switch {
		case err != nil:
			stopping = wasStopping[n]
		case !live:
			os.Remove(filepath.Join(s.dir, n))
			os.Remove(filepath.Join(s.dir, n+readySuffix))
			continue
		}
		if stopping {
			seenStopping[n] = true
			continue
		}
		peers = append(peers, Peer{Name: n, Ready: readyFiles[n]})
	}
	s.lastMu.Lock()
	s.lastLive, s.lastStopping = slices.Clone(peers), seenStopping
	s.lastMu.Unlock()
	return peers
}

// Prune removes the entries of dead agents (older or newer than s): a
// node where agents were killed does not accumulate files.
func (s *Self) Prune() {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return
	}
	for _, e := range ents {
		n := e.Name()
		if n == s.name || strings.HasPrefix(n, tmpPrefix) || strings.HasSuffix(n, readySuffix) {
			continue
		}
		if !alive(filepath.Join(s.dir, n)) {
			os.Remove(filepath.Join(s.dir, n))
			os.Remove(filepath.Join(s.dir, n+readySuffix))
		}
	}
	// Ready markers whose entry is gone.
	for _, e := range ents {
		n := e.Name()
		if base, ok := strings.CutSuffix(n, readySuffix); ok {
			if _, err := os.Lstat(filepath.Join(s.dir, base)); errors.Is(err, os.ErrNotExist) {
				os.Remove(filepath.Join(s.dir, n))
			}
		}
	}
}

// alive reports whether the agent that registered path may still hold
// its lock: only an entry known to be free (gone, or its lock takeable)
// is dead. One that cannot be opened for another reason (EMFILE when this
// process is out of descriptors, EACCES) is of an agent in an unknown
// state, and taking it for dead removed a live agent's registration
// (Prune) and made an older agent act as the newest (Successor).
func alive(path string) bool {
	live, _, err := entryState(path)
	return live || err != nil
}

// entryState is alive, and whether a live agent marked itself stopping;
// err (neither is known) when the entry exists, or may, but cannot be
// opened.
func entryState(path string) (live, stopping bool, err error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return false, false, nil
	}
	if err != nil {
		return false, false, err
	}
	defer f.Close()
	err = unix.Flock(int(f.Fd()), unix.LOCK_SH|unix.LOCK_NB)
	if err == nil {
		unix.Flock(int(f.Fd()), unix.LOCK_UN)
		return false, false, nil
	}
	// EWOULDBLOCK: held. Any other error: assume alive rather than delete
	// a live agent's entry. The entry is "pid N\n", then the stopping
	// line: a few bytes.
	var b [128]byte
	n, _ := io.ReadFull(f, b[:])
	return true, strings.Contains(string(b[:n]), "\n"+stoppingLine), nil
}

// Close removes this agent's entry and releases the lock. Called when the
// agent exits cleanly; after a crash the next agent prunes the entry.
func (s *Self) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	os.Remove(filepath.Join(s.dir, s.name+readySuffix))
	os.Remove(filepath.Join(s.dir, s.name))
	return s.f.Close()
}

// WriteName records this agent's entry name in path, a file private to
// its container (the pod's /tmp), for Probe: the kubelet's startup probe
// runs in the container and must learn whether *this* process is ready,
// not whichever agent answers the shared health port.
func (s *Self) WriteName(path string) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(s.name+"\n"), 0o644); err != nil {
		return fmt.Errorf("instance name file: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("instance name file: %w", err)
	}
	return nil
}

// Probe reports whether the agent named in nameFile is alive and ready.
// A name file left by a previous process of the same container (a
// restart keeps the pod's /tmp) names a dead agent: not ready.
func Probe(stateDir, nameFile string) error {
	b, err := os.ReadFile(nameFile)
	if err != nil {
		return fmt.Errorf("agent not registered yet: %w", err)
	}
	name := strings.TrimSpace(string(b))
	if name == "" || strings.ContainsAny(name, "/\x00") || strings.HasPrefix(name, ".") {
		return fmt.Errorf("%s: bad instance name %q", nameFile, name)
	}
	entry := filepath.Join(stateDir, Dir, name)
	live, stopping, err := entryState(entry)
	if err != nil {
		return fmt.Errorf("agent %s: cannot read its registry entry: %w", name, err)
	}
	if !live {
		return fmt.Errorf("agent %s is not running (a previous process?)", name)
	}
	if stopping {
		return fmt.Errorf("agent %s is stopping", name)
	}
	if _, err := os.Stat(entry + readySuffix); err != nil {
		return fmt.Errorf("agent %s is starting", name)
	}
	return nil
}
