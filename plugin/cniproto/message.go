package cniproto

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strings"

	"github.com/ambit-mesh/ambit/plugin/redirectspec"
)

// Version is the protocol version this build's plugin speaks. A peer
// speaking a version outside MinVersion..Version is refused with an error
// naming both.
//
// Version 2: the agent installs, verifies and removes the redirection
// itself, in the netns whose fd it receives (add, check, and del while
// the netns exists), and the plugin links no rule code. Version 1: the
// agent only decides and the plugin installs. An agent answers in the
// request's version, so a version 1 plugin still on disk during an
// upgrade keeps working.
//
// Version 3: requests may name the CNI network (Request.Network, the
// conflist's "name"), so the agent can tell one network's GC from
// another's; otherwise as version 2. A version 3 request was the only
// way to add a field: every agent decodes strictly (unknown fields are
// refused), and an agent older than this refuses version 3 with an
// answer in its own version, which tells the plugin to ask again in
// version 2 (AgentOlder).
const Version = 3

// MinVersion is the oldest request version the agent still serves.
const MinVersion = 1

// GCVersion is the version ambit-cni sends gc requests in: gc has not
// changed since version 1, so an agent of either version serves it (a
// runtime's GC is not refused during an upgrade or a rollback).
const GCVersion = 1

// NetworkVersion is the first version whose requests may carry
// Request.Network.
const NetworkVersion = 3

// MaxMessageSize bounds every response and every request except gc.
// An add, del or check request is a few hundred bytes (its fields are
// bounded by Validate), so anything larger is refused, even though the
// agent would read up to MaxRequestSize.
const MaxMessageSize = 64 << 10

// MaxRequestSize bounds a gc request, the only message that grows with
// the node: it lists every attachment the runtime still has. A
// containerd sandbox ID is 64 hex characters, so one entry costs ~60-100
// bytes of JSON and 64 KiB held only ~650 of them, fewer than a large
// node runs. MaxAttachments entries of 64-hex IDs take ~300-400 KiB; the
// bound leaves room for longer IDs. The agent allocates what each
// datagram needs (it learns the size before reading), not this bound.
const MaxRequestSize = 1 << 20

// maxRequestSize is the largest accepted request for op.
func maxRequestSize(op Op) int {
	if op == OpGC {
		return MaxRequestSize
	}
	return MaxMessageSize
}

// Op is what the plugin asks for.
type Op string

const (
	// OpAdd: a pod sandbox was created; decide, serve the pod and
	// (version 2) install its redirection before answering enroll. The
	// request carries the netns fd.
	OpAdd Op = "add"
	// OpDel: the sandbox is going away; forget the pod. Version 2
	// carries the netns fd while the netns still exists, and the agent
	// removes the redirection from it; version 1 carries none.
	OpDel Op = "del"
	// OpCheck: is this pod still expected to be enrolled? Carries the fd.
	// The agent answers like OpAdd without changing the decision; version
	// 2: it also verifies the rules in the netns (none for a skipped pod)
	// and answers an error with CodeCheck when they differ. Version 1:
	// the plugin verifies.
	OpCheck Op = "check"
	// OpGC: CNI GC. Request.Valid lists every attachment the runtime
	// still knows; the agent may forget pods not listed. No pod, no fd.
	// With Request.Network (version 3) the list is that network's
	// attachments only (CNI 1.1: a runtime GCs each network
	// configuration on its own), and the agent forgets only what it
	// knows to be of that network. Without, it is the node's whole list.
	OpGC Op = "gc"
)

// MaxAttachments bounds Request.Valid: nodes run hundreds of sandboxes
// (110 pods by default, 250+ with prefix delegation or on large
// machines, plus non-Kubernetes sandboxes), so 4096 leaves a wide margin
// while keeping a gc request within MaxRequestSize.
const MaxAttachments = 4096

// Attachment is one (container, interface) the runtime still uses.
type Attachment struct {
	ContainerID string `json:"containerID"`
	IfName      string `json:"ifName,omitempty"`
}

