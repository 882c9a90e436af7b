package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"net/netip"

	"github.com/ambit-mesh/ambit/node-agent/cluster"
	"github.com/ambit-mesh/ambit/node-agent/netnsfind"
	"github.com/ambit-mesh/ambit/node-agent/state"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

type keyKind int

const (
	keyPod keyKind = iota
	keyNamespace
	keyAll
)

type key struct {
	kind      keyKind
	namespace string
	name      string
}

// queue coalesces change events: a burst of events about one pod, or a
// namespace flip touching hundreds, becomes one pass. Its size is bounded
// by the number of distinct pods and namespaces.
type queue struct {
	mu       sync.Mutex
	set      map[key]struct{}
	snapshot bool
	signal   chan struct{}
	done     chan struct{}
	once     sync.Once
}

func newQueue() *queue {
	return &queue{set: map[key]struct{}{}, signal: make(chan struct{}, 1), done: make(chan struct{})}
}

func (q *queue) add(k key) {
	q.mu.Lock()
	q.set[k] = struct{}{}
	q.mu.Unlock()
	q.kick()
}

func (q *queue) wantSnapshot() {
	q.mu.Lock()
	q.snapshot = true
	q.mu.Unlock()
	q.kick()
}

func (q *queue) kick() {
	select {
	case q.signal <- struct{}{}:
	default:
	}
}

func (q *queue) close() { q.once.Do(func() { close(q.done) }) }

func (q *queue) take() ([]key, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	out := make([]key, 0, len(q.set))
	for k := range q.set {
		out = append(out, k)
	}
	clear(q.set)
	snap := q.snapshot
	q.snapshot = false
	return out, snap
}

// onEvent is the view's callback: it must not block.
func (a *Agent) onEvent(ev cluster.Event) {
	switch ev.Kind {
	case cluster.PodChanged, cluster.PodDeleted:
		a.queue.add(key{kind: keyPod, namespace: ev.Namespace, name: ev.Name})
		// The pod's annotation may have changed (someone removed it,
		// our own write came back): compared again, written if it
		// differs. A deleted pod has nothing left to annotate.
		if a.statusSync != nil {
			if ev.Kind == cluster.PodDeleted {
				a.statusSync.Forget(ev.Namespace, ev.Name, ev.UID)
			} else {
				a.statusSync.Changed(ev.Namespace, ev.Name)
			}
		}
	case cluster.NamespaceChanged:
		a.queue.add(key{kind: keyNamespace, namespace: ev.Namespace})
		a.queue.wantSnapshot()
	case cluster.Resynced:
		a.queue.add(key{kind: keyAll})
		a.queue.wantSnapshot()
	}
}

// Resync asks for a full reconcile (tests, SIGHUP).
func (a *Agent) Resync() { a.queue.add(key{kind: keyAll}) }

func (a *Agent) reconcileLoop(ctx context.Context) {
	tick := time.NewTicker(reconcileEvery)
	defer tick.Stop()
	retry := time.NewTicker(a.liveRetryEvery)
	defer retry.Stop()
	hb := a.live.reconcileBeat()
	for {
		// Waiting: the ticker turns the loop within a tick. Working:
		// it beats again after each pod (reconcile).
		beat(hb, reconcileEvery)
		select {
		case <-ctx.Done():
			return
		case <-a.queue.done:
			return
		case <-tick.C:
			// Labels of pods on other nodes change the opt-in list
			// without an event here.
			beat(hb, 0)
			a.writeSnapshot()
			continue
		case <-retry.C:
			beat(hb, 0)
			a.retryLive()
			continue
		case <-a.queue.signal:
		}
		beat(hb, 0)
		keys, snap := a.queue.take()
		if snap {
			a.writeSnapshot()
		}
		a.reconcile(ctx, keys)
	}
}

