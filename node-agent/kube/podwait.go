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
type podWait struct {
	mu    sync.Mutex
	byPod map[string]map[string]struct{} // pod key → Service keys
	bySvc map[string][]string            // Service key → pod keys
}

func (w *podWait) init() {
	w.byPod = map[string]map[string]struct{}{}
	w.bySvc = map[string][]string{}
}

// setLocked replaces what the Service svc waits for; w.mu is held.
func (w *podWait) setLocked(svc string, pods []string) {
	for _, p := range w.bySvc[svc] {
		delete(w.byPod[p], svc)
		if len(w.byPod[p]) == 0 {
			delete(w.byPod, p)
		}
	}
	delete(w.bySvc, svc)
	if len(pods) == 0 {
		return
	}
	slices.Sort(pods)
	pods = slices.Compact(pods)
	for _, p := range pods {
		if w.byPod[p] == nil {
			w.byPod[p] = map[string]struct{}{}
		}
		w.byPod[p][svc] = struct{}{}
	}
	w.bySvc[svc] = pods
}

// take returns, and forgets, the Services waiting for the pod key.
func (w *podWait) take(pod string) []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	svcs := w.byPod[pod]
	if len(svcs) == 0 {
		return nil
	}
	delete(w.byPod, pod)
	out := make([]string, 0, len(svcs))
	for svc := range svcs {
		out = append(out, svc)
		rest := slices.DeleteFunc(w.bySvc[svc], func(p string) bool { return p == pod })
		if len(rest) == 0 {
			delete(w.bySvc, svc)
		} else {
			w.bySvc[svc] = rest
		}
	}
	return out
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

// podArrived rebuilds the Services that left out an endpoint of this pod
// because the cache lacked it. The informer has stored the pod before
// its handlers run, so a rebuild from here sees it.
func (s *Source) podArrived(obj any) {
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return
	}
	for _, svc := range s.wait.take(p.Namespace + "/" + p.Name) {
		s.rebuildService(svc)
	}
}
