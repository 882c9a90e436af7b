package kube

import (
	"sort"

	corev1 "k8s.io/api/core/v1"

	"github.com/ambit-mesh/ambit/node-agent/cluster"
)

// LabelDecider is the contract's enrollment rule, for callers that have no
// rule of their own: a pod label key=none opts out, key=ambient opts in,
// otherwise the namespace label key=ambient enrolls; excluded namespaces
// never enroll. Host-network and terminal pods never enroll.
func LabelDecider(key string, excluded ...string) func(cluster.Pod, cluster.Namespace) bool {
	ex := map[string]bool{}
	for _, n := range excluded {
		ex[n] = true
	}
	return func(p cluster.Pod, ns cluster.Namespace) bool {
		if ex[ns.Name] || p.HostNetwork || p.Terminal {
			return false
		}
		switch p.Labels[key] {
		case "none":
			return false
		case "ambient":
			return true
		}
		return ns.Labels[key] == "ambient"
	}
}

// WouldEnroll applies the enrollment rule to pod with its namespace from the
// cache (a namespace not yet seen has no labels).
func (s *Source) WouldEnroll(p cluster.Pod) bool {
	ns, ok := s.Namespace(p.Namespace)
	if !ok {
		ns = cluster.Namespace{Name: p.Namespace}
	}
	return s.decide(p, ns)
}

// namespaceLevel says whether the namespace enrolls its pods by itself: the
// rule applied to a pod with no labels in it.
func (s *Source) namespaceLevel(ns cluster.Namespace) bool {
	return s.decide(cluster.Pod{Namespace: ns.Name, Name: "", Labels: nil}, ns)
}

// AmbientNamespaces lists, sorted, the namespaces whose labels enroll
// their pods (the rule applied to an unlabeled pod says yes). The agent
// writes it into the enrollment snapshot the CNI plugin reads while the
// agent is down.
func (s *Source) AmbientNamespaces() []string {
	var out []string
	for _, o := range s.namespaces.GetStore().List() {
		n, ok := o.(*corev1.Namespace)
		if ok && s.namespaceLevel(toNamespace(n)) {
			out = append(out, n.Name)
		}
	}
	sort.Strings(out)
	return out
}

// OptInNamespaces lists, sorted, the namespaces that are not ambient
// themselves but hold at least one (non-terminal, pod-network) pod anywhere
// in the cluster that the rule enrolls because of its own labels. The CNI
// plugin sees no labels, so while the agent is down it must fail closed for
// every new pod of such a namespace. Cost: one pass over the trimmed
// cluster-wide pod cache; call it when building a snapshot, not per packet.
func (s *Source) OptInNamespaces() []string {
	level := map[string]bool{}
	nsOf := map[string]cluster.Namespace{}
	set := map[string]bool{}
	for _, o := range s.allPods.GetStore().List() {
		p, ok := o.(*corev1.Pod)
		if !ok || set[p.Namespace] {
			continue
		}
		cp := toPod(p)
		if cp.HostNetwork || cp.Terminal {
			continue
		}
		ns, seen := nsOf[p.Namespace]
		if !seen {
			if n, ok := s.Namespace(p.Namespace); ok {
				ns = n
			} else {
				ns = cluster.Namespace{Name: p.Namespace}
			}
			nsOf[p.Namespace] = ns
			level[p.Namespace] = s.namespaceLevel(ns)
		}
		if !level[p.Namespace] && s.decide(cp, ns) {
			set[p.Namespace] = true
		}
	}
	out := make([]string, 0, len(set))
	for n := range set {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}
