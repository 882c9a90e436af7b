package policy

import (
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambit-mesh/ambit/tunnel"
)

// Verdict reasons, fixed strings so Authorize does not allocate.
const (
	ReasonNoPolicy        = "no ALLOW policy applies"
	ReasonAllowed         = "allowed by ALLOW policy"
	ReasonDeniedByPolicy  = "denied by DENY policy"
	ReasonNoAllowMatch    = "no ALLOW rule matches"
	ReasonStrictPlaintext = "plaintext refused: inbound mode STRICT"
)

// Options configure an Engine.
type Options struct {
	// RootNamespace holds mesh-wide policies of Ambit's kinds; default
	// "ambit-system".
	RootNamespace string
	// IstioRootNamespace is where Istio's mesh-wide policies live
	// (meshConfig.rootNamespace); default "istio-system". Istio objects
	// there are mesh-wide here too, and only there: in RootNamespace
	// they are that namespace's own, as Istio reads them.
	IstioRootNamespace string
	Logger             *slog.Logger
	// Registerer receives the metrics; nil means none.
	Registerer prometheus.Registerer
	// DenialLogsPerSecond bounds denial log lines (the counters are
	// exact); 0 means 20. The rest are summarised.
	DenialLogsPerSecond int
}

// Set is everything one source knows, complete: each Update replaces the
// source's previous Set.
type Set struct {
	Policies      []AuthorizationPolicy
	Modes         []InboundMode
	IstioPolicies []IstioAuthorizationPolicy
	// IstioPeerAuthentications are read as InboundModes.
	IstioPeerAuthentications []IstioPeerAuthentication
}

// Result is the verdict on one object of a Set, for its status condition
// (Kubernetes) or the log (files).
type Result struct {
	APIVersion string
	Kind       string
	Namespace  string
	Name       string
	Generation int64
	Accepted   bool
	Reason     string // ReasonAccepted, ReasonInvalid, ReasonUnsupported, ReasonConflict
	Message    string
}

// Engine evaluates policy; it implements tunnel.Authorizer.
type Engine struct {
	root    string
	iroot   string
	log     *slog.Logger
	snap    atomic.Pointer[snapshot]
	denials *prometheus.CounterVec
	noAllow prometheus.Counter
	rules   prometheus.Gauge
	objects *prometheus.GaugeVec
	limit   int64

	mu      sync.Mutex // serialises Update
	sources map[string]Set
	results map[string][]Result
	digest  [32]byte
	hooks   []func()
	series  map[[2]string]bool // denial series created, to delete stale ones

	logWindow     atomic.Int64 // unix second of the current window
	logCount      atomic.Int64
	logSuppressed atomic.Int64
}

var _ tunnel.Authorizer = (*Engine)(nil)

// New returns an Engine with no policies: everything is allowed, plaintext
// included (PERMISSIVE), until a source says otherwise.
func New(opts Options) *Engine {
	if opts.RootNamespace == "" {
		opts.RootNamespace = DefaultRootNamespace
	}
	if opts.IstioRootNamespace == "" {
		opts.IstioRootNamespace = "istio-system"
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.DenialLogsPerSecond <= 0 {
		opts.DenialLogsPerSecond = 20
	}
	e := &Engine{
		root:    opts.RootNamespace,
		iroot:   opts.IstioRootNamespace,
		log:     opts.Logger.With("component", "policy"),
		limit:   int64(opts.DenialLogsPerSecond),
		sources: map[string]Set{},
		results: map[string][]Result{},
		denials: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ambit_policy_denials_total",
			Help: "Inbound connections refused by policy, by deciding policy (empty when no ALLOW rule matched) and reason.",
		}, []string{"policy", "reason"}),
		rules: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "ambit_policy_rules",
			Help: "Compiled authorization rules in force.",
		}),
		objects: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ambit_policy_objects",
			Help: "Policy objects known, by kind and whether they were accepted.",
		}, []string{"kind", "accepted"}),
	}
	e.noAllow = e.denials.WithLabelValues("", "no_allow_match")
	if opts.Registerer != nil {
		for _, c := range []prometheus.Collector{e.denials, e.rules, e.objects} {
			if err := opts.Registerer.Register(c); err != nil {
				e.log.Warn("policy metrics not registered", "err", err)
			}
		}
	}
	e.snap.Store(compile(nil, nil, nil))
	return e
}

