package admin

import (
	"net/netip"
	"time"
)

// Version is the version of the Status document. A field is only ever
// added within a version; one renamed, removed or changed in meaning
// makes the next.
const Version = 1

// Status is everything `ambit-agent status` shows about one agent: the
// answer to GET /v1/status, and the JSON `-o json` prints (one object
// per agent, as a JSON array with --all).
type Status struct {
	Version int   `json:"version"`
	Agent   Agent `json:"agent"`
	// Pods are the pods of the node this agent serves or should serve,
	// sorted by namespace and name.
	Pods []Pod `json:"pods"`
	// Certificates are the workload certificates the agent holds, one per
	// identity, sorted.
	Certificates []Certificate `json:"certificates"`
	// TrustBundle is the roots the agent's peers' certificates are
	// checked against.
	TrustBundle []CertRef   `json:"trustBundle"`
	Connections Connections `json:"connections"`
}

// Agent is the process that answered.
type Agent struct {
	// Instance is its entry in the node's agent registry (start time and
	// a random suffix; <stateDir>/instances).
	Instance string `json:"instance"`
	PID      int    `json:"pid"`
	Node     string `json:"node"`
	// Source is where it learns the cluster: kubernetes or inventory.
	Source  string    `json:"source"`
	Started time.Time `json:"started"`
	// Now is its clock when it answered: every age shown is against it.
	Now time.Time `json:"now"`
	// Ready: it re-adopted its pods and serves the plugin.
	Ready bool `json:"ready"`
	// Stopping: it was told to stop and is draining its connections.
	Stopping bool `json:"stopping"`
}

// Pod states.
const (
	// StateEnrolled: listeners open in the pod, the tunnel serves it.
	StateEnrolled = "enrolled"
	// StatePending: the pod should be enrolled and is not (yet): no
	// sandbox or IP yet, or its enrollment has not run; Reason says which.
	StatePending = "pending"
	// StateFailed: its last enrollment failed; Reason and Message say
	// why (the ambit.dev/redirection annotation says "failed").
	StateFailed = "failed"
)

// Pod is one pod as its agent sees it.
type Pod struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	UID       string `json:"uid,omitempty"`
	// ContainerID is the sandbox the agent serves (the runtime's ID; a
	// pod the agent enrolled while running, without an ADD, has
	// "found:<namespace>/<name>").
	ContainerID string       `json:"containerID,omitempty"`
	IPs         []netip.Addr `json:"ips"`
	// State is StateEnrolled, StatePending or StateFailed.
	State string `json:"state"`
	// Reason is a short word for a pending or failed pod (the Kubernetes
	// Event reason of a failure: PortConflict, EnrollmentFailed, ...),
	// Message the whole error.
	Reason  string `json:"reason,omitempty"`
	Message string `json:"message,omitempty"`
	// Since is when the pod was enrolled (its record), or failed.
	Since time.Time `json:"since,omitzero"`
	// Backend is the rule engine holding its redirection (nftables,
	// iptables-legacy, iptables-nft).
	Backend string `json:"backend,omitempty"`
	// Listeners are the ports the agent listens on in the pod's netns
	// (15001 outbound, 15006 inbound plaintext, 15008 HBONE).
	Listeners []uint16 `json:"listeners,omitempty"`
	// Rules is the last look at the pod's redirection; nil: none yet
	// (a plugin of protocol version 1 installs the rules itself).
	Rules *RuleCheck `json:"rules,omitempty"`
	// Identity is the SPIFFE ID the pod is served as, CertNotAfter the
	// end of its certificate's validity (zero: none fetched yet).
	Identity     string    `json:"identity,omitempty"`
	CertNotAfter time.Time `json:"certNotAfter,omitzero"`
	// Connections: nil when the pod is not served (or the tunnel does
	// not count).
	Connections *PodConnections `json:"connections,omitempty"`
}

// Rule check results.
const (
	// RulesOK: found right (a check), or installed.
	RulesOK = "ok"
	// RulesRepaired: found missing or different, and installed again;
	// Problem says what differed.
	RulesRepaired = "repaired"
	// RulesFailed: found wrong and could not be repaired, or could not
	// be read; Problem says why.
	RulesFailed = "failed"
)

