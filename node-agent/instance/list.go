package instance

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// Entry is a live agent of the registry, as a process that is not one of
// the agents sees it (`ambit-agent status`).
type Entry struct {
	Name     string
	Ready    bool
	Stopping bool
}

// List returns the live agents registered under stateDir, oldest first.
// It only reads: entries of dead agents are skipped, not removed (that is
// the agents' own work, Prune). An entry that cannot be read is listed as
// live, as the agents take it (alive).
func List(stateDir string) ([]Entry, error) {
	dir := filepath.Join(stateDir, Dir)
	names, ready, err := scan(dir)
	if err != nil {
		return nil, fmt.Errorf("instance registry: %w", err)
	}
	slices.Sort(names)
	var out []Entry
	for _, n := range names {
		live, stopping, err := entryState(filepath.Join(dir, n))
		if err == nil && !live {
			continue
		}
		out = append(out, Entry{Name: n, Ready: ready[n] && !stopping, Stopping: stopping})
	}
	return out, nil
}

// ReadName reads the instance name an agent wrote with WriteName
// (--instance-file), checked to be a plain entry name.
func ReadName(nameFile string) (string, error) {
	b, err := os.ReadFile(nameFile)
	if err != nil {
		return "", fmt.Errorf("agent not registered yet: %w", err)
	}
	name := strings.TrimSpace(string(b))
	if name == "" || strings.ContainsAny(name, "/\x00") || strings.HasPrefix(name, ".") || strings.HasSuffix(name, readySuffix) {
		return "", fmt.Errorf("%s: bad instance name %q", nameFile, name)
	}
	return name, nil
}

// Find is the registry entry of the agent name under stateDir, and
// whether that agent runs; err when it cannot be told (the entry exists,
// or may, and cannot be opened).
func Find(stateDir, name string) (e Entry, live bool, err error) {
	path := filepath.Join(stateDir, Dir, name)
	live, stopping, err := entryState(path)
	if err != nil || !live {
		return Entry{Name: name}, false, err
	}
	_, rerr := os.Stat(path + readySuffix)
	return Entry{Name: name, Ready: rerr == nil && !stopping, Stopping: stopping}, true, nil
}

// scan reads the registry dir: the agents' entries (in directory order)
// and which of them marked themselves ready; files being written are
// skipped.
func scan(dir string) (names []string, ready map[string]bool, err error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, nil, err
	}
	ready = map[string]bool{}
	for _, e := range ents {
		n := e.Name()
		switch {
		case strings.HasPrefix(n, tmpPrefix):
		case strings.HasSuffix(n, readySuffix):
			ready[strings.TrimSuffix(n, readySuffix)] = true
		default:
			names = append(names, n)
		}
	}
	return names, ready, nil
}
