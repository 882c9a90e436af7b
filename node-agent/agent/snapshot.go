package agent

import (
	"context"
	"net"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"weak"

	"github.com/ambit-mesh/ambit/node-agent/admin"
	"github.com/ambit-mesh/ambit/node-agent/cluster"
	"github.com/ambit-mesh/ambit/plugin/redirect"
	"github.com/ambit-mesh/ambit/tunnel"
)

// This file is the agent's part of `ambit-agent status` (node-agent/admin):
// which pods it serves or should, in what state. It reads what the agent
// keeps anyway, each pod under its own lock, and remembers the two things
// nothing else did: the last look at each pod's rules (watchedRules) and
// why a pod's enrollment last failed (failNotes).

// podLockWait bounds the wait for one pod's lock: a pod whose ADD, DEL or
// rule check holds it longer is reported busy rather than hold the
// operator's answer (and the next pods') behind it.
const podLockWait = time.Second

// AdminPods lists the pods this agent serves or should serve: every pod
// enrolled, every local pod the enrollment policy selects that is not
// (pending), every pod whose last enrollment failed.
func (a *Agent) AdminPods(ctx context.Context) []admin.Pod {
	a.mu.Lock()
	known := make(map[string]*pod, len(a.byName))
	for k, p := range a.byName {
		known[k] = p
	}
	a.mu.Unlock()
	var counts map[*tunnel.Serving]tunnel.ConnCounts
	if cc, ok := a.tun.(interface {
		ConnCounts() map[*tunnel.Serving]tunnel.ConnCounts
	}); ok {
		counts = cc.ConnCounts()
	}
	// The cluster's pods of this node, from the view's cache: whether a
	// pod should be enrolled is decided as the agent decides it.
	local := map[string]cluster.Pod{}
	for _, cp := range a.view.LocalPods() {
		local[cp.Namespace+"/"+cp.Name] = cp
	}
	wanted := func(key string) (cluster.Pod, bool) {
		cp, ok := local[key]
		if !ok {
			return cp, false
		}
		var nsp *cluster.Namespace
		if n, ok := a.view.Namespace(cp.Namespace); ok {
			nsp = &n
		}
		return cp, a.policy.Decide(cp, nsp).Enroll
	}
	notes := a.admin.notes.keep(func(key string) bool { _, ok := local[key]; return ok || known[key] != nil })

	out := map[string]admin.Pod{}
	for key, p := range known {
		ns, name, _ := strings.Cut(key, "/")
		ap, ok := a.adminPodLocked(ctx, ns, name, p, counts)
		if !ok {
			out[key] = admin.Pod{Namespace: ns, Name: name, State: admin.StatePending, Reason: "Busy",
				Message: "an operation on the pod (enrollment, rule check, DEL) held its lock longer than " + podLockWait.String()}
			continue
		}
		if ap.State == admin.StateEnrolled {
			out[key] = ap
		} else if _, want := wanted(key); want {
			// Recorded but not served: its enrollment is still to
			// come (a live enrollment retries at each reconcile).
			ap.State, ap.Reason = admin.StatePending, "NotEnrolled"
			ap.Message = "the pod should be enrolled and is not yet; a live enrollment is retried at each reconcile"
			out[key] = ap
		}
	}
	for key, cp := range local {
		if _, ok := out[key]; ok {
			continue
		}
		if _, want := wanted(key); !want {
			continue
		}
		ap := admin.Pod{Namespace: cp.Namespace, Name: cp.Name, UID: cp.UID, IPs: slices.Clone(cp.IPs), State: admin.StatePending,
			Identity: a.identity(cp)}
		if len(cp.IPs) == 0 {
			ap.Reason, ap.Message = "NoIP", "the pod has no IP yet: its sandbox is not set up (no CNI ADD has reached this agent)"
		} else {
			ap.Reason, ap.Message = "NotEnrolled", "the pod runs and should be enrolled; no ADD reached this agent and the live enrollment has not found it yet"
		}
		out[key] = ap
	}
	for key, n := range notes {
		ap, ok := out[key]
		if ok && ap.State == admin.StateEnrolled {
			continue // enrolled since (a later sandbox, a retry)
		}
		cur := ap.UID
		if cp, ok := local[key]; ok && cp.UID != "" {
			cur = cp.UID
		}
		if n.uid != "" && cur != "" && n.uid != cur {
			// An earlier pod of the name failed (a StatefulSet's pod
			// made again): not this one's failure. Its own ADD notes
			// the next.
			ns, name, _ := strings.Cut(key, "/")
			a.admin.notes.forget(ns, name, n.uid)
			continue
		}
		if !ok {
			ns, name, _ := strings.Cut(key, "/")
			ap = admin.Pod{Namespace: ns, Name: name, UID: n.uid}
			if cp, ok := local[key]; ok {
				ap.IPs = slices.Clone(cp.IPs)
			}
		}
		ap.State, ap.Reason, ap.Message, ap.Since = admin.StateFailed, n.reason, n.message, n.at
		out[key] = ap
	}
	list := make([]admin.Pod, 0, len(out))
	for _, ap := range out {
		list = append(list, ap)
	}
	return list
}

