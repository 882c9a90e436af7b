package cluster

import (
	"context"
	"net/netip"

	"github.com/ambit-mesh/ambit/tunnel"
)

// MirrorAnnotation marks a static pod's mirror in the API: its value is
// the kubelet's UID of the static pod (the hash of its manifest), which
// the runtime passes to CNI as K8S_POD_UID, while the mirror object has
// a UID of its own from the API server.
const MirrorAnnotation = "kubernetes.io/config.mirror"

// SandboxUID tells whether uid, a sandbox's pod UID as the runtime gives
// it, names p: its UID, or, for a static pod's mirror, the kubelet's.
func (p Pod) SandboxUID(uid string) bool {
	return p.UID == uid || (uid != "" && p.Annotations[MirrorAnnotation] == uid)
}

// Pod is the trimmed pod the agent works with, whatever the source.
type Pod struct {
	Namespace      string
	Name           string
	UID            string
	ServiceAccount string
	NodeName       string
	Labels         map[string]string
	Annotations    map[string]string
	IPs            []netip.Addr
	HostNetwork    bool
	// Terminal: Succeeded or Failed; its IPs may already be reused.
	Terminal bool
	// ReservedPorts are the TCP containerPorts of the pod's spec (init
	// and sidecar containers included) that the agent listens on in
	// every enrolled pod (15001, 15006, 15008): only those are kept.
	ReservedPorts []DeclaredPort
}

// DeclaredPort is a containerPort of one of the pod's containers.
type DeclaredPort struct {
	Container string
	Port      uint16
}

// Namespace is the trimmed namespace.
type Namespace struct {
	Name   string
	Labels map[string]string
}

// EventKind says what changed.
type EventKind int

const (
	PodChanged EventKind = iota + 1 // added or updated (labels, IPs, phase)
	PodDeleted
	NamespaceChanged // labels changed: every pod in it may flip
	Resynced         // the source reloaded wholesale (inventory file change, relist)
)

// Event tells the agent that enrollment of some pods may have to change.
type Event struct {
	Kind      EventKind
	Namespace string
	Name      string // pod name; empty for namespace events
	UID       string
}

// View is the agent's read-only picture of the cluster, from Kubernetes
// informers or from a static inventory file. It also serves the tunnel's
// Directory (pod IP → workload, Service VIP → endpoints).
type View interface {
	tunnel.Directory

	// WaitSynced blocks until the first full picture is loaded.
	WaitSynced(ctx context.Context) error
	// Pod returns a pod. A source backed by a cache may fall back to one
	// direct read with a short timeout for a pod created a moment ago.
	Pod(ctx context.Context, namespace, name string) (Pod, bool, error)
	// Namespace returns a namespace from the cache.
	Namespace(name string) (Namespace, bool)
	// LocalPods lists the pods scheduled on this node.
	LocalPods() []Pod
	// Subscribe registers fn for change events; fn must not block.
	Subscribe(fn func(Event))
}

// StatusWriter reports enrollment status where operators look for it. The
// static source implements it as a no-op (logs only).
type StatusWriter interface {
	// SetRedirection sets the ambit.dev/redirection annotation to
	// "enabled", "pending" or "failed" ("" removes it).
	SetRedirection(ctx context.Context, pod Pod, state string) error
	// Warn records a failure event with a reason (Kubernetes Event).
	Warn(ctx context.Context, pod Pod, reason, message string) error
}
