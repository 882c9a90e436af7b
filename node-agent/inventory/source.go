package inventory

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/ambit-mesh/ambit/node-agent/cluster"
	"github.com/ambit-mesh/ambit/tunnel"
)

// Options configure a Source.
type Options struct {
	// Path of the inventory file.
	Path string
	// NodeName is this node: workloads without a node, or with this one,
	// are local.
	NodeName string
	// TrustDomain for identities when the file does not set one.
	TrustDomain string
	// EnrollLabel is the enrollment label key (for the snapshot lists);
	// default ambit.dev/dataplane-mode.
	EnrollLabel string
	// Meshed tells whether a workload is enrolled (for the directory's
	// Workload.Meshed); nil means none is.
	Meshed func(cluster.Pod, *cluster.Namespace) bool
	// OnReload is told of every reload attempt (nil error = applied).
	OnReload func(error)
	Logger   *slog.Logger
}

// Source is the static inventory as a cluster.View.
type Source struct {
	opts Options
	log  *slog.Logger

	mu      sync.Mutex
	file    *File
	learned map[string]learned // namespace/name → what the CNI ADD told
	subs    []func(cluster.Event)
	lastErr error
	// raw is the file's content as last read (applied or not), so Watch
	// can tell whether it changed before its watch was in place.
	raw []byte

	idx    atomic.Pointer[index]
	dirty  atomic.Bool
	synced chan struct{}
}

type learned struct {
	uid string
	ips []netip.Addr
}

var (
	_ cluster.View         = (*Source)(nil)
	_ cluster.StatusWriter = (*Source)(nil)
)

// Load reads the file once; a broken file is an error here (at start an
// operator wants to know), later reloads keep the last good content.
func Load(opts Options) (*Source, error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.TrustDomain == "" {
		opts.TrustDomain = "cluster.local"
	}
	if opts.EnrollLabel == "" {
		opts.EnrollLabel = "ambit.dev/dataplane-mode"
	}
	s := &Source{opts: opts, log: opts.Logger.With("source", "inventory"), learned: map[string]learned{}, synced: make(chan struct{})}
	f, raw, err := readFile(opts.Path)
	if err != nil {
		return nil, err
	}
	s.file = f
	s.raw = raw
	s.dirty.Store(true)
	close(s.synced)
	return s, nil
}

// Parse errors carry the file name in front of "line N: field: ...".
// The content read is returned even when it does not parse.
func readFile(path string) (*File, []byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("inventory: %w", err)
	}
	f, err := Parse(b)
	if err != nil {
		return nil, b, fmt.Errorf("inventory %s: %w", path, err)
	}
	return f, b, nil
}

func (s *Source) lastRaw() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.raw
}

// LastError is the error of the last reload, nil when it applied.
func (s *Source) LastError() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastErr
}

// SetMeshed installs the enrollment predicate for Workload.Meshed.
func (s *Source) SetMeshed(fn func(cluster.Pod, *cluster.Namespace) bool) {
	s.mu.Lock()
	s.opts.Meshed = fn
	s.mu.Unlock()
	s.dirty.Store(true)
}

// Static marks this source as authoritative: a pod it does not know is not
// part of the mesh (as opposed to "not yet in the cache").
func (s *Source) Static() bool { return true }

// newWatcher makes the file's directory's watcher (tests: one that fails
// as an exhausted inotify instance limit does; lowering the real,
// machine-wide limit breaks the watches of tests running beside).
var newWatcher = fsnotify.NewWatcher

// unwatchedPoll is how often the file is looked at, and its watch tried
// again, while it cannot be watched.
var unwatchedPoll = time.Second