// RootNamespace is the namespace whose policies of Ambit's kinds apply
// mesh-wide.
func (e *Engine) RootNamespace() string { return e.root }

// OnChange registers fn, called (synchronously, after the new policies are
// in force) whenever an Update changes what is enforced. The agent hooks
// tunnel.Proxy.Reauthorize here.
func (e *Engine) OnChange(fn func()) {
	e.mu.Lock()
	e.hooks = append(e.hooks, fn)
	e.mu.Unlock()
}

// Update replaces what source knows with set, recompiles, and returns the
// verdict on each object of set. Updates that change nothing enforced
// (e.g. a status write echoed back by the API server) fire no hook.
func (e *Engine) Update(source string, set Set) []Result {
	e.mu.Lock()
	e.sources[source] = set
	pols, modes, modeNS, results, digest := e.compileAll()
	e.results = results
	mine := results[source]
	changed := digest != e.digest
	var hooks []func()
	if changed {
		e.digest = digest
		e.install(pols, modes, modeNS, results)
		hooks = slices.Clone(e.hooks)
	}
	e.mu.Unlock()
	for _, fn := range hooks {
		fn()
	}
	return mine
}

// Results returns the latest verdicts for source's objects.
func (e *Engine) Results(source string) []Result {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.results[source])
}

func (e *Engine) install(pols []*compiledPolicy, modes []*compiledMode, modeNS []string, results map[string][]Result) {
	series := map[[2]string]bool{{"", "no_allow_match"}: true}
	for _, p := range pols {
		reason := "deny_policy"
		if p.invalid {
			reason = "invalid_policy"
		}
		p.denials = e.denials.WithLabelValues(p.key, reason)
		series[[2]string{p.key, reason}] = true
	}
	for _, m := range modes {
		m.denials = e.denials.WithLabelValues(m.key, "strict_plaintext")
		series[[2]string{m.key, "strict_plaintext"}] = true
	}
	s := compile(pols, modes, modeNS)
	e.snap.Store(s)
	// Forget the series of policies that are gone.
	for k := range e.series {
		if !series[k] {
			e.denials.DeleteLabelValues(k[0], k[1])
		}
	}
	e.series = series
	e.rules.Set(float64(s.rules))
	e.objects.Reset()
	for _, rs := range results {
		for _, r := range rs {
			e.objects.WithLabelValues(r.Kind, fmt.Sprint(r.Accepted)).Inc()
		}
	}
}