// reconcile expands keys to pods and brings each to its desired state,
// a few at a time.
func (a *Agent) reconcile(ctx context.Context, keys []key) {
	type nn struct{ ns, name string }
	want := map[nn]bool{}
	var local []cluster.Pod
	localOnce := func() []cluster.Pod {
		if local == nil {
			local = a.view.LocalPods()
		}
		return local
	}
	known := func(match func(p *pod) bool) {
		a.mu.Lock()
		for _, p := range a.byName {
			if match(p) {
				want[nn{p.rec.Namespace, p.rec.Name}] = true
			}
		}
		a.mu.Unlock()
	}
	for _, k := range keys {
		switch k.kind {
		case keyPod:
			want[nn{k.namespace, k.name}] = true
		case keyNamespace:
			for _, p := range localOnce() {
				if p.Namespace == k.namespace {
					want[nn{p.Namespace, p.Name}] = true
				}
			}
			known(func(p *pod) bool { return p.rec.Namespace == k.namespace })
		case keyAll:
			for _, p := range localOnce() {
				want[nn{p.Namespace, p.Name}] = true
			}
			known(func(*pod) bool { return true })
		}
	}
	sem := make(chan struct{}, 4)
	var wg sync.WaitGroup
	var scan lazyScan
	hb := a.live.reconcileBeat()
	for k := range want {
		if ctx.Err() != nil {
			break
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			a.reconcilePod(ctx, k.ns, k.name, &scan)
			// Progress: a pass over many pods is not a stall.
			beat(hb, 0)
		}()
	}
	wg.Wait()
}

// lazyScan is one /proc scan shared by a reconcile pass, made only if a
// pod's own record cannot locate its netns.
type lazyScan struct {
	once sync.Once
	s    *netnsfind.Scan
	err  error
}

func (l *lazyScan) get(proc string) (*netnsfind.Scan, error) {
	l.once.Do(func() { l.s, l.err = netnsfind.Scanner{ProcRoot: proc}.Scan() })
	return l.s, l.err
}

func (a *Agent) reconcilePod(ctx context.Context, namespace, name string, scan *lazyScan) {
	unlock := a.lock(namespace, name)
	defer unlock()
	cctx, cancel := context.WithTimeout(ctx, a.cfg.RequestTimeout.Duration)
	defer cancel()
	cp, found, err := a.view.Pod(cctx, namespace, name)
	if err != nil {
		a.log.Warn("reconcile: looking up pod", "pod", namespace+"/"+name, "err", err)
		return
	}
	// Last: once the pass enrolled the pod, or found it gone.
	defer a.dropKeptLocked(namespace, name, cp, found)
	a.mu.Lock()
	p := a.byName[namespace+"/"+name]
	a.mu.Unlock()
	failed := false
	defer func() { a.noteLive(namespace, name, failed) }()
	if !found {
		if p != nil && !a.static && strings.HasPrefix(p.rec.ContainerID, foundPrefix) {
			// Deleted from the API, and a sandbox found by live
			// enrollment has no container ID its DEL could name
			// (isSandbox matches it only by a netns the DEL may no
			// longer bring): forgotten now, record and all, or it
			// stayed registered, its record kept, until a restart.
			a.forgetLocked(&cniproto.Request{Op: cniproto.OpDel, Pod: cniproto.Pod{Namespace: namespace, Name: name, UID: p.rec.UID, ContainerID: p.rec.ContainerID}}, true)
		} else if p != nil && p.enrolled() && !a.static {
			// Deleted from the API: the sandbox goes too (DEL follows);
			// stop serving now, rules vanish with the netns.
			a.releaseAsync(p)
		} else if p != nil && p.enrolled() {
			a.unenrollLive(p, cluster.Pod{Namespace: namespace, Name: name})
		} else if p != nil && a.static {
			// Not in the inventory: not meshed (see below).
			a.setStatus(cluster.Pod{Namespace: namespace, Name: name, UID: p.rec.UID}, "", "", "")
		}
		return
	}
	if cp.NodeName != "" && cp.NodeName != a.cfg.NodeName {
		return
	}
	if p != nil && !a.static && p.rec.UID != "" && cp.UID != "" && p.rec.UID != cp.UID && !holdsPodIP(p, cp) {
		// The sandbox known under the name is another pod's: an older
		// one deleted and made again under its name (a relist after a
		// watch gap reports that as an update, no deletion), or a newer
		// one the cache has not caught up with. Decided on cp, the old
		// sandbox was enrolled live as the new pod (its identity, its
		// "enabled" annotation while nothing of it ran). Each sandbox
		// is the runtime's to settle: the old one's DEL releases it,
		// the new one's ADD enrolls it (supersedeFound lets go of an
		// old found: one), and a cache behind gets its own event.
		a.log.Info("reconcile: the sandbox known under the pod's name is another pod's (UID); left to its DEL and the new pod's ADD", "pod", namespace+"/"+name, "sandboxUID", p.rec.UID, "podUID", cp.UID)
		return
	}
	var nsp *cluster.Namespace
	if n, ok := a.view.Namespace(namespace); ok {
		nsp = &n
	}
	d := a.policy.Decide(cp, nsp)
	switch {
	case d.Enroll && (p == nil || !p.enrolled()):
		// A running pod that declares a port of ours is left as it
		// runs (its app may hold the port; taking it from under the app,
		// or sharing it, would break it silently) and reported as a
		// failed enrollment, as at ADD.
		err := a.declaredConflict(cp)
		if err == nil {
			err = a.enrollLive(ctx, cp, p, scan)
			// Retried on a timer (liveretry.go). Not a declared
			// port (it changes only with a new pod, an event), nor
			// a pod with no sandbox here (its sandbox's start is).
			failed = err != nil && !errors.Is(err, errNotRunning)
		}
		if err != nil {
			if errors.Is(err, errNotRunning) {
				a.log.Debug("live enrollment: pod not running here", "pod", namespace+"/"+name, "err", err)
				return
			}
			a.m.failures.WithLabelValues(reasonOf(err)).Inc()
			a.setStatus(cp, "failed", eventReason(err), message(err))
			a.log.Warn("live enrollment failed", "pod", namespace+"/"+name, "err", err)
		}
	case d.Enroll && p.enrolled():
		// Served already: the tunnel was handed the pod's labels at
		// enrollment, and policy selects by them. A relabelled pod (a
		// DENY that now selects it) must be judged as it is now.
		if rl, ok := p.serve.(Relabeler); ok {
			rl.SetLabels(cp.Labels)
		}
	case !d.Enroll && p != nil && p.enrolled():
		a.unenrollLive(p, cp)
	case !d.Enroll:
		// Not served here, so no annotation. Usually there is none and
		// nothing is written (statussync compares with the cache); this
		// repairs a removal lost before a restart (the next agent finds
		// the pod's record not enrolled and would otherwise never say
		// it), or an "enabled" left by a sandbox the pod no longer has.
		a.setStatus(cp, "", "", "")
	}
}

