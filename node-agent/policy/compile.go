package policy

import (
	"fmt"
	"maps"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambit-mesh/ambit/tunnel"
)

// compiledPolicy is an AuthorizationPolicy ready for evaluation.
type compiledPolicy struct {
	key       string // Verdict.Policy: "ns/name", "istio:ns/name"
	namespace string
	selector  map[string]string // nil: namespace-wide
	action    Action
	rules     []*rule
	idx       int  // position in the snapshot, for combination keys
	invalid   bool // a deny-all stand-in for a policy that failed validation
	mesh      bool // applies in every namespace (see Engine.meshWide)
	denials   prometheus.Counter
}

// compiledMode is an InboundMode ready for evaluation.
type compiledMode struct {
	key      string
	selector map[string]string
	mode     Mode // "" inherits
	ports    map[uint16]Mode
	denials  prometheus.Counter
	// everyWorkload: an invalid InboundMode whose selector could not be
	// read, enforced as STRICT for every workload of its namespace at
	// the workload level, ahead of any other (fail closed: it may have
	// selected any of them).
	everyWorkload bool
	// inherit: an Istio PeerAuthentication with a selector and no mode
	// (UNSET). It sets nothing, but the newer Istio ones selecting the
	// same workload are ignored, as in Istio (the oldest is picked
	// before its mode is read). Ambit's own InboundModes are not: a
	// stale UNSET object must not switch off one of ours.
	inherit bool
	istio   bool // from a PeerAuthentication
	mesh    bool // the mesh default (namespace-wide modes only)
}

func (m *compiledMode) resolve(port uint16) (Mode, bool) {
	if md, ok := m.ports[port]; ok {
		return md, true
	}
	return m.mode, m.mode != ""
}

// view is the merged rule sets that apply to one set of workloads.
type view struct {
	deny, allow ruleSet
	hasAllow    bool
}

func buildView(pols []*compiledPolicy) *view {
	v := &view{}
	for _, p := range pols {
		if p.action == Deny {
			for _, r := range p.rules {
				v.deny.add(r)
			}
			continue
		}
		v.hasAllow = true
		for _, r := range p.rules {
			v.allow.add(r)
		}
	}
	return v
}

// wlState is everything Authorize needs for one workload: the
// namespace-wide rules (shared by every workload of the namespace) and,
// apart, the rules of the selector policies that pick it (shared by
// workloads picked by the same policies), so a big namespace-wide set is
// never copied per workload.
type wlState struct {
	view  *view            // namespace-wide (mesh + own namespace)
	sel   *view            // selector policies picking the workload; nil if none
	modes [3]*compiledMode // workload, namespace, mesh
}

func (s *wlState) empty() bool {
	return s.view.deny.size == 0 && !s.view.hasAllow && s.sel == nil
}

func (s *wlState) hasAllow() bool {
	return s.view.hasAllow || (s.sel != nil && s.sel.hasAllow)
}

func (s *wlState) matchDeny(q *query) *rule {
	if r := s.view.deny.match(q); r != nil {
		return r
	}
	if s.sel != nil {
		return s.sel.deny.match(q)
	}
	return nil
}

func (s *wlState) matchAllow(q *query) *rule {
	if r := s.view.allow.match(q); r != nil {
		return r
	}
	if s.sel != nil {
		return s.sel.allow.match(q)
	}
	return nil
}

func (s *wlState) mode(port uint16) (Mode, *compiledMode) {
	for _, m := range s.modes {
		if m == nil {
			continue
		}
		if md, ok := m.resolve(port); ok {
			return md, m
		}
	}
	return Permissive, nil
}

// selIndex finds selector policies by one of their labels.
type selIndex map[string]map[string][]*compiledPolicy

func (ix selIndex) add(p *compiledPolicy) {
	k := slices.Min(slices.Collect(maps.Keys(p.selector)))
	if ix[k] == nil {
		ix[k] = map[string][]*compiledPolicy{}
	}
	ix[k][p.selector[k]] = append(ix[k][p.selector[k]], p)
}

func (ix selIndex) collect(labels map[string]string, out []*compiledPolicy) []*compiledPolicy {
	if len(ix) == 0 {
		return out
	}
	for k, v := range labels {
		for _, p := range ix[k][v] {
			if selects(p.selector, labels) {
				out = append(out, p)
			}
		}
	}
	return out
}

func selects(sel, labels map[string]string) bool {
	for k, v := range sel {
		if lv, ok := labels[k]; !ok || lv != v {
			return false
		}
	}
	return true
}

// nsPolicies is what one namespace holds, or the mesh level.
type nsPolicies struct {
	wide     []*compiledPolicy
	sel      selIndex
	modeWide *compiledMode
	modeSel  []*compiledMode // oldest first
	base     *wlState        // for workloads no selector picks
	// selective: some selector (here or mesh-wide) may pick a workload,
	// so the per-workload cache is consulted.
	selective bool
}

type wlKey struct{ ns, name, uid string }

type cacheEntry struct {
	labels map[string]string
	state  *wlState
}

const maxCache = 1 << 16