// compileAll turns every source's objects into compiled policies, in a
// stable order, with a verdict per object and a digest of what is enforced.
func (e *Engine) compileAll() ([]*compiledPolicy, []*compiledMode, []string, map[string][]Result, [32]byte) {
	type polIn struct {
		src string
		ri  int
		ap  *AuthorizationPolicy
		ts  int64
		pre string
	}
	type modeIn struct {
		src string
		ri  int
		m   *InboundMode
		pre string // "istio:" for converted PeerAuthentication
		ns  string
	}
	results := map[string][]Result{}
	var pins []polIn
	var mins []modeIn
	for _, src := range slices.Sorted(maps.Keys(e.sources)) {
		set := e.sources[src]
		for i := range set.Policies {
			p := &set.Policies[i]
			results[src] = append(results[src], Result{APIVersion: APIVersion, Kind: KindAuthorizationPolicy,
				Namespace: p.Namespace, Name: p.Name, Generation: p.Generation})
			pins = append(pins, polIn{src, len(results[src]) - 1, p, p.CreationTimestamp.UnixNano(), ""})
		}
		for i := range set.IstioPolicies {
			ip := &set.IstioPolicies[i]
			conv, issues := ip.Convert()
			if conv == nil {
				results[src] = append(results[src], Result{APIVersion: IstioAPIVersion, Kind: KindAuthorizationPolicy,
					Namespace: ip.Namespace, Name: ip.Name, Generation: ip.Generation, Reason: ReasonUnsupported,
					Message: issues.ToAggregate().Error() + "; not enforced by Ambit"})
				continue
			}
			r := Result{APIVersion: IstioAPIVersion, Kind: KindAuthorizationPolicy,
				Namespace: ip.Namespace, Name: ip.Name, Generation: ip.Generation, Accepted: true, Reason: ReasonAccepted}
			if len(issues) > 0 {
				r.Accepted, r.Reason = false, ReasonUnsupported
				r.Message = issues.ToAggregate().Error() + "; L4 part enforced (ALLOW rules with these fields never match, DENY rules match without them)"
			}
			results[src] = append(results[src], r)
			pins = append(pins, polIn{src, len(results[src]) - 1, conv, ip.CreationTimestamp.UnixNano(), "istio:"})
		}
		for i := range set.Modes {
			m := &set.Modes[i]
			results[src] = append(results[src], Result{APIVersion: APIVersion, Kind: KindInboundMode,
				Namespace: m.Namespace, Name: m.Name, Generation: m.Generation})
			mins = append(mins, modeIn{src, len(results[src]) - 1, m, "", m.Namespace})
		}
		for i := range set.IstioPeerAuthentications {
			pa := &set.IstioPeerAuthentications[i]
			conv, issues := pa.Convert()
			r := Result{APIVersion: IstioAPIVersion, Kind: KindPeerAuthentication,
				Namespace: pa.Namespace, Name: pa.Name, Generation: pa.Generation}
			if len(issues) > 0 {
				r.Reason, r.Message = ReasonUnsupported, issues.ToAggregate().Error()
			}
			if pa.Namespace == e.iroot && len(pa.Spec.Selector.labels()) > 0 {
				// Istio skips these for every workload (no mesh-wide
				// selector PeerAuthentication). Read into our root
				// namespace they would pick its workloads, and a
				// PERMISSIVE one would let plaintext in there.
				r.Reason = ReasonUnsupported
				r.Message = "a selector in Istio's root namespace " + e.iroot + " selects no workload in Istio; not enforced"
				results[src] = append(results[src], r)
				continue
			}
			results[src] = append(results[src], r)
			mins = append(mins, modeIn{src, len(results[src]) - 1, conv, "istio:", pa.Namespace})
		}
	}
	byAge(pins, func(p polIn) (int64, string, string) { return p.ts, p.ap.Namespace, p.pre + p.ap.Name })
	byAge(mins, func(m modeIn) (int64, string, string) {
		return m.m.CreationTimestamp.UnixNano(), m.ns, m.pre + m.m.Name
	})

	h := sha256.New()
	enc := json.NewEncoder(h)
	pols := make([]*compiledPolicy, 0, len(pins))
	for _, in := range pins {
		res := &results[in.src][in.ri]
		cp, errMsg, selOK := compilePolicy(in.pre, in.ap)
		if cp != nil {
			// A document whose type we could not read may have been
			// ours or Istio's: in either root namespace it fails closed
			// mesh-wide, whichever group it was read as.
			cp.mesh = e.meshWide(in.pre != "", cp.namespace) ||
				in.ap.unread && (cp.namespace == e.root || cp.namespace == e.iroot)
		}
		switch {
		case errMsg != "":
			// Istio's too: an unreadable Istio policy (an unknown field,
			// an unknown action) is enforced as deny-all like ours, and
			// its verdict must say so rather than "Accepted".
			scope := "the workloads it selects"
			switch {
			case cp == nil:
				// No namespace: no scope it could be confined to (a
				// file has no default namespace). Saying "enforced"
				// here was untrue.
				scope = ""
			case !selOK && cp.mesh:
				scope = "every workload in the mesh (root namespace)"
			case !selOK:
				scope = "every workload of its namespace"
			}
			res.Accepted, res.Reason = false, ReasonInvalid
			res.Message = errMsg + "; enforced as deny-all for " + scope + " until fixed"
			if scope == "" {
				res.Message = errMsg + "; not enforced: it names no namespace"
			}
		case res.APIVersion == APIVersion:
			res.Accepted, res.Reason = true, ReasonAccepted
		}
		if cp == nil {
			continue
		}
		pols = append(pols, cp)
		_ = enc.Encode([]any{cp.key, in.ap.Namespace, in.ap.Spec, errMsg, selOK, cp.mesh})
	}
	var modes []*compiledMode
	var modeNS []string
	// Namespace-wide modes by level: a namespace, or the mesh (ours in
	// our root namespace and Istio's in Istio's share that level).
	type level struct {
		ns   string
		mesh bool
	}
	wide := map[level]string{}
	unsetWide := map[level]string{} // namespace-wide UNSET PeerAuthentications
	const unsetMsg = "sets no mode (UNSET): inherits; newer PeerAuthentications of its level are ignored, as in Istio"
	for _, in := range mins {
		res := &results[in.src][in.ri]
		m := in.m
		key := policyKey(in.pre, m.Namespace, m.Name)
		note := res.Reason == ReasonUnsupported // Istio fields we could not honour
		noteMsg := res.Message
		sel := m.Spec.Selector.labels()
		mode, ports := m.Spec.Mode, m.Spec.Ports
		every := false // see compiledMode.everyWorkload
		errs := ValidateInboundMode(m)
		if len(errs) > 0 {
			if m.Namespace == "" {
				res.Reason, res.Message = ReasonInvalid, errs.ToAggregate().Error()+"; ignored"
				continue
			}
			// Unreadable: enforce the stricter choice until fixed.
			scope := "the workloads it selects"
			if len(validateSelector(m.Spec.Selector, nil)) > 0 {
				sel, scope, every = nil, "every workload of its namespace", true
			}
			mode, ports = Strict, nil
			res.Reason, res.Message = ReasonInvalid, errs.ToAggregate().Error()+"; enforced as STRICT for "+scope+" until fixed"
		}
		// A selector we could not read is no namespace-wide mode: it
		// does not conflict with one (and so is not ignored). Selector
		// modes are never mesh-wide: those of our root namespace pick
		// its own workloads (Istio's root namespace ones were dropped
		// above).
		mesh := false
		if len(sel) == 0 && !every {
			mesh = e.meshWide(in.pre != "", in.ns)
			lv := level{in.ns, mesh}
			if mesh {
				lv.ns = ""
			}
			first, dup := wide[lv]
			if !dup && in.pre != "" {
				first, dup = unsetWide[lv]
			}
			if dup {
				res.Accepted, res.Reason = false, ReasonConflict
				res.Message = fmt.Sprintf("namespace %s already has the namespace-wide inbound mode %s (older); this one is ignored", in.ns, first)
				if mesh {
					res.Message = fmt.Sprintf("the mesh already has the mesh-wide inbound mode %s (older); this one is ignored", first)
				}
				continue
			}
			if m.inherit && len(errs) == 0 {
				// Takes the level from newer PeerAuthentications only
				// (Istio's rule among its own objects); it sets
				// nothing, so it is not compiled.
				unsetWide[lv] = key
				res.Accepted, res.Reason, res.Message = true, ReasonAccepted, unsetMsg
				_ = enc.Encode([]any{key, in.ns, mesh, "unset"})
				continue
			}
			wide[lv] = key
		}
		switch {
		case len(errs) > 0:
		case m.inherit:
			res.Accepted, res.Reason, res.Message = true, ReasonAccepted, unsetMsg
		case note:
			res.Accepted, res.Reason, res.Message = false, ReasonUnsupported, noteMsg+"; the rest is enforced"
		default:
			res.Accepted, res.Reason = true, ReasonAccepted
		}
		cm := &compiledMode{key: key, selector: maps.Clone(sel), mode: mode, everyWorkload: every,
			inherit: m.inherit && len(errs) == 0, istio: in.pre != "", mesh: mesh}
		for _, pm := range ports {
			if cm.ports == nil {
				cm.ports = map[uint16]Mode{}
			}
			cm.ports[uint16(pm.Port)] = pm.Mode
		}
		modes = append(modes, cm)
		modeNS = append(modeNS, in.ns)
		_ = enc.Encode([]any{key, in.ns, mesh, sel, mode, ports, every, m.inherit})
	}
	var digest [32]byte
	h.Sum(digest[:0])
	return pols, modes, modeNS, results, digest
}