// holdsPodIP tells whether p's sandbox holds one of cp's IPs, so is cp's
// own whatever UID its record names: a live sandbox's IP is given to no
// other pod, and a pod's IPs are its sandbox's. Agents before session 25
// recorded the UID their view held at the ADD, for a pod made again under
// its name the previous pod's; such a record, adopted, is the pod's
// running sandbox, and taken for another pod's its label changes were
// ignored (TestRecordWithAPreviousPodsUIDStillFollowsLabels). A pod made
// again has no IP before its own sandbox, which is not the old one.
func holdsPodIP(p *pod, cp cluster.Pod) bool {
	if len(cp.IPs) == 0 {
		return false
	}
	f := p.netns
	if f == nil {
		var err error
		if f, err = os.Open(p.rec.Netns); err != nil {
			return false
		}
		defer f.Close()
		if ino, err := netnsfind.Inode(f); err != nil || (p.rec.NetnsInode != 0 && ino != p.rec.NetnsInode) {
			return false
		}
	}
	ok, err := netnsfind.HoldsAny(f, cp.IPs)
	return err == nil && ok
}

var errNotRunning = errors.New("no running sandbox found")

// enrollLive enrolls a running pod: listeners first, then rules, so the
// first redirected connection finds a listener.
func (a *Agent) enrollLive(ctx context.Context, cp cluster.Pod, p *pod, scan *lazyScan) error {
	start := time.Now()
	ips := cp.IPs
	if len(ips) == 0 && p != nil {
		ips = p.rec.IPs
	}
	if len(ips) == 0 {
		return fmt.Errorf("%w: pod has no IP yet", errNotRunning)
	}
	var rec state.Pod
	if p != nil {
		rec = p.rec
	}
	f, rec, err := a.locate(rec, podKey{cp.Namespace, cp.Name, cp.UID}, ips, scan)
	if err != nil {
		return err
	}
	fresh := p == nil // found by the scan: no record of it yet
	if p == nil {
		rec.Namespace, rec.Name, rec.UID = cp.Namespace, cp.Name, cp.UID
		rec.ContainerID = foundPrefix + cp.Namespace + "/" + cp.Name
		rec.Since = time.Now().UTC()
		p = &pod{}
	}
	rec.IPs = ips
	spec := a.specFor(ips, f)
	wl := a.workload(cp)
	rec.Identity, rec.IPv4, rec.IPv6 = wl.Identity, spec.IPv4, spec.IPv6
	prev := p.rec
	a.setRec(p, func(r *state.Pod) { *r = rec })
	p.spec = spec
	if err := a.serve(p, f, wl, false); err != nil {
		// The record keeps the namespace it named: the one refused
		// may be another pod's.
		a.setRec(p, func(r *state.Pod) { *r = prev })
		f.Close()
		return err
	}
	backend, err := a.rules.Install(loopCtx, p.netns, "", spec)
	if err != nil {
		c, cancel := context.WithTimeout(context.Background(), time.Second)
		a.release(c, p)
		cancel()
		return &failure{"redirect", err}
	}
	a.setRec(p, func(r *state.Pod) { r.Enrolled, r.Backend = true, backend })
	// Rules installed afresh: a repair that fails from now on is a new
	// failure, said and counted again. The pod struct outlives an
	// unenrollment, and its flag from before kept the next failure
	// silent (TestRepairFailureReportedAfterReenrollment).
	p.repairFailing = false
	a.rewriteRecord(p.rec, fresh)
	a.register(p)
	a.m.latency.WithLabelValues("live").Observe(time.Since(start).Seconds())
	a.setStatus(cp, "enabled", "", "")
	a.log.Info("running pod enrolled", "pod", cp.Namespace+"/"+cp.Name, "identity", wl.Identity, "backend", backend)
	return nil
}

