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
	ReasonIstioSidecar     = "istio-sidecar"
	ReasonIstioAmbient     = "istio-ambient"
)

// Pods Istio already serves, by the annotations Istio itself writes. The
// webhook's is on the pod from its creation, so before any ADD. istio-cni
// writes its own once its rules are in: the pods it has been serving (a
// namespace being moved to Ambit, an enrollLabel shared with Istio) carry
// it already; a new pod that both plugins take in one chain can reach our
// decision before it, and is declined when it arrives (live enrollment).
const (
	// IstioSidecarAnnotation is set by Istio's injection webhook on
	// every pod it gave an istio-proxy; istio-cni skips such pods for
	// ambient on its presence alone, whatever the value. Enrolled, the
	// pod's Envoy cannot bind 15001/15006 (our listeners hold them): it
	// never becomes ready, and its traffic would be captured twice.
	IstioSidecarAnnotation = "sidecar.istio.io/status"
	// IstioRedirectionAnnotation is istio-cni's status: "enabled" once
	// its in-pod rules are installed and ztunnel serves the pod,
	// "pending" when the rules are installed and ztunnel has not taken
	// the pod yet (istio-cni retries). Both mean Istio's capture is in
	// the netns; enrolling too would add a second one. Istio removes it
	// when it unenrolls the pod, and leaves it, with its rules, on an
	// uninstall (istio#49067). Older Istio read "disabled" as a pod's
	// opt-out of its ambient mesh: no capture, so no bar to ours.
	IstioRedirectionAnnotation = "ambient.istio.io/redirection"
)

// Annotations are the pod annotations Decide reads: a source that trims
// pods (node-agent/kube) must keep them.
var Annotations = []string{IstioSidecarAnnotation, IstioRedirectionAnnotation}

// istioServed reports why Istio already serves pod, or "".
func istioServed(pod cluster.Pod) string {
	if _, ok := pod.Annotations[IstioSidecarAnnotation]; ok {
		return ReasonIstioSidecar
	}
	switch pod.Annotations[IstioRedirectionAnnotation] {
	case "enabled", "pending":
		return ReasonIstioAmbient
	}
	return ""
}

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
	}
	if r := istioServed(pod); r != "" {
		return Decision{false, r}
	}
	switch {
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