// adminPodLocked is adminPod under p's lock, waiting for it podLockWait
// at most (false: busy). The unlock is deferred: a panic in adminPod,
// recovered by net/http, must not leave the lock stripe held, which
// would wedge every later ADD and DEL of the pods sharing it.
func (a *Agent) adminPodLocked(ctx context.Context, ns, name string, p *pod, counts map[*tunnel.Serving]tunnel.ConnCounts) (admin.Pod, bool) {
	lctx, cancel := context.WithTimeout(ctx, podLockWait)
	unlock, ok := a.lockWithin(lctx, ns, name)
	cancel()
	if !ok {
		return admin.Pod{}, false
	}
	defer unlock()
	return a.admin.read(func(serving bool) admin.Pod { return a.adminPod(p, counts, serving) }), true
}

// testHookAdminPod, when set (tests), runs as adminPod starts.
var testHookAdminPod atomic.Pointer[func(*pod)]

// adminPod is p as status shows it (under p's lock). Once the agent
// shuts down (serving false) only the record is read: the shutdown lets
// every pod go, and each is said to drain.
func (a *Agent) adminPod(p *pod, counts map[*tunnel.Serving]tunnel.ConnCounts, serving bool) admin.Pod {
	if h := testHookAdminPod.Load(); h != nil {
		(*h)(p)
	}
	ap := admin.Pod{Namespace: p.rec.Namespace, Name: p.rec.Name, UID: p.rec.UID, ContainerID: p.rec.ContainerID,
		IPs: slices.Clone(p.rec.IPs), Identity: p.rec.Identity, Backend: p.rec.Backend}
	if !serving {
		if p.rec.Enrolled {
			// The header says the agent is stopping (draining).
			ap.State, ap.Since, ap.Reason = admin.StateEnrolled, p.rec.Since, "Draining"
		}
		return ap
	}
	if !p.enrolled() {
		return ap
	}
	ap.State, ap.Since = admin.StateEnrolled, p.rec.Since
	for _, l := range p.lns {
		if ta, ok := l.Addr().(*net.TCPAddr); ok {
			ap.Listeners = append(ap.Listeners, uint16(ta.Port))
		}
	}
	if wr, ok := a.rules.(*watchedRules); ok && p.netns != nil {
		if look, ok := wr.last(p.netns); ok {
			ap.Rules = &admin.RuleCheck{At: look.at, Result: look.result, Problem: look.problem}
			if ap.Backend == "" {
				ap.Backend = look.backend
			}
		}
	}
	if sv, ok := p.serve.(*tunnel.Serving); ok && counts != nil {
		if c, ok := counts[sv]; ok {
			ap.Connections = &admin.PodConnections{InboundHBONE: c.InboundHBONE, InboundPlaintext: c.InboundPlaintext,
				OutboundHBONE: c.OutboundHBONE, OutboundPassthrough: c.OutboundOther(), Held: c.Held,
				HBONEConnectionsIn: c.HBONEConnsIn, HBONEConnectionsOut: c.HBONEConnsOut}
		}
	}
	return ap
}

// ConnCounts is the tunnel's per-pod connection counts (for AdminPods).
func (t ProxyTunnel) ConnCounts() map[*tunnel.Serving]tunnel.ConnCounts {
	return t.Proxy.ConnCounts()
}

// lockWithin takes the pod's lock unless ctx ends first.
func (a *Agent) lockWithin(ctx context.Context, namespace, name string) (func(), bool) {
	m := a.stripe(namespace, name)
	if m.TryLock() {
		return m.Unlock, true
	}
	got := make(chan struct{})
	go func() {
		m.Lock()
		// Handed over only while the caller still waits.
		select {
		case got <- struct{}{}:
		case <-ctx.Done():
			m.Unlock()
		}
	}()
	select {
	case <-got:
		return m.Unlock, true
	case <-ctx.Done():
		return nil, false
	}
}

// watchedRules is the agent's Redirector, remembering the last look at
// each netns's rules (install, check, repair) for status. Keyed by the
// netns file the agent holds while it serves the pod, weakly: the entry
// goes when the file is collected after the pod is let go, so nothing
// has to remember to remove it.
type watchedRules struct {
	Redirector
	mu    sync.Mutex
	looks map[weak.Pointer[os.File]]ruleLook
}

type ruleLook struct {
	at                       time.Time
	result, problem, backend string
}

func watchRules(r Redirector) *watchedRules {
	return &watchedRules{Redirector: r, looks: map[weak.Pointer[os.File]]ruleLook{}}
}

func (w *watchedRules) last(f *os.File) (ruleLook, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	l, ok := w.looks[weak.Make(f)]
	return l, ok
}

