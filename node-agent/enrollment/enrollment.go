package enrollment

import (
	"github.com/ambit-mesh/ambit/node-agent/cluster"
)

// Label values.
const (
	Ambient = "ambient"
	None    = "none"
)

// OwnLabelKey is the project's own enrollment label (the default of
// config.DefaultEnrollLabel). Ambit's own pods (the CA; the agent) carry
// OwnLabelKey=none in every manifest, so its "none" on a pod opts out
// whatever LabelKey is configured. With Istio's key, the CA pod of a
// namespace labelled ambient was enrolled, its inbound captured: the
// agents' CSRs (from the host network, outside the mesh: they have no
// certificate yet) then meet the mesh's inbound mode, refused where it
// is strict.
const OwnLabelKey = "ambit.dev/dataplane-mode"

// Reasons a decision gives; stable strings, used in logs and metrics.
const (
	ReasonHostNetwork      = "host-network"
	ReasonTerminal         = "terminal"
	ReasonExcluded         = "excluded-namespace"
	ReasonPodOptOut        = "pod-label-none"
	ReasonPodOptIn         = "pod-label-ambient"
	ReasonNamespaceOptIn   = "namespace-label-ambient"
	ReasonNotLabelled      = "not-labelled"
	ReasonUnknownNamespace = "unknown-namespace"
)

// Policy holds the knobs of the decision.
type Policy struct {
	// LabelKey is the enrollment label, e.g. ambit.dev/dataplane-mode.
	LabelKey string
	excluded map[string]bool
}

// NewPolicy builds a policy; excluded lists namespaces never enrolled.
func NewPolicy(labelKey string, excluded []string) Policy {
	p := Policy{LabelKey: labelKey, excluded: make(map[string]bool, len(excluded))}
	for _, ns := range excluded {
		p.excluded[ns] = true
	}
	return p
}

// Decision is the verdict with the reason that produced it.
type Decision struct {
	Enroll bool
	Reason string
}

// Decide applies the precedence in the package doc. ns may be nil when the
// namespace is unknown: only a pod label can then enroll the pod.
func (p Policy) Decide(pod cluster.Pod, ns *cluster.Namespace) Decision {
	switch {
	case pod.HostNetwork:
		return Decision{false, ReasonHostNetwork}
	case pod.Terminal:
		return Decision{false, ReasonTerminal}
	case p.excluded[pod.Namespace]:
		return Decision{false, ReasonExcluded}
	case pod.Labels[OwnLabelKey] == None:
		return Decision{false, ReasonPodOptOut}
	}
	switch pod.Labels[p.LabelKey] {
	case None:
		return Decision{false, ReasonPodOptOut}
	case Ambient:
		return Decision{true, ReasonPodOptIn}
	}
	if ns == nil {
		return Decision{false, ReasonUnknownNamespace}
	}
	if ns.Labels[p.LabelKey] == Ambient {
		return Decision{true, ReasonNamespaceOptIn}
	}
	return Decision{false, ReasonNotLabelled}
}

// NamespaceEnrolled reports whether pods without a pod label are enrolled
// in ns: what the enrollment snapshot tells the plugin.
func (p Policy) NamespaceEnrolled(ns cluster.Namespace) bool {
	return !p.excluded[ns.Name] && ns.Labels[p.LabelKey] == Ambient
}

// Excluded reports whether ns is never enrolled.
func (p Policy) Excluded(ns string) bool { return p.excluded[ns] }