// unenrollLive removes the rules first (new connections go straight to the
// app), then closes the listeners and drains established connections,
// which the drain guard (drainguard.go) keeps working meanwhile.
func (a *Agent) unenrollLive(p *pod, cp cluster.Pod) {
	if err := holdDrainGuard(p.netns, p.spec); err != nil {
		a.log.Warn("cannot hold NAT and the reply routing for draining; established connections will be cut", "pod", p.rec.Namespace+"/"+p.rec.Name, "err", err)
	} else {
		name := p.rec.Namespace + "/" + p.rec.Name
		p.afterDrain = func(f *os.File) {
			if err := releaseDrainGuard(f); err != nil {
				a.log.Warn("removing drain guard", "pod", name, "err", err)
			}
		}
	}
	if err := a.rules.Uninstall(loopCtx, p.netns); err != nil {
		a.m.failures.WithLabelValues("redirect").Inc()
		a.log.Error("removing redirection; closing listeners anyway (connections are refused, not leaked)", "pod", p.rec.Namespace+"/"+p.rec.Name, "err", err)
	}
	a.releaseAsync(p)
	a.setRec(p, func(r *state.Pod) { r.Enrolled, r.Backend = false, "" })
	a.rewriteRecord(p.rec, false)
	if cp.Name != "" {
		cp.UID = p.rec.UID
		a.setStatus(cp, "", "", "")
	}
	a.log.Info("running pod unenrolled", "pod", p.rec.Namespace+"/"+p.rec.Name)
}

// rewriteRecord persists a live (un)enrollment. A record that exists is
// only updated: another agent of the node may have removed it meanwhile
// (it served the pod's DEL during a surge upgrade), and writing it back
// would hide that removal from the follower (recordPass), so this agent
// would keep serving a deleted sandbox and the next agent would adopt it.
// Left removed, the follower releases the pod. fresh is a pod found by
// the /proc scan, which has no record to update.
func (a *Agent) rewriteRecord(rec state.Pod, fresh bool) {
	var err error
	if fresh {
		err = a.store.Put(rec)
	} else if ok, uerr := a.store.Update(rec); uerr != nil {
		err = uerr
	} else if !ok {
		a.log.Info("pod record removed meanwhile (another agent served its DEL); not writing it back", "pod", rec.Namespace+"/"+rec.Name)
	}
	if err != nil {
		a.log.Warn("persisting pod record", "pod", rec.Namespace+"/"+rec.Name, "err", err)
	}
}

// locate opens the netns of pod k: the recorded path when it is still
// the same namespace (inode) and holds a pod IP, else the /proc scan. A
// namespace found by the IPs alone is refused when it is another pod's
// (netnsowner.go).
func (a *Agent) locate(rec state.Pod, k podKey, ips []netip.Addr, scan *lazyScan) (*os.File, state.Pod, error) {
	return locateNetns(a.cfg.ProcRoot, rec, ips, k.uid, scan, func(ino uint64) error { return a.netnsTaken(ino, k, ips) })
}

