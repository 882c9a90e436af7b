package filesource

import (
	"bytes"
	"context"
	"crypto/sha256"
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

// newWatcher makes the directory's watcher (tests: one that fails as an
// exhausted inotify instance limit does; lowering the real, machine-wide
// limit breaks the watches of tests running beside).
var newWatcher = fsnotify.NewWatcher

// unwatchedPoll is how often the directory is looked at, and its watch
// tried again, while it cannot be watched.
var unwatchedPoll = time.Second

// Run loads the directory, then reloads it on every change until ctx
// ends. Changes are coalesced (debounce) so an editor's save is one
// reload. The directory may not exist yet: its parent is watched.
//
// The watch may be impossible: inotify instances and watches are limited
// per user on the node (fs.inotify.max_user_instances, default 128, and
// max_user_watches) and other daemons exhaust them. Giving up then left
// every later edit unseen until a restart; instead the directory is
// looked at every unwatchedPoll, reloaded only when what Load would read
// changed (a reload recomputes every policy and logs), and the watch is
// tried again at each look.
func (s *Source) Run(ctx context.Context) error {
	r := &runner{s: s, dir: filepath.Clean(s.dir)}
	r.parent = filepath.Dir(r.dir)
	defer func() {
		if r.w != nil {
			r.w.Close()
		}
	}()
	r.watch()
	r.load()
	const debounce = 100 * time.Millisecond
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	poll := time.NewTicker(unwatchedPoll)
	defer poll.Stop()
	for {
		var events <-chan fsnotify.Event
		var errs <-chan error
		if r.w != nil {
			events, errs = r.w.Events, r.w.Errors
		}
		select {
		case <-ctx.Done():
			return nil
		case <-poll.C:
			if r.w != nil {
				continue
			}
			// Watch first: a change after this look is an event.
			r.watch()
			if now := s.look(); now != r.seen {
				// Noted now so that the next looks, before the
				// debounced load, do not push it back.
				r.seen = now
				timer.Reset(debounce)
			}
		case ev, ok := <-events:
			if !ok {
				return nil
			}
			if filepath.Dir(ev.Name) == r.parent && ev.Name != r.dir {
				continue // a sibling of the directory
			}
			if !r.dirWatched {
				r.addDir()
			}
			timer.Reset(debounce)
		case err, ok := <-errs:
			if !ok {
				return nil
			}
			s.log.Warn("watch error; reloading", "err", err)
			timer.Reset(debounce)
		case <-timer.C:
			if _, err := os.Stat(s.dir); err != nil {
				r.dirWatched = false
			} else if r.w != nil && !r.dirWatched {
				r.addDir()
			}
			r.load()
		}
	}
}

// runner is the state of one Run.
type runner struct {
	s           *Source
	dir, parent string
	w           *fsnotify.Watcher // nil while the directory cannot be watched
	dirWatched  bool              // the directory itself (not only its parent) is watched
	unwatched   bool              // in an episode without a watch (logged once)
	seen        [sha256.Size]byte // what the last look (or the look before a load) saw, while unwatched
}

// watch makes the watch of the parent and, if it exists, the directory,
// reporting whether it is in place.
func (r *runner) watch() bool {
	w, err := newWatcher()
	if err == nil {
		if err = w.Add(r.parent); err != nil {
			err = fmt.Errorf("%s: %w", r.parent, err)
			w.Close()
		}
	}
	if err != nil {
		r.fail(err)
		return false
	}
	r.w, r.dirWatched = w, false
	if !r.addDir() {
		return false
	}
	if r.unwatched {
		r.s.log.Info("watching the policy directory again")
	}
	r.unwatched = false
	return true
}

// addDir watches the directory itself, reporting whether the watch is
// in place. A directory that does not exist needs none: its parent's
// watch tells when it is made. One that exists but cannot be watched
// (max_user_watches) is polled.
func (r *runner) addDir() bool {
	err := r.w.Add(r.dir)
	if err == nil {
		r.dirWatched = true
		return true
	}
	if _, serr := os.Stat(r.dir); errors.Is(serr, fs.ErrNotExist) {
		return true
	}
	r.w.Close()
	r.w, r.dirWatched = nil, false
	r.fail(fmt.Errorf("%s: %w", r.dir, err))
	return false
}

func (r *runner) fail(err error) {
	if !r.unwatched {
		r.unwatched = true
		r.s.log.Warn("cannot watch the policy directory (raise fs.inotify.max_user_instances or max_user_watches); looking at it every "+unwatchedPoll.String()+" instead", "err", err)
	}
}

// load runs Load, first noting what it will read when there is no
// watch: a change made while it reads is then seen at the next look.
func (r *runner) load() {
	if r.w == nil {
		r.seen = r.s.look()
	}
	r.s.Load()
}

// look hashes what Load reads: the list of policy files and their
// content (or why they could not be read).
func (s *Source) look() [sha256.Size]byte {
	h := sha256.New()
	names, err := s.list()
	if err != nil {
		fmt.Fprintf(h, "list: %v\n", err)
	}
	for _, n := range names {
		b, err := os.ReadFile(filepath.Join(s.dir, n))
		fmt.Fprintf(h, "%q %d %v\n", n, len(b), err)
		h.Write(b)
	}
	var sum [sha256.Size]byte
	h.Sum(sum[:0])
	return sum
}
