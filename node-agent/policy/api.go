package policy

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation/field"
)

// API group and version of Ambit's policy resources.
const (
	Group   = "ambit.dev"
	Version = "v1alpha1"

	KindAuthorizationPolicy = "AuthorizationPolicy"
	KindInboundMode         = "InboundMode"
	KindPeerAuthentication  = "PeerAuthentication" // Istio's, read as InboundMode

	// DefaultRootNamespace holds mesh-wide policies of Ambit's kinds
	// (Istio's there apply to that namespace only, as in Istio).
	DefaultRootNamespace = "ambit-system"
)

// APIVersion is Group/Version as written in manifests.
const APIVersion = Group + "/" + Version

// Action of an AuthorizationPolicy.
type Action string

const (
	Allow Action = "ALLOW"
	Deny  Action = "DENY"
)

// Mode is an InboundMode's answer to plaintext.
type Mode string

const (
	// Permissive accepts plaintext (on 15006), labelled as such, and still
	// applies AuthorizationPolicy to it (with no source identity).
	Permissive Mode = "PERMISSIVE"
	// Strict refuses plaintext: only mTLS (HBONE) connections get in.
	Strict Mode = "STRICT"
)

// AuthorizationPolicy allows or denies inbound connections to the
// workloads it selects.
type AuthorizationPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   AuthorizationPolicySpec `json:"spec"`
	Status Status                  `json:"status,omitempty"`

	// problems found while decoding (unknown fields, wrong types); they
	// make the policy invalid.
	problems field.ErrorList
	// unread: a document of our group whose version or kind is unknown
	// (a typo); its spec was not read, so it is enforced as deny-all for
	// its whole namespace, never by a selector.
	unread bool
}

// AuthorizationPolicySpec is the policy proper.
type AuthorizationPolicySpec struct {
	// Selector picks the workloads in the policy's namespace (every
	// namespace for the root namespace) by label; absent or empty means
	// all workloads of the namespace.
	Selector *Selector `json:"selector,omitempty"`
	// Action defaults to ALLOW.
	Action Action `json:"action,omitempty"`
	// Rules: the policy matches when any rule matches. An ALLOW policy
	// without rules matches nothing (the workload then admits only what
	// other ALLOW policies allow); a rule without from/to matches
	// everything.
	Rules []Rule `json:"rules,omitempty"`
}

// Selector selects workloads by labels (all must be present and equal).
type Selector struct {
	MatchLabels map[string]string `json:"matchLabels,omitempty"`
}

// Rule matches when both its From and To match (absent means any).
type Rule struct {
	From *Source      `json:"from,omitempty"`
	To   *Destination `json:"to,omitempty"`
}

// Source describes the connecting peer. Every field that is set must
// match. Principals and namespaces come from the peer's mTLS identity, so a
// plaintext peer matches none of them (and every not-field).
type Source struct {
	// Principals: SPIFFE IDs with or without "spiffe://", e.g.
	// "cluster.local/ns/shop/sa/web"; "prefix*", "*suffix" and "*" (any
	// authenticated peer) are allowed.
	Principals    []string `json:"principals,omitempty"`
	NotPrincipals []string `json:"notPrincipals,omitempty"`
	// Namespaces of the peer's identity; same wildcard forms.
	Namespaces    []string `json:"namespaces,omitempty"`
	NotNamespaces []string `json:"notNamespaces,omitempty"`
	// IPBlocks: source addresses, CIDR ("10.0.0.0/8", "fd00::/8") or a
	// single address.
	IPBlocks    []string `json:"ipBlocks,omitempty"`
	NotIPBlocks []string `json:"notIpBlocks,omitempty"`
}

// Destination describes the port the peer connects to on the workload.
type Destination struct {
	Ports    []int32 `json:"ports,omitempty"`
	NotPorts []int32 `json:"notPorts,omitempty"`
}

// InboundMode sets whether the selected workloads accept plaintext.
type InboundMode struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   InboundModeSpec `json:"spec"`
	Status Status          `json:"status,omitempty"`

	problems field.ErrorList
	// inherit: an Istio PeerAuthentication that sets no mode (UNSET). It
	// sets nothing but still takes its level, as in Istio, where the
	// oldest PeerAuthentication of a level is picked before its mode is
	// read: a newer one of the same level is then ignored.
	inherit bool
}

// InboundModeSpec: the most specific InboundMode wins (workload selector,
// then namespace-wide, then namespace-wide in the root namespace, then
// PERMISSIVE); within one, a port entry beats the mode.
type InboundModeSpec struct {
	Selector *Selector `json:"selector,omitempty"`
	// Mode; empty inherits from the broader level.
	Mode Mode `json:"mode,omitempty"`
	// Ports override Mode for single workload ports.
	Ports []PortMode `json:"ports,omitempty"`
}

// PortMode is the mode of one port.
type PortMode struct {
	Port int32 `json:"port"`
	Mode Mode  `json:"mode"`
}

// Status is what the agent reports back on each object.
type Status struct {
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// Condition type and reasons reported on every policy object.
const (
	ConditionAccepted = "Accepted"

	ReasonAccepted    = "Accepted"
	ReasonInvalid     = "Invalid"
	ReasonUnsupported = "UnsupportedField"
	ReasonConflict    = "Conflict"
)