// Watch reloads the file on change until ctx ends. It watches the
// directory, so editors' rename-into-place and ConfigMap symlink swaps are
// seen.
//
// The watch may be impossible: inotify instances and watches are limited
// per user on the node (fs.inotify.max_user_instances, default 128, and
// max_user_watches) and other daemons exhaust them. Giving up then left
// every later edit unseen until a restart; instead the file is read every
// unwatchedPoll, reloaded only when its content changed (a reload logs and
// tells every subscriber), and the watch is tried again at each look.
func (s *Source) Watch(ctx context.Context) error {
	dir := filepath.Dir(s.opts.Path)
	var w *fsnotify.Watcher // nil while the directory cannot be watched
	unwatched := false      // in an episode without a watch (logged once)
	watch := func() {
		nw, err := newWatcher()
		if err == nil {
			if err = nw.Add(dir); err != nil {
				err = fmt.Errorf("%s: %w", dir, err)
				nw.Close()
			}
		}
		if err != nil {
			if !unwatched {
				unwatched = true
				s.log.Warn("cannot watch the inventory file (raise fs.inotify.max_user_instances or max_user_watches); reading it every "+unwatchedPoll.String()+" instead", "path", s.opts.Path, "err", err)
			}
			return
		}
		if unwatched {
			s.log.Info("watching the inventory file again", "path", s.opts.Path)
		}
		w, unwatched = nw, false
	}
	defer func() {
		if w != nil {
			w.Close()
		}
	}()
	var timer *time.Timer
	fire := make(chan struct{}, 1)
	pending := false // a reload is due (kicked, not yet fired)
	// Debounce: editors write in several steps.
	kick := func() {
		pending = true
		if timer == nil {
			timer = time.AfterFunc(100*time.Millisecond, func() {
				select {
				case fire <- struct{}{}:
				default:
				}
			})
		} else {
			timer.Reset(100 * time.Millisecond)
		}
	}
	watch()
	// A change made between the last read (Load, for the agent a moment
	// ago) and the watch being in place has no event of its own and was
	// lost until the next edit: look once, now that later ones are seen.
	if s.changedSinceRead() {
		kick()
	}
	poll := time.NewTicker(unwatchedPoll)
	defer poll.Stop()
	for {
		var events <-chan fsnotify.Event
		var errs <-chan error
		if w != nil {
			events, errs = w.Events, w.Errors
		}
		select {
		case <-ctx.Done():
			if timer != nil {
				timer.Stop()
			}
			return nil
		case <-poll.C:
			if w != nil {
				continue
			}
			// Watch first: a change after this look is an event. A
			// reload already due is not pushed back by each look.
			watch()
			if !pending && s.changedSinceRead() {
				kick()
			}
		case ev, ok := <-events:
			if !ok {
				return nil
			}
			base := filepath.Base(ev.Name)
			if base != filepath.Base(s.opts.Path) && base != "..data" {
				continue
			}
			kick()
		case err, ok := <-errs:
			if !ok {
				return nil
			}
			s.log.Warn("inventory watch error", "err", err)
		case <-fire:
			pending = false
			s.Reload()
		}
	}
}

// changedSinceRead tells whether the file differs from its last read:
// its content, or whether it can be read at all (raw is nil only after
// a failed read).
func (s *Source) changedSinceRead() bool {
	b, err := os.ReadFile(s.opts.Path)
	raw := s.lastRaw()
	if err != nil {
		return raw != nil
	}
	return raw == nil || !bytes.Equal(b, raw)
}