// Pod identifies a sandbox as the runtime described it to the plugin.
type Pod struct {
	Namespace   string `json:"namespace"`
	Name        string `json:"name"`
	UID         string `json:"uid,omitempty"`
	ContainerID string `json:"containerID"`
	// Netns is the runtime's netns path, for logs and re-adoption; the
	// agent trusts the fd, not this path.
	Netns  string `json:"netns,omitempty"`
	IfName string `json:"ifName,omitempty"`
	// IPs are the pod addresses from prevResult, known before the API
	// server has them.
	IPs []netip.Prefix `json:"ips,omitempty"`
}

// Request is the plugin's single message.
type Request struct {
	Version int `json:"version"`
	Op      Op  `json:"op"`
	Pod     Pod `json:"pod"`
	// Valid is set for OpGC only.
	Valid []Attachment `json:"valid,omitempty"`
	// RuleBackend is the conflist's ruleBackend override (version 2, add
	// and check; empty = the agent's own choice).
	RuleBackend redirectspec.Backend `json:"ruleBackend,omitempty"`
	// Network is the CNI network's name (the conflist's "name"), version
	// 3, any op; empty = unknown (an older plugin). Last in the struct,
	// so appendRequest writes it last, as json.Marshal does.
	Network string `json:"network,omitempty"`
}

// Decision is the agent's verdict for a pod.
type Decision string

const (
	// Enroll: the pod is in the mesh. Version 2: its redirection is
	// installed (add) or verified (check), Response.Redirect says what it
	// is. Version 1: the plugin installs Response.Redirect.
	Enroll Decision = "enroll"
	// Skip: leave the pod alone.
	Skip Decision = "skip"
)

// Response is the agent's single reply.
type Response struct {
	Version  int      `json:"version"`
	Decision Decision `json:"decision,omitempty"`
	// Redirect is set when Decision is Enroll.
	Redirect *redirectspec.Spec `json:"redirect,omitempty"`
	// Error is set when the agent could not serve the request. It is
	// written for the operator who reads it in kubelet's events.
	Error string `json:"error,omitempty"`
	// Retryable marks errors that may clear by themselves (certificate not
	// yet issued, cache warming); the plugin reports them as CNI "try
	// again later" (code 11).
	Retryable bool `json:"retryable,omitempty"`
	// Code is the CNI error code for Error when the agent knows a more
	// precise one than "the agent refused" (CodeRedirect, CodeCheck,
	// CodeIO); 0 = the plugin decides. Version 2.
	Code uint `json:"code,omitempty"`
}

// Error codes an agent may set in Response.Code. 100-199 are ambit-cni's
// own (the CNI spec reserves 0-99 for its well-known errors).
const (
	// CodeIO is the spec's "I/O failure" (removing the redirection).
	CodeIO uint = 5
	// CodeRefused: the agent answered with a (non-retryable) error.
	CodeRefused uint = 100
	// CodeProtocol: the agent's answer was malformed or the exchange
	// broke mid-way (set by the plugin, never by the agent).
	CodeProtocol uint = 101
	// CodeRedirect: installing the redirection failed; nothing of it is
	// left in the netns.
	CodeRedirect uint = 102
	// CodeCheck: CHECK found the redirection missing or different.
	CodeCheck uint = 103
	// CodePortConflict: the pod declares (or an app of it listens on) a
	// port the agent listens on in every enrolled pod; the message names
	// the pod, the port and the ways out. Retrying does not help.
	CodePortConflict uint = 104
)