// RuleCheck is the last check (or install) of a pod's redirection: at
// ADD, then every ruleCheckInterval (default 1 m).
type RuleCheck struct {
	At      time.Time `json:"at"`
	Result  string    `json:"result"`
	Problem string    `json:"problem,omitempty"`
}

// PodConnections are a served pod's connections now. The counts are read
// one after the other, not as one atomic picture.
type PodConnections struct {
	// InboundHBONE and InboundPlaintext: established inbound connections
	// (authorized, relaying to the app), over HBONE (15008) and in
	// plaintext (15006, permissive mode).
	InboundHBONE     int `json:"inboundHBONE"`
	InboundPlaintext int `json:"inboundPlaintext"`
	// OutboundHBONE: streams open on the pod's pooled HBONE connections.
	OutboundHBONE int `json:"outboundHBONE"`
	// OutboundPassthrough is held less the three counts above: outbound
	// connections to destinations outside the mesh, plus any connection
	// still being set up. Derived, so that the data path counts nothing
	// more for this view.
	OutboundPassthrough int `json:"outboundPassthrough"`
	// Held: every connection the pod holds against the agent's
	// connection budget (maxConnections), in and out, established or not.
	Held int `json:"held"`
	// HBONEConnectionsIn/Out: the mTLS connections carrying the HBONE
	// streams, accepted on the pod's 15008 and in its outbound pool.
	HBONEConnectionsIn  int `json:"hboneConnectionsIn"`
	HBONEConnectionsOut int `json:"hboneConnectionsOut"`
}

// In is every inbound connection counted.
func (c PodConnections) In() int { return c.InboundHBONE + c.InboundPlaintext }

// Out is every outbound connection counted.
func (c PodConnections) Out() int { return c.OutboundHBONE + c.OutboundPassthrough }

func (c *PodConnections) add(o PodConnections) {
	c.InboundHBONE += o.InboundHBONE
	c.InboundPlaintext += o.InboundPlaintext
	c.OutboundHBONE += o.OutboundHBONE
	c.OutboundPassthrough += o.OutboundPassthrough
	c.Held += o.Held
	c.HBONEConnectionsIn += o.HBONEConnectionsIn
	c.HBONEConnectionsOut += o.HBONEConnectionsOut
}

// Connections are the agent's totals.
type Connections struct {
	// Pods is the sum of the pods' counts.
	Pods PodConnections `json:"pods"`
	// Held is every connection the agent holds (pods still draining
	// included), Budget its connection budget (0: none).
	Held   int `json:"held"`
	Budget int `json:"budget"`
}

// Certificate is a workload certificate the agent holds. Public parts
// only: the private key is never in this document.
type Certificate struct {
	Identity string `json:"identity"`
	// Serial (hex), validity and issuer of the current certificate; empty
	// before the first fetch succeeded.
	Serial    string    `json:"serial,omitempty"`
	NotBefore time.Time `json:"notBefore,omitzero"`
	NotAfter  time.Time `json:"notAfter,omitzero"`
	Issuer    string    `json:"issuer,omitempty"`
	// Intermediates sent with it, if any.
	Intermediates []CertRef `json:"intermediates,omitempty"`
	// Pods: enrolled pods of the node using the identity.
	Pods int `json:"pods"`
	// NextFetch is when it is rotated (half its life, jittered) or, after
	// a failure, retried; Fetching: a fetch runs now.
	NextFetch time.Time `json:"nextFetch,omitzero"`
	Fetching  bool      `json:"fetching,omitempty"`
	// Failures: fetches failed in a row; LastError, LastFailure: the last.
	Failures    int       `json:"failures,omitempty"`
	LastError   string    `json:"lastError,omitempty"`
	LastFailure time.Time `json:"lastFailure,omitzero"`
}

// CertRef names a CA certificate (a root of the trust bundle, an
// intermediate).
type CertRef struct {
	Subject string `json:"subject"`
	// SHA256 is the fingerprint of its DER, hex: what
	// `openssl x509 -fingerprint -sha256` prints, without the colons.
	SHA256    string    `json:"sha256"`
	NotBefore time.Time `json:"notBefore"`
	NotAfter  time.Time `json:"notAfter"`
}