// meshWide says whether a namespace-wide object of namespace ns applies to
// the whole mesh: Ambit's kinds in our root namespace, Istio's in Istio's.
// Istio's in ours are that namespace's only, as Istio reads them: read
// mesh-wide, an old PERMISSIVE PeerAuthentication there outranked
// istio-system's STRICT one, and an ALLOW policy there locked down every
// workload of the mesh.
func (e *Engine) meshWide(istio bool, ns string) bool {
	if istio {
		return ns == e.iroot
	}
	return ns == e.root
}

func (s *Selector) labels() map[string]string {
	if s == nil || len(s.MatchLabels) == 0 {
		return nil
	}
	return s.MatchLabels
}

// compilePolicy compiles p, or — when p is invalid — a deny-all stand-in
// for the workloads it selects (namespace-wide if the selector is bad or
// the object's type unknown).
// Policies without a usable namespace compile to nothing.
func compilePolicy(prefix string, p *AuthorizationPolicy) (*compiledPolicy, string, bool) {
	errs := ValidateAuthorizationPolicy(p)
	cp := &compiledPolicy{
		key:       policyKey(prefix, p.Namespace, p.Name),
		namespace: p.Namespace,
		selector:  maps.Clone(p.Spec.Selector.labels()),
		action:    p.Spec.Action,
	}
	if cp.action == "" {
		cp.action = Allow
	}
	if len(errs) == 0 {
		cp.rules = make([]*rule, 0, len(p.Spec.Rules))
		for i := range p.Spec.Rules {
			cp.rules = append(cp.rules, compileRule(cp, &p.Spec.Rules[i]))
		}
		return cp, "", true
	}
	if p.Namespace == "" {
		return nil, errs.ToAggregate().Error(), false
	}
	// A type we do not know (p.unread) has no selector we can trust.
	selOK := len(validateSelector(p.Spec.Selector, nil)) == 0 && !p.unread
	if !selOK {
		cp.selector = nil
	}
	cp.action, cp.invalid = Deny, true
	cp.rules = []*rule{{pol: cp}}
	return cp, errs.ToAggregate().Error(), selOK
}