// Validate reports the first problem with a request.
func (r *Request) Validate() error {
	if r.Version < MinVersion || r.Version > Version {
		return fmt.Errorf("protocol version %d not supported (this side speaks %d to %d): upgrade ambit-cni and ambit-agent together", r.Version, MinVersion, Version)
	}
	if r.RuleBackend != "" {
		if r.Version < 2 {
			return errors.New("ruleBackend needs protocol version 2")
		}
		if _, err := redirectspec.ParseBackend(string(r.RuleBackend)); err != nil {
			return fmt.Errorf("request ruleBackend: %w", err)
		}
	}
	if r.Network != "" {
		if r.Version < NetworkVersion {
			return fmt.Errorf("request network needs protocol version %d", NetworkVersion)
		}
		if err := CheckNetworkName(r.Network); err != nil {
			return fmt.Errorf("request network: %w", err)
		}
	}
	switch r.Op {
	case OpAdd, OpCheck, OpDel:
		if len(r.Valid) > 0 {
			return fmt.Errorf("%s request carries a GC attachment list", r.Op)
		}
	case OpGC:
		return r.validateGC()
	case "":
		return errors.New("request has no op")
	default:
		return fmt.Errorf("unknown op %q (want add, del, check or gc)", r.Op)
	}
	if r.Pod.ContainerID == "" {
		return errors.New("request pod.containerID is empty")
	}
	if err := checkName("pod.namespace", r.Pod.Namespace, 253); err != nil {
		return err
	}
	if err := checkName("pod.name", r.Pod.Name, 253); err != nil {
		return err
	}
	if len(r.Pod.UID) > 128 || len(r.Pod.ContainerID) > 256 || len(r.Pod.Netns) > 4096 || len(r.Pod.IfName) > 15 {
		return errors.New("request pod field too long (uid ≤128, containerID ≤256, netns ≤4096, ifName ≤15)")
	}
	if len(r.Pod.IPs) > 16 {
		return fmt.Errorf("request carries %d pod IPs, at most 16 are accepted", len(r.Pod.IPs))
	}
	for i, p := range r.Pod.IPs {
		if !p.IsValid() {
			return fmt.Errorf("request pod.ips[%d] is not a valid address", i)
		}
	}
	return nil
}

func (r *Request) validateGC() error {
	if r.Pod.Namespace != "" || r.Pod.Name != "" || r.Pod.ContainerID != "" || len(r.Pod.IPs) > 0 {
		return errors.New("gc request must not name a pod")
	}
	if len(r.Valid) > MaxAttachments {
		return fmt.Errorf("gc request lists %d attachments, at most %d are accepted", len(r.Valid), MaxAttachments)
	}
	for i, a := range r.Valid {
		if a.ContainerID == "" || len(a.ContainerID) > 256 || len(a.IfName) > 15 {
			return fmt.Errorf("gc request valid[%d]: containerID must be 1-256 bytes and ifName at most 15", i)
		}
	}
	return nil
}

// Validate reports the first problem with a response.
// A response may carry any version this package knows; Call also
// requires the request's.
func (r *Response) Validate() error {
	if r.Version < MinVersion || r.Version > Version {
		return fmt.Errorf("agent speaks protocol version %d, ambit-cni speaks %d: upgrade both together", r.Version, Version)
	}
	if r.Code != 0 && r.Error == "" {
		return fmt.Errorf("agent answer carries error code %d without an error", r.Code)
	}
	if r.Code != 0 && r.Code != CodeIO && (r.Code < 100 || r.Code > 199 || r.Code == CodeProtocol) {
		return fmt.Errorf("agent answer carries error code %d, which is not one an agent may set (5, or 100-199 but 101)", r.Code)
	}
	if r.Error != "" {
		return nil
	}
	switch r.Decision {
	case Enroll:
		if r.Redirect == nil {
			return errors.New("agent answered enroll without redirect parameters")
		}
		if err := r.Redirect.Validate(); err != nil {
			return fmt.Errorf("agent sent bad redirect parameters: %w", err)
		}
	case Skip:
	case "":
		return errors.New("agent answer has neither a decision nor an error")
	default:
		return fmt.Errorf("agent answered unknown decision %q", r.Decision)
	}
	return nil
}

// MaxNetworkName bounds Request.Network. The CNI spec sets no length;
// conflist names are short ("k8s-pod-network", "cbr0", a
// NetworkAttachmentDefinition's name), and a bound keeps every add, del
// and check request within MaxMessageSize.
const MaxNetworkName = 253

// CheckNetworkName reports whether name is a CNI network name as the
// spec defines it (and libcni enforces before running a plugin): an
// ASCII letter or digit, then letters, digits, '_', '.' or '-'.
func CheckNetworkName(name string) error {
	if name == "" {
		return errors.New("network name is empty")
	}
	if len(name) > MaxNetworkName {
		return fmt.Errorf("network name is longer than %d bytes", MaxNetworkName)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		alnum := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
		if !alnum && (i == 0 || c != '_' && c != '.' && c != '-') {
			return fmt.Errorf("network name %q is not a CNI network name (a letter or digit, then letters, digits, '_', '.' or '-')", name)
		}
	}
	return nil
}

