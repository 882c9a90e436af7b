package filesource

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/ambit-mesh/ambit/node-agent/policy"
)

// SourceName is the name under which files' policies reach the Engine.
const SourceName = "files"

// Source loads a directory into an Engine.
type Source struct {
	dir    string
	engine *policy.Engine
	log    *slog.Logger

	mu     sync.Mutex
	good   map[string]fileState // last good content per file name
	logged map[string]string    // object key -> last problem logged
	loaded bool                 // the directory was listed once
}

type fileState struct {
	data []byte
	set  policy.Set
}

// New returns a Source for dir feeding engine.
func New(dir string, engine *policy.Engine, log *slog.Logger) *Source {
	if log == nil {
		log = slog.Default()
	}
	return &Source{dir: dir, engine: engine, log: log.With("component", "policy-files", "dir", dir),
		good: map[string]fileState{}, logged: map[string]string{}}
}

// Problem is one thing wrong with the directory's content.
type Problem struct {
	File    string
	Object  string // "AuthorizationPolicy shop/allow-web"; "" for a whole document
	Message string // names the field
}

func (p Problem) String() string {
	if p.Object == "" {
		return p.File + ": " + p.Message
	}
	return p.File + ": " + p.Object + ": " + p.Message
}

// Load reads the directory once and hands the result to the Engine. It
// returns the problems found (also logged). A missing directory means no
// policies.
func (s *Source) Load() []Problem {
	s.mu.Lock()
	defer s.mu.Unlock()
	var problems []Problem
	names, err := s.list()
	if err != nil && s.loaded {
		problems = append(problems, Problem{File: s.dir, Message: err.Error()})
		s.log.Error("policy directory unreadable; keeping the policies in force", "err", err)
		return problems
	}
	if err != nil {
		// Nothing was ever read: no policy in force would allow
		// everything the directory may deny.
		problems = append(problems, Problem{File: s.dir, Message: err.Error() + denyAllNote})
		s.log.Error("policy directory unreadable; denying every connection until it can be read", "err", err)
		s.engine.Update(SourceName, policy.Set{Policies: []policy.AuthorizationPolicy{s.denyAll()}})
		return problems
	}
	s.loaded = true
	unreadable := false
	var set policy.Set
	origin := map[string]string{} // object key -> file
	seen := map[string]bool{}
	for _, name := range names {
		seen[name] = true
		path := filepath.Join(s.dir, name)
		data, err := os.ReadFile(path)
		fsState, ok := s.good[name]
		if err == nil && ok && bytes.Equal(data, fsState.data) {
			// unchanged
		} else if err != nil {
			msg := err.Error()
			if !ok {
				// Never read: what it holds (a DENY?) is unknown.
				unreadable, msg = true, msg+denyAllNote
			}
			problems = append(problems, Problem{File: path, Message: msg})
		} else {
			fset, errs := policy.Decode(bytes.NewReader(data))
			broken := false
			for _, e := range errs {
				var de *policy.DocError
				if errors.As(e, &de) && de.Syntax {
					broken = true
				}
			}
			if broken && !ok {
				// Never parsed: as for a file never read, what it
				// holds (a DENY?) is unknown. Skipping it let an agent
				// restarted on a half-saved edit allow everything.
				unreadable = true
			}
			for _, e := range errs {
				msg := e.Error()
				if broken {
					msg += keeping(ok)
				} else {
					msg += " (document skipped)"
				}
				problems = append(problems, Problem{File: path, Message: msg})
			}
			if !broken {
				fsState, ok = fileState{data: data, set: fset}, true
				s.good[name] = fsState
			}
		}
		if !ok {
			continue
		}
		for _, p := range fsState.set.Policies {
			note(origin, &problems, path, "AuthorizationPolicy "+p.Namespace+"/"+p.Name+" ("+policy.APIVersion+")")
		}
		for _, p := range fsState.set.IstioPolicies {
			note(origin, &problems, path, "AuthorizationPolicy "+p.Namespace+"/"+p.Name+" ("+policy.IstioAPIVersion+")")
		}
		for _, m := range fsState.set.Modes {
			note(origin, &problems, path, "InboundMode "+m.Namespace+"/"+m.Name+" ("+policy.APIVersion+")")
		}
		for _, m := range fsState.set.IstioPeerAuthentications {
			note(origin, &problems, path, "PeerAuthentication "+m.Namespace+"/"+m.Name+" ("+policy.IstioAPIVersion+")")
		}
		set.Policies = append(set.Policies, fsState.set.Policies...)
		set.IstioPolicies = append(set.IstioPolicies, fsState.set.IstioPolicies...)
		set.Modes = append(set.Modes, fsState.set.Modes...)
		set.IstioPeerAuthentications = append(set.IstioPeerAuthentications, fsState.set.IstioPeerAuthentications...)
	}
	for name := range s.good {
		if !seen[name] {
			delete(s.good, name) // deleted file: its policies go
		}
	}
	if unreadable {
		set.Policies = append(set.Policies, s.denyAll())
	}
	results := s.engine.Update(SourceName, set)
	accepted := 0
	for _, r := range results {
		obj := r.Kind + " " + r.Namespace + "/" + r.Name + " (" + r.APIVersion + ")"
		if r.Accepted {
			accepted++
			continue
		}
		problems = append(problems, Problem{File: origin[obj], Object: r.Kind + " " + r.Namespace + "/" + r.Name, Message: r.Reason + ": " + r.Message})
	}
	// Log each problem once, not at every reload.
	current := map[string]string{}
	for _, p := range problems {
		k := p.File + "|" + p.Object + "|" + p.Message
		current[k] = p.Message
		if _, done := s.logged[k]; !done {
			s.log.Error("policy problem", "file", p.File, "object", p.Object, "err", p.Message)
		}
	}
	s.logged = current
	s.log.Info("policies loaded", "files", len(names), "objects", len(results), "accepted", accepted, "problems", len(problems))
	return problems
}