// Authorize decides one inbound connection. It never blocks on an
// Update, and allocates nothing unless it denies.
func (e *Engine) Authorize(c tunnel.ConnInfo) tunnel.Verdict {
	s := e.snap.Load()
	st := s.state(&c.Dst)
	if c.Plaintext {
		if md, m := st.mode(c.DstPort); md == Strict {
			v := tunnel.Verdict{Policy: m.key, Reason: ReasonStrictPlaintext}
			m.denials.Inc()
			e.logDenial(&c, v)
			return v
		}
	}
	if st.empty() {
		return tunnel.Verdict{Allow: true, Reason: ReasonNoPolicy}
	}
	q := makeQuery(c.SrcIdentity, c.Plaintext, c.SrcIP, c.DstPort)
	if r := st.matchDeny(&q); r != nil {
		v := tunnel.Verdict{Policy: r.pol.key, Reason: ReasonDeniedByPolicy}
		r.pol.denials.Inc()
		e.logDenial(&c, v)
		return v
	}
	if !st.hasAllow() {
		return tunnel.Verdict{Allow: true, Reason: ReasonNoPolicy}
	}
	if r := st.matchAllow(&q); r != nil {
		return tunnel.Verdict{Allow: true, Policy: r.pol.key, Reason: ReasonAllowed}
	}
	v := tunnel.Verdict{Reason: ReasonNoAllowMatch}
	e.noAllow.Inc()
	e.logDenial(&c, v)
	return v
}

// Mode reports the inbound mode in force for a workload's port and the
// InboundMode that set it ("" for the default).
func (e *Engine) Mode(w tunnel.Workload, port uint16) (Mode, string) {
	md, m := e.snap.Load().state(&w).mode(port)
	if m == nil {
		return md, ""
	}
	return md, m.key
}

// logDenial logs with both identities, at most limit lines a second; the
// lines dropped are counted into the next one.
func (e *Engine) logDenial(c *tunnel.ConnInfo, v tunnel.Verdict) {
	now := time.Now().Unix()
	if w := e.logWindow.Load(); w != now && e.logWindow.CompareAndSwap(w, now) {
		e.logCount.Store(0)
	}
	if e.logCount.Add(1) > e.limit {
		e.logSuppressed.Add(1)
		return
	}
	src := c.SrcIdentity
	if c.Plaintext || src == "" {
		src = "(plaintext)"
	}
	e.log.Info("connection denied",
		"src.identity", src, "src.ip", c.SrcIP,
		"dst.identity", c.Dst.Identity, "dst.workload", c.Dst.Namespace+"/"+c.Dst.Name,
		"dst.port", c.DstPort, "policy", v.Policy, "reason", v.Reason,
		"suppressed_before", e.logSuppressed.Swap(0))
}