// snapshot is an immutable compiled policy set plus its lazily filled
// per-workload cache.
type snapshot struct {
	// mesh holds what applies in every namespace. It is also the state
	// of namespaces without policies of their own: it holds no selector
	// modes, which are never mesh-wide (as with Istio); the root
	// namespace's own objects are in byNS like any namespace's.
	mesh  *nsPolicies
	byNS  map[string]*nsPolicies
	all   []*compiledPolicy
	rules int

	mu     sync.RWMutex
	cache  map[wlKey]*cacheEntry
	combos map[string]*view
}

func (s *snapshot) ns(name string) *nsPolicies {
	if n, ok := s.byNS[name]; ok {
		return n
	}
	return s.mesh
}

// state finds the compiled state for a destination workload. The common
// path (cache hit, or no selector in scope) takes a read lock at most and
// allocates nothing.
func (s *snapshot) state(w *tunnel.Workload) *wlState {
	n := s.ns(w.Namespace)
	if !n.selective {
		return n.base
	}
	key := wlKey{w.Namespace, w.Name, w.UID}
	s.mu.RLock()
	e := s.cache[key]
	s.mu.RUnlock()
	if e != nil && maps.Equal(e.labels, w.Labels) {
		return e.state
	}
	st := s.resolve(n, w)
	s.mu.Lock()
	if len(s.cache) >= maxCache {
		clear(s.cache)
	}
	s.cache[key] = &cacheEntry{labels: maps.Clone(w.Labels), state: st}
	s.mu.Unlock()
	return st
}

func (s *snapshot) resolve(n *nsPolicies, w *tunnel.Workload) *wlState {
	var picked []*compiledPolicy
	if n != s.mesh {
		picked = s.mesh.sel.collect(w.Labels, picked)
	}
	picked = n.sel.collect(w.Labels, picked)
	st := &wlState{view: n.base.view, modes: n.base.modes}
	shadowed := false // by an older UNSET PeerAuthentication
	for _, m := range n.modeSel {
		if !selects(m.selector, w.Labels) || shadowed && m.istio {
			continue
		}
		if m.inherit {
			shadowed = true
			continue
		}
		st.modes[0] = m
		break
	}
	if len(picked) == 0 {
		return st
	}
	slices.SortFunc(picked, func(a, b *compiledPolicy) int { return a.idx - b.idx })
	var b strings.Builder
	for _, p := range picked {
		b.WriteString(strconv.Itoa(p.idx))
		b.WriteByte(',')
	}
	combo := b.String()
	s.mu.Lock()
	v := s.combos[combo]
	s.mu.Unlock()
	if v == nil {
		v = buildView(picked)
		s.mu.Lock()
		if len(s.combos) >= maxCache {
			clear(s.combos)
		}
		s.combos[combo] = v
		s.mu.Unlock()
	}
	st.sel = v
	return st
}

// compile builds a snapshot from validated objects. Policies are ordered
// oldest first (then by name) so ties resolve the same way everywhere.
func compile(pols []*compiledPolicy, modes []*compiledMode, modeNS []string) *snapshot {
	s := &snapshot{
		byNS:   map[string]*nsPolicies{},
		cache:  map[wlKey]*cacheEntry{},
		combos: map[string]*view{},
		all:    pols,
	}
	s.mesh = &nsPolicies{sel: selIndex{}}
	get := func(ns string, mesh bool) *nsPolicies {
		if mesh {
			return s.mesh
		}
		n := s.byNS[ns]
		if n == nil {
			n = &nsPolicies{sel: selIndex{}}
			s.byNS[ns] = n
		}
		return n
	}
	for i, p := range pols {
		p.idx = i
		s.rules += len(p.rules)
		n := get(p.namespace, p.mesh)
		if len(p.selector) == 0 {
			n.wide = append(n.wide, p)
		} else {
			n.sel.add(p)
		}
	}
	for i, m := range modes {
		n := get(modeNS[i], m.mesh)
		if m.everyWorkload {
			n.modeSel = append([]*compiledMode{m}, n.modeSel...)
			continue
		}
		if len(m.selector) == 0 {
			if n.modeWide == nil {
				n.modeWide = m
			}
		} else {
			n.modeSel = append(n.modeSel, m)
		}
	}
	meshSel := len(s.mesh.sel) > 0
	s.mesh.base = &wlState{view: buildView(s.mesh.wide), modes: [3]*compiledMode{nil, nil, s.mesh.modeWide}}
	s.mesh.selective = meshSel
	for _, n := range s.byNS {
		n.base = &wlState{
			view:  buildView(append(slices.Clone(s.mesh.wide), n.wide...)),
			modes: [3]*compiledMode{nil, n.modeWide, s.mesh.modeWide},
		}
		n.selective = meshSel || len(n.sel) > 0 || len(n.modeSel) > 0
	}
	return s
}

func policyKey(prefix, ns, name string) string {
	return fmt.Sprintf("%s%s/%s", prefix, ns, name)
}

// byAge orders objects oldest first, then by namespace and name.
func byAge[T any](list []T, meta func(T) (int64, string, string)) {
	sort.SliceStable(list, func(i, j int) bool {
		ti, nsi, ni := meta(list[i])
		tj, nsj, nj := meta(list[j])
		if ti != tj {
			return ti < tj
		}
		if nsi != nsj {
			return nsi < nsj
		}
		return ni < nj
	})
}