// locateNetns is locate; taken (nil: none) refuses a namespace the
// record's inode does not vouch for, found by ips, that is another pod's.
func locateNetns(procRoot string, rec state.Pod, ips []netip.Addr, uid string, scan *lazyScan, taken func(ino uint64) error) (*os.File, state.Pod, error) {
	if rec.Netns != "" {
		if f, err := os.Open(rec.Netns); err == nil {
			ino, ierr := netnsfind.Inode(f)
			ok, herr := netnsfind.HoldsAny(f, ips)
			if ierr == nil && herr == nil && ok && (rec.NetnsInode == 0 || ino == rec.NetnsInode) {
				if rec.NetnsInode == 0 && taken != nil {
					// A record without an inode: its path may name
					// another sandbox's namespace by now.
					if err := taken(ino); err != nil {
						f.Close()
						return nil, rec, err
					}
				}
				rec.NetnsInode = ino
				return f, rec, nil
			}
			f.Close()
		}
	}
	sc, err := scan.get(procRoot)
	if err != nil {
		return nil, rec, &failure{"netns", err}
	}
	n, err := sc.Find(ips, uid)
	if err != nil {
		if errors.Is(err, netnsfind.ErrNotFound) {
			return nil, rec, fmt.Errorf("%w: %v", errNotRunning, err)
		}
		if errors.Is(err, netnsfind.ErrOtherPod) {
			return nil, rec, &failure{reasonNetnsOwner, err}
		}
		return nil, rec, &failure{"netns", err}
	}
	f, err := os.Open(n.Path)
	if err != nil {
		return nil, rec, fmt.Errorf("%w: %v", errNotRunning, err)
	}
	if ino, err := netnsfind.Inode(f); err != nil || ino != n.Inode {
		f.Close()
		return nil, rec, &failure{"netns", fmt.Errorf("%s changed while it was opened", n.Path)}
	}
	if taken != nil {
		if err := taken(n.Inode); err != nil {
			f.Close()
			return nil, rec, err
		}
	}
	if n.Inode != rec.NetnsInode {
		// Not the namespace the record was written for: what the
		// record says was set there (tcp_migrate_req) is not known
		// of this one.
		rec.MigrateReq = false
	}
	rec.Netns, rec.NetnsInode = n.Path, n.Inode
	return f, rec, nil
}

// writeSnapshot writes the enrollment snapshot the plugin reads while the
// agent is away.
func (a *Agent) writeSnapshot() {
	s := &cniproto.Snapshot{
		Version:            cniproto.SnapshotVersion,
		Generated:          time.Now().UTC(),
		LabelKey:           a.cfg.EnrollLabel,
		ExcludedNamespaces: slices.Sorted(slices.Values(a.cfg.ExcludedNamespaces)),
		AmbientNamespaces:  []string{},
		OptInNamespaces:    []string{},
	}
	if sl, ok := a.view.(snapshotLister); ok {
		s.AmbientNamespaces = append(s.AmbientNamespaces, sl.AmbientNamespaces()...)
		s.OptInNamespaces = append(s.OptInNamespaces, sl.OptInNamespaces()...)
	} else {
		// A view without lists: fail closed for every namespace we know
		// a local pod of that would be enrolled.
		seen := map[string]bool{}
		for _, p := range a.view.LocalPods() {
			if seen[p.Namespace] {
				continue
			}
			var nsp *cluster.Namespace
			if n, ok := a.view.Namespace(p.Namespace); ok {
				nsp = &n
			}
			if a.policy.Decide(p, nsp).Enroll {
				seen[p.Namespace] = true
				s.OptInNamespaces = append(s.OptInNamespaces, p.Namespace)
			}
		}
		slices.Sort(s.OptInNamespaces)
	}
	if err := cniproto.WriteSnapshot(a.cfg.SnapshotFile, s); err != nil {
		a.log.Error("writing enrollment snapshot", "path", a.cfg.SnapshotFile, "err", err)
		return
	}
	a.log.Debug("enrollment snapshot written", "ambient", strings.Join(s.AmbientNamespaces, ","), "optIn", strings.Join(s.OptInNamespaces, ","))
}
