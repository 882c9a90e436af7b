package kube

import (
	"net/netip"
	"slices"
	"sync"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
)

// podWait remembers the Services whose last rebuild left out endpoints
// of pods the pod cache did not have yet (see serviceEntries), by pod, so
// that the pod's arrival rebuilds them. Bounded by what the slices name:
// each rebuild replaces its Service's list.
//
// The arrival does not rebuild in the pod informer's handler: it marks
// the Service pending, and one goroutine (started when there is work,
// gone when there is none) rebuilds the pending ones. A rebuild costs
// what the Service's endpoints do (milliseconds for thousands), and the
// handler rebuilding inline held up every pod behind it; at an agent's
// start, when the EndpointSlices are read before the pods, each of a
// Service's n pods rebuilt it in turn: n rebuilds of n endpoints (2,000
// pods took 9 s, 4,000 took 45 s, while the workload directory waited
// behind them). Pending Services are rebuilt once for every pod that
// arrived meanwhile.
type podWait struct {
	mu      sync.Mutex
	byPod   map[string]map[string]struct{} // pod key → Service keys
	bySvc   map[string]map[string]struct{} // Service key → pod keys
	pending map[string]struct{}            // Services to rebuild
	running bool                           // a rebuildPending goroutine runs
}

func (w *podWait) init() {
	w.byPod = map[string]map[string]struct{}{}
	w.bySvc = map[string]map[string]struct{}{}
	w.pending = map[string]struct{}{}
}

// setLocked replaces what the Service svc waits for; w.mu is held.
func (w *podWait) setLocked(svc string, pods []string) {
	for p := range w.bySvc[svc] {
		delete(w.byPod[p], svc)
		if len(w.byPod[p]) == 0 {
			delete(w.byPod, p)
		}
	}
	delete(w.bySvc, svc)
	if len(pods) == 0 {
		return
	}
	set := make(map[string]struct{}, len(pods))
	for _, p := range pods {
		if w.byPod[p] == nil {
			w.byPod[p] = map[string]struct{}{}
		}
		w.byPod[p][svc] = struct{}{}
		set[p] = struct{}{}
	}
	w.bySvc[svc] = set
}

// arrived forgets the waits for the pod key and marks the Services that
// had them pending; start: the caller starts rebuildPending.
func (w *podWait) arrived(pod string) (start bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	svcs := w.byPod[pod]
	if len(svcs) == 0 {
		return false
	}
	delete(w.byPod, pod)
	for svc := range svcs {
		w.pending[svc] = struct{}{}
		delete(w.bySvc[svc], pod)
		if len(w.bySvc[svc]) == 0 {
			delete(w.bySvc, svc)
		}
	}
	if w.running {
		return false
	}
	w.running = true
	return true
}

// rebuildPending rebuilds the pending Services until there are none.
func (s *Source) rebuildPending() {
	for {
		s.wait.mu.Lock()
		svcs := s.wait.pending
		if len(svcs) == 0 {
			s.wait.running = false
			s.wait.mu.Unlock()
			return
		}
		s.wait.pending = map[string]struct{}{}
		s.wait.mu.Unlock()
		// Not under wait.mu: rebuildService takes it (after
		// svc.recompute).
		for svc := range svcs {
			s.rebuildService(svc)
		}
	}
}

// podHas reports whether the pod cache holds the pod key (with uid, when
// set) with the address addr.
func (s *Source) podHas(key string, uid types.UID, addr netip.Addr) bool {
	obj, ok, _ := s.allPods.GetStore().GetByKey(key)
	if !ok {
		return false
	}
	p, ok := obj.(*corev1.Pod)
	if !ok || (uid != "" && p.UID != uid) {
		return false
	}
	return slices.Contains(podIPs(p), addr)
}

// knownPods is the podKnown of one rebuild, and the keys of the pods it
// answered false for. Each endpoint is asked once per Service port: the
// answer is remembered (the reference is the cached slice's, so its
// pointer names the endpoint).
func (s *Source) knownPods() (podKnown, *[]string) {
	var missing []string
	type asked struct {
		ref  *corev1.ObjectReference
		addr netip.Addr
	}
	answers := map[asked]bool{}
	return func(ns string, ref *corev1.ObjectReference, addr netip.Addr) bool {
		if v, ok := answers[asked{ref, addr}]; ok {
			return v
		}
		if ref.Namespace != "" {
			ns = ref.Namespace
		}
		key := ns + "/" + ref.Name
		v := s.podHas(key, ref.UID, addr)
		if !v {
			missing = append(missing, key)
		}
		answers[asked{ref, addr}] = v
		return v
	}, &missing
}

// podArrived has the Services that left out an endpoint of this pod,
// because the cache lacked it, rebuilt (see podWait). The informer has
// stored the pod before its handlers run, so a rebuild from here on sees
// it.
func (s *Source) podArrived(obj any) {
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return
	}
	if s.wait.arrived(p.Namespace + "/" + p.Name) {
		go s.rebuildPending()
	}
}