// AgentOlder tells whether resp is an agent's refusal of req's version
// because it speaks only older ones: such an agent answers in its own
// version (it could not read the request's), so an error in a version
// below the request's says so. The plugin then asks again in an older
// version (without what only the newer one carries) or gives up.
func AgentOlder(req *Request, resp *Response) bool {
	return resp.Error != "" && resp.Version < req.Version
}

func checkName(field, v string, max int) error {
	if v == "" {
		return fmt.Errorf("request %s is empty", field)
	}
	if len(v) > max {
		return fmt.Errorf("request %s is longer than %d bytes", field, max)
	}
	if strings.ContainsAny(v, "/\x00\n") {
		return fmt.Errorf("request %s %q contains '/', NUL or newline", field, v)
	}
	return nil
}

// DecodeRequest parses and validates one request datagram. A gc request
// may be up to MaxRequestSize bytes, any other up to MaxMessageSize.
func DecodeRequest(b []byte) (*Request, error) {
	var r Request
	if err := decodeStrictN(b, &r, MaxRequestSize); err != nil {
		if len(b) > MaxMessageSize && len(b) <= MaxRequestSize {
			// Only a gc may be this large, and this is not one: say both.
			return nil, fmt.Errorf("malformed request of %d bytes, which exceeds the %d byte limit of any request but gc: %w", len(b), MaxMessageSize, err)
		}
		return nil, fmt.Errorf("malformed request: %w", err)
	}
	// The op is known only after decoding; checked before Validate so an
	// oversized add is refused for its size whatever else is wrong.
	if max := maxRequestSize(r.Op); len(b) > max {
		return nil, fmt.Errorf("%q request of %d bytes exceeds the %d byte limit (only gc requests may reach %d)", r.Op, len(b), max, MaxRequestSize)
	}
	if err := r.Validate(); err != nil {
		return nil, err
	}
	return &r, nil
}

// DecodeResponse parses and validates one response datagram.
func DecodeResponse(b []byte) (*Response, error) {
	var r Response
	if err := decodeStrict(b, &r); err != nil {
		return nil, fmt.Errorf("malformed agent response: %w", err)
	}
	if err := r.Validate(); err != nil {
		return nil, err
	}
	return &r, nil
}

func decodeStrict(b []byte, v any) error { return decodeStrictN(b, v, MaxMessageSize) }

func newEncoder(w io.Writer) *json.Encoder {
	e := json.NewEncoder(w)
	e.SetIndent("", "  ")
	return e
}

func decodeStrictN(b []byte, v any, max int) error {
	if len(b) == 0 {
		return errors.New("empty message")
	}
	if len(b) > max {
		return fmt.Errorf("message of %d bytes exceeds the %d byte limit", len(b), max)
	}
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	if err := d.Decode(v); err != nil {
		return err
	}
	if d.More() {
		return errors.New("trailing data after the JSON object")
	}
	return nil
}

// encode marshals a response (or anything bounded by MaxMessageSize).
func encode(v any) ([]byte, error) { return encodeN(v, MaxMessageSize) }

func encodeN(v any, max int) ([]byte, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	if len(b) > max {
		return nil, fmt.Errorf("message of %d bytes exceeds the %d byte limit", len(b), max)
	}
	return b, nil
}

// encodeRequest marshals a request within its op's bound; a gc request
// too large says how many attachments it lists.
func encodeRequest(r *Request) ([]byte, error) {
	b := appendRequest(make([]byte, 0, 512), r)
	if max := maxRequestSize(r.Op); len(b) > max {
		err := fmt.Errorf("message of %d bytes exceeds the %d byte limit", len(b), max)
		if r.Op == OpGC {
			return nil, fmt.Errorf("gc request listing %d attachments: %w", len(r.Valid), err)
		}
		return nil, err
	}
	return b, nil
}