// Reload reads the file again and, if valid, applies it and emits events
// for what changed. An invalid file is logged and reported through
// OnReload; the previous content stays in force.
func (s *Source) Reload() error {
	f, raw, err := readFile(s.opts.Path)
	s.mu.Lock()
	s.raw = raw
	if err != nil {
		s.lastErr = err
		cb := s.opts.OnReload
		s.mu.Unlock()
		s.log.Error("inventory not reloaded, keeping the last good one", "err", err)
		if cb != nil {
			cb(err)
		}
		return err
	}
	before := s.localFingerprints()
	oldNS := s.file.Namespaces
	s.file = f
	s.lastErr = nil
	after := s.localFingerprints()
	subs := slices.Clone(s.subs)
	cb := s.opts.OnReload
	s.mu.Unlock()
	s.dirty.Store(true)

	var evs []cluster.Event
	for _, name := range sortedKeys(f.Namespaces) {
		old, ok := oldNS[name]
		if !ok || !maps.Equal(old, f.Namespaces[name]) {
			evs = append(evs, cluster.Event{Kind: cluster.NamespaceChanged, Namespace: name})
		}
	}
	for _, name := range sortedKeys(oldNS) {
		if _, ok := f.Namespaces[name]; !ok {
			evs = append(evs, cluster.Event{Kind: cluster.NamespaceChanged, Namespace: name})
		}
	}
	for k, fp := range after {
		if before[k] != fp {
			evs = append(evs, cluster.Event{Kind: cluster.PodChanged, Namespace: fp.ns, Name: fp.name, UID: fp.uid})
		}
	}
	for k, fp := range before {
		if _, ok := after[k]; !ok {
			evs = append(evs, cluster.Event{Kind: cluster.PodDeleted, Namespace: fp.ns, Name: fp.name, UID: fp.uid})
		}
	}
	evs = append(evs, cluster.Event{Kind: cluster.Resynced})
	s.log.Info("inventory reloaded", "namespaces", len(f.Namespaces), "workloads", len(f.Workloads), "services", len(f.Services), "events", len(evs))
	for _, ev := range evs {
		for _, fn := range subs {
			fn(ev)
		}
	}
	if cb != nil {
		cb(nil)
	}
	return nil
}

type fingerprint struct {
	ns, name, uid string
	sum           string
}

func (s *Source) localFingerprints() map[string]fingerprint {
	out := map[string]fingerprint{}
	for _, p := range s.localPodsLocked() {
		out[p.Namespace+"/"+p.Name] = fingerprint{p.Namespace, p.Name, p.UID, fmt.Sprint(p.ServiceAccount, p.HostNetwork, p.Labels, p.IPs)}
	}
	return out
}

// Learn records what the CNI ADD told about a pod (its UID and IPs), so the
// directory can map the IPs to the workload.
func (s *Source) Learn(namespace, name, uid string, ips []netip.Addr) {
	s.mu.Lock()
	s.learned[namespace+"/"+name] = learned{uid: uid, ips: slices.Clone(ips)}
	s.mu.Unlock()
	s.dirty.Store(true)
}

// Forget drops what Learn recorded (the pod was deleted). A later pod of
// the same name with another UID is not forgotten by a late DEL.
func (s *Source) Forget(namespace, name, uid string) {
	s.mu.Lock()
	k := namespace + "/" + name
	if l, ok := s.learned[k]; ok && (uid == "" || l.uid == "" || l.uid == uid) {
		delete(s.learned, k)
	}
	s.mu.Unlock()
	s.dirty.Store(true)
}