const (
	denyAllNote     = " (never read: every connection in the mesh is denied until it can be read)"
	neverParsedNote = " (never read: every connection in the mesh is denied until the file parses)"
)

// denyAll stands in for policies that could not be read at all: a
// mesh-wide DENY of everything, reported under its own name.
func (s *Source) denyAll() policy.AuthorizationPolicy {
	p := policy.AuthorizationPolicy{Spec: policy.AuthorizationPolicySpec{Action: policy.Deny, Rules: []policy.Rule{{}}}}
	p.APIVersion, p.Kind = policy.APIVersion, policy.KindAuthorizationPolicy
	p.Namespace, p.Name = s.engine.RootNamespace(), "unreadable-policy-files"
	return p
}

func keeping(had bool) string {
	if had {
		return " (keeping the file's last good version)"
	}
	return neverParsedNote
}

func note(origin map[string]string, problems *[]Problem, file, obj string) {
	if prev, dup := origin[obj]; dup && prev != file {
		*problems = append(*problems, Problem{File: file, Object: obj,
			Message: "also defined in " + prev + "; both are enforced, fix one"})
	}
	origin[obj] = file
}

// list returns the policy files of the directory, sorted.
func (s *Source) list() ([]string, error) {
	entries, err := os.ReadDir(s.dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range entries {
		n := e.Name()
		if strings.HasPrefix(n, ".") || !isPolicyFile(n) {
			continue
		}
		st, err := os.Stat(filepath.Join(s.dir, n)) // follows ConfigMap symlinks
		if err != nil || !st.Mode().IsRegular() {
			continue
		}
		out = append(out, n)
	}
	slices.Sort(out)
	return out, nil
}

func isPolicyFile(n string) bool {
	switch strings.ToLower(filepath.Ext(n)) {
	case ".yaml", ".yml", ".json":
		return true
	}
	return false
}

// Run loads the directory, then reloads it on every change until ctx
// ends. Changes are coalesced (debounce) so an editor's save is one
// reload. The directory may not exist yet: its parent is watched.
func (s *Source) Run(ctx context.Context) error {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("policy files: %w", err)
	}
	defer w.Close()
	parent := filepath.Dir(filepath.Clean(s.dir))
	if err := w.Add(parent); err != nil {
		return fmt.Errorf("policy files: watching %s: %w", parent, err)
	}
	watching := w.Add(s.dir) == nil
	s.Load()
	const debounce = 100 * time.Millisecond
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-w.Events:
			if !ok {
				return nil
			}
			if filepath.Dir(ev.Name) == parent && ev.Name != filepath.Clean(s.dir) {
				continue // a sibling of the directory
			}
			if !watching {
				watching = w.Add(s.dir) == nil
			}
			timer.Reset(debounce)
		case err, ok := <-w.Errors:
			if !ok {
				return nil
			}
			s.log.Warn("watch error; reloading", "err", err)
			timer.Reset(debounce)
		case <-timer.C:
			if _, err := os.Stat(s.dir); err != nil {
				watching = false
			} else if !watching {
				watching = w.Add(s.dir) == nil
			}
			s.Load()
		}
	}
}