// note records a look; an install right after a failed look is that
// look's repair.
func (w *watchedRules) note(f *os.File, install bool, backend string, err error) {
	if f == nil {
		return
	}
	k := weak.Make(f)
	l := ruleLook{at: time.Now(), result: admin.RulesOK, backend: backend}
	w.mu.Lock()
	prev, had := w.looks[k]
	if l.backend == "" {
		l.backend = prev.backend
	}
	switch {
	case err != nil && install && had && prev.result != admin.RulesOK:
		l.result, l.problem = admin.RulesFailed, "repair failed: "+err.Error()+" (found: "+prev.problem+")"
	case err != nil:
		l.result, l.problem = admin.RulesFailed, err.Error()
	case install && had && prev.result == admin.RulesFailed:
		l.result, l.problem = admin.RulesRepaired, prev.problem
	}
	w.looks[k] = l
	w.mu.Unlock()
	if !had {
		runtime.AddCleanup(f, func(k weak.Pointer[os.File]) {
			w.mu.Lock()
			delete(w.looks, k)
			w.mu.Unlock()
		}, k)
	}
}

// Install implements Redirector.
func (w *watchedRules) Install(ctx context.Context, f *os.File, backend redirect.Backend, spec redirect.Spec) (string, error) {
	used, err := w.Redirector.Install(ctx, f, backend, spec)
	w.note(f, true, used, err)
	return used, err
}

// Verify implements Redirector.
func (w *watchedRules) Verify(ctx context.Context, f *os.File, spec redirect.Spec) error {
	err := w.Redirector.Verify(ctx, f, spec)
	w.note(f, false, "", err)
	return err
}

// Recheck implements Redirector.
func (w *watchedRules) Recheck(ctx context.Context, f *os.File, spec redirect.Spec, c *redirect.Checked) error {
	err := w.Redirector.Recheck(ctx, f, spec, c)
	w.note(f, false, "", err)
	return err
}

// Uninstall implements Redirector.
func (w *watchedRules) Uninstall(ctx context.Context, f *os.File) error {
	err := w.Redirector.Uninstall(ctx, f)
	w.mu.Lock()
	delete(w.looks, weak.Make(f))
	w.mu.Unlock()
	return err
}

// adminState is what status keeps beside the pods.
type adminState struct {
	notes failNotes
	// stopped: the agent shuts down, releasing every pod (shutdown);
	// status then reads their records only, each said to drain. mu:
	// held (read) while a pod is read, (write) to set stopped.
	mu      sync.RWMutex
	stopped bool
}

// read runs fn, told whether the pods may still be read beyond their
// records.
func (s *adminState) read(fn func(serving bool) admin.Pod) admin.Pod {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return fn(!s.stopped)
}

// stop waits for the pod being read, if any, and makes status read
// records only from now on.
func (s *adminState) stop() {
	s.mu.Lock()
	s.stopped = true
	s.mu.Unlock()
}

// failNotes are the pods whose last enrollment failed, with why: the
// annotation and the Event say it in the cluster (not at all with a
// static inventory), and status says it on the node. Bounded: a node
// whose every pod fails keeps the latest maxFailNotes.
type failNotes struct {
	mu sync.Mutex
	m  map[string]failNote // namespace/name
}

type failNote struct {
	uid, reason, message string
	at                   time.Time
}

const maxFailNotes = 4096

// set follows setStatus: "failed" notes the failure, anything else (the
// pod enrolled, or no longer to be) clears it.
func (n *failNotes) set(cp cluster.Pod, st, reason, msg string) {
	key := cp.Namespace + "/" + cp.Name
	n.mu.Lock()
	defer n.mu.Unlock()
	if st != "failed" {
		delete(n.m, key)
		return
	}
	if n.m == nil {
		n.m = map[string]failNote{}
	}
	if _, ok := n.m[key]; !ok && len(n.m) >= maxFailNotes {
		oldest := ""
		for k, v := range n.m {
			if oldest == "" || v.at.Before(n.m[oldest].at) {
				oldest = k
			}
		}
		delete(n.m, oldest)
	}
	n.m[key] = failNote{uid: cp.UID, reason: reason, message: msg, at: time.Now()}
}

// forget follows forgetStatus (uid, if set, only that pod).
func (n *failNotes) forget(namespace, name, uid string) {
	key := namespace + "/" + name
	n.mu.Lock()
	defer n.mu.Unlock()
	if v, ok := n.m[key]; ok && (uid == "" || v.uid == "" || v.uid == uid) {
		delete(n.m, key)
	}
}

// keep drops the notes of pods keep says are gone and returns a copy of
// the rest.
func (n *failNotes) keep(keep func(key string) bool) map[string]failNote {
	n.mu.Lock()
	defer n.mu.Unlock()
	out := make(map[string]failNote, len(n.m))
	for k, v := range n.m {
		if !keep(k) {
			delete(n.m, k)
			continue
		}
		out[k] = v
	}
	return out
}