// WaitSynced returns at once: the file was read by Load.
func (s *Source) WaitSynced(ctx context.Context) error {
	select {
	case <-s.synced:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Pod finds a pod: a listed workload (exact name first, then the longest
// matching prefix), or, in a listed namespace, an unlisted pod with no
// labels and the default service account.
func (s *Source) Pod(ctx context.Context, namespace, name string) (cluster.Pod, bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p, ok := s.podLocked(namespace, name)
	return p, ok, nil
}

func (s *Source) podLocked(namespace, name string) (cluster.Pod, bool) {
	if _, ok := s.file.Namespaces[namespace]; !ok {
		return cluster.Pod{}, false
	}
	var best *Workload
	for i := range s.file.Workloads {
		w := &s.file.Workloads[i]
		if w.Namespace != namespace || !w.Matches(name) {
			continue
		}
		if _, prefix := w.Prefix(); !prefix {
			best = w
			break
		}
		if best == nil || len(w.Name) > len(best.Name) {
			best = w
		}
	}
	var p cluster.Pod
	if best != nil {
		p = s.toPod(best, name)
	} else {
		p = cluster.Pod{Namespace: namespace, Name: name, ServiceAccount: "default", NodeName: s.opts.NodeName, Labels: map[string]string{}}
	}
	if l, ok := s.learned[namespace+"/"+name]; ok {
		if p.UID == "" {
			p.UID = l.uid
		}
		if len(l.ips) > 0 {
			p.IPs = slices.Clone(l.ips)
		}
	}
	return p, true
}

func (s *Source) toPod(w *Workload, name string) cluster.Pod {
	node := w.Node
	if node == "" {
		node = s.opts.NodeName
	}
	return cluster.Pod{
		Namespace:      w.Namespace,
		Name:           name,
		UID:            w.UID,
		ServiceAccount: w.ServiceAccount,
		NodeName:       node,
		Labels:         maps.Clone(w.Labels),
		Annotations:    map[string]string{},
		IPs:            slices.Clone(w.IPs),
		HostNetwork:    w.HostNetwork,
	}
}

// Namespace returns a listed namespace.
func (s *Source) Namespace(name string) (cluster.Namespace, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	l, ok := s.file.Namespaces[name]
	if !ok {
		return cluster.Namespace{}, false
	}
	return cluster.Namespace{Name: name, Labels: maps.Clone(l)}, true
}

// Namespaces lists every namespace (for the enrollment snapshot).
func (s *Source) Namespaces() []cluster.Namespace {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]cluster.Namespace, 0, len(s.file.Namespaces))
	for _, n := range sortedKeys(s.file.Namespaces) {
		out = append(out, cluster.Namespace{Name: n, Labels: maps.Clone(s.file.Namespaces[n])})
	}
	return out
}

// LocalPods lists the listed (exact-name) workloads of this node and every
// pod learned from a CNI ADD.
func (s *Source) LocalPods() []cluster.Pod {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.localPodsLocked()
}

func (s *Source) localPodsLocked() []cluster.Pod {
	seen := map[string]bool{}
	var out []cluster.Pod
	for i := range s.file.Workloads {
		w := &s.file.Workloads[i]
		if _, prefix := w.Prefix(); prefix || (w.Node != "" && w.Node != s.opts.NodeName) {
			continue
		}
		p, _ := s.podLocked(w.Namespace, w.Name)
		seen[w.Namespace+"/"+w.Name] = true
		out = append(out, p)
	}
	for k := range s.learned {
		if seen[k] {
			continue
		}
		ns, name, _ := cut(k)
		if p, ok := s.podLocked(ns, name); ok {
			out = append(out, p)
		}
	}
	slices.SortFunc(out, func(a, b cluster.Pod) int {
		if c := compare(a.Namespace, b.Namespace); c != 0 {
			return c
		}
		return compare(a.Name, b.Name)
	})
	return out
}

func cut(k string) (string, string, bool) {
	for i := 0; i < len(k); i++ {
		if k[i] == '/' {
			return k[:i], k[i+1:], true
		}
	}
	return k, "", false
}

func compare(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// Subscribe registers fn for change events.
func (s *Source) Subscribe(fn func(cluster.Event)) {
	s.mu.Lock()
	s.subs = append(s.subs, fn)
	s.mu.Unlock()
}

// SetRedirection only logs: there is no API object to annotate.
func (s *Source) SetRedirection(ctx context.Context, pod cluster.Pod, state string) error {
	s.log.Debug("redirection status", "pod", pod.Namespace+"/"+pod.Name, "state", state)
	return nil
}

// Warn only logs.
func (s *Source) Warn(ctx context.Context, pod cluster.Pod, reason, message string) error {
	s.log.Warn("pod event", "pod", pod.Namespace+"/"+pod.Name, "reason", reason, "message", message)
	return nil
}

// index is the directory, rebuilt after any change and read lock-free.
type index struct {
	byIP map[netip.Addr]tunnel.Workload
	svc  map[netip.AddrPort][]netip.AddrPort
}

func (s *Source) current() *index {
	if !s.dirty.Load() {
		if ix := s.idx.Load(); ix != nil {
			return ix
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if ix := s.idx.Load(); ix != nil && !s.dirty.Load() {
		return ix
	}
	s.dirty.Store(false)
	ix := s.buildLocked()
	s.idx.Store(ix)
	return ix
}

func (s *Source) buildLocked() *index {
	td := s.file.TrustDomain
	if td == "" {
		td = s.opts.TrustDomain
	}
	ix := &index{byIP: map[netip.Addr]tunnel.Workload{}, svc: map[netip.AddrPort][]netip.AddrPort{}}
	var pods []cluster.Pod
	for i := range s.file.Workloads {
		w := &s.file.Workloads[i]
		if _, prefix := w.Prefix(); prefix {
			continue
		}
		p, _ := s.podLocked(w.Namespace, w.Name)
		pods = append(pods, p)
	}
	for k := range s.learned {
		ns, name, _ := cut(k)
		if p, ok := s.podLocked(ns, name); ok && !slices.ContainsFunc(pods, func(q cluster.Pod) bool { return q.Namespace == ns && q.Name == name }) {
			pods = append(pods, p)
		}
	}
	for _, p := range pods {
		if p.HostNetwork {
			continue
		}
		var nsp *cluster.Namespace
		if l, ok := s.file.Namespaces[p.Namespace]; ok {
			nsp = &cluster.Namespace{Name: p.Namespace, Labels: l}
		}
		w := tunnel.Workload{
			UID: p.UID, Namespace: p.Namespace, Name: p.Name, ServiceAccount: p.ServiceAccount,
			Labels: p.Labels, IPs: p.IPs,
			Identity: fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", td, p.Namespace, p.ServiceAccount),
			Meshed:   s.opts.Meshed != nil && s.opts.Meshed(p, nsp),
		}
		for _, ip := range p.IPs {
			ix.byIP[ip] = w
		}
	}
	for _, svc := range s.file.Services {
		for _, sp := range svc.Ports {
			var eps []netip.AddrPort
			for _, p := range pods {
				if p.Namespace != svc.Namespace || p.HostNetwork || !selects(svc.Selector, p.Labels) {
					continue
				}
				for _, ip := range p.IPs {
					eps = append(eps, netip.AddrPortFrom(ip, sp.TargetPort))
				}
			}
			slices.SortFunc(eps, func(a, b netip.AddrPort) int { return a.Compare(b) })
			for _, vip := range svc.VIPs {
				ix.svc[netip.AddrPortFrom(vip, sp.Port)] = eps
			}
		}
	}
	return ix
}

func selects(sel, labels map[string]string) bool {
	for k, v := range sel {
		if labels[k] != v {
			return false
		}
	}
	return true
}

// WorkloadByIP implements tunnel.Directory.
func (s *Source) WorkloadByIP(ip netip.Addr) (tunnel.Workload, bool) {
	w, ok := s.current().byIP[ip.Unmap()]
	return w, ok
}

// ServiceEndpoints implements tunnel.Directory. A service with no selected
// workload is still a service (ok, no endpoints): the caller refuses the
// connection rather than passing it through to a VIP nobody serves.
func (s *Source) ServiceEndpoints(vip netip.AddrPort) ([]netip.AddrPort, bool) {
	eps, ok := s.current().svc[netip.AddrPortFrom(vip.Addr().Unmap(), vip.Port())]
	return slices.Clone(eps), ok
}

// AmbientNamespaces lists, sorted, the namespaces whose own label enrolls
// their pods (for the enrollment snapshot).
func (s *Source) AmbientNamespaces() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for _, n := range sortedKeys(s.file.Namespaces) {
		if s.file.Namespaces[n][s.opts.EnrollLabel] == "ambient" {
			out = append(out, n)
		}
	}
	return out
}

// OptInNamespaces lists, sorted, the namespaces holding a workload (on any
// node) that opts in by its own label: a new pod there may be enrolled.
func (s *Source) OptInNamespaces() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	set := map[string]bool{}
	for _, w := range s.file.Workloads {
		if !w.HostNetwork && w.Labels[s.opts.EnrollLabel] == "ambient" {
			set[w.Namespace] = true
		}
	}
	out := make([]string, 0, len(set))
	for n := range set {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

// TrustDomain is the file's trust domain, else the configured one.
func (s *Source) TrustDomain() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.file.TrustDomain != "" {
		return s.file.TrustDomain
	}
	return s.opts.TrustDomain
}

// SetReloadHook installs the OnReload callback after Load (the agent that
// wants to hear of reloads is built after the view).
func (s *Source) SetReloadHook(fn func(error)) {
	s.mu.Lock()
	s.opts.OnReload = fn
	s.mu.Unlock()
}
