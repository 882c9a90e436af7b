package tunnel

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"net/netip"
	"time"
)

// This file is the contract between the tunnel and whoever embeds it (the
// node agent, tests, benchmarks). The tunnel knows nothing of Kubernetes:
// it is handed listeners, a way to open sockets in the pod's network,
// identities, a directory of the mesh and an authorizer.

// Workload is a pod as the data path sees it.
type Workload struct {
	UID            string
	Namespace      string
	Name           string
	ServiceAccount string
	// Labels are the pod's labels, for policy selectors. Read-only.
	Labels map[string]string
	IPs    []netip.Addr
	// Identity is the SPIFFE ID, spiffe://<td>/ns/<ns>/sa/<sa>.
	Identity string
	// Meshed: the workload is enrolled, so its agent terminates HBONE on
	// <ip>:15008 and plaintext to it must not leave the source pod.
	Meshed bool
}

// Directory answers the data path's questions about the mesh. It must be
// safe for concurrent use and cheap: it is consulted once per connection.
type Directory interface {
	// WorkloadByIP finds the workload owning a pod IP.
	WorkloadByIP(ip netip.Addr) (Workload, bool)
	// ServiceEndpoints resolves a Service VIP and port to the ready
	// endpoints behind it, target ports already mapped (named ports
	// resolved). ok is false when vip is not a Service address.
	ServiceEndpoints(vip netip.AddrPort) (eps []netip.AddrPort, ok bool)
}

// Service is what a Service address resolves to.
type Service struct {
	// Endpoints are the usable endpoints, as ServiceEndpoints returns
	// them. Read-only.
	Endpoints []netip.AddrPort
	// Affinity is the Service port's sessionAffinity ClientIP; nil for
	// none. Read-only, and shared by every address of the port. (A
	// pointer keeps Service to four words: returned in registers, the
	// lookup of a Service without affinity costs what it did before.)
	Affinity *Affinity
}

// Affinity is sessionAffinity ClientIP: a client IP's connections to the
// Service port keep going to one endpoint while it stays usable and the
// client comes back within Timeout of its last connection.
type Affinity struct {
	Timeout time.Duration
	// Port names the Service port across all its addresses (e.g.
	// "<namespace>/<service>:<port name>"): kube-proxy keeps one
	// affinity per client and Service port, whichever address the
	// client used. Empty: each address:port on its own.
	Port string
}

// ServiceDirectory is optionally implemented by a Directory that knows
// more about a Service than its endpoints (session affinity). A
// Directory without it resolves Services with ServiceEndpoints alone.
type ServiceDirectory interface {
	// ServiceByAddr is ServiceEndpoints with the rest of the Service.
	ServiceByAddr(vip netip.AddrPort) (Service, bool)
}

// Certificates supplies workload certificates and the trust bundle. Both
// change over time (rotation); the tunnel asks at every handshake.
type Certificates interface {
	// Certificate returns the current certificate of a local workload
	// identity, fetching it if needed.
	Certificate(ctx context.Context, identity string) (*tls.Certificate, error)
	// Roots is the current trust bundle (possibly old and new roots during
	// a root rotation).
	Roots() *x509.CertPool
	// TrustDomain is the mesh's trust domain; peers of another domain are
	// refused.
	TrustDomain() string
}

// ConnInfo describes an inbound connection for authorization.
type ConnInfo struct {
	// SrcIdentity is the peer's SPIFFE ID; empty for plaintext.
	SrcIdentity string
	SrcIP       netip.Addr
	Dst         Workload
	DstPort     uint16
	// Plaintext is true for connections arriving on the inbound
	// plaintext port (15006) rather than over HBONE.
	Plaintext bool
}

// Verdict is the outcome of authorization.
type Verdict struct {
	Allow bool
	// Policy names the policy that decided ("" when none applied), Reason
	// says why, both for logs and metrics.
	Policy string
	Reason string
}

// Authorizer decides inbound connections at setup. When its policies
// change, the embedder calls Proxy.Reauthorize so live connections are
// checked again.
type Authorizer interface {
	Authorize(c ConnInfo) Verdict
}

// PodNetwork opens sockets inside one pod's network namespace, carrying the
// agent's socket mark so the pod's redirection does not capture them again.
type PodNetwork interface {
	// Dial connects to dst from inside the pod. A valid src binds the
	// socket to that address transparently (IP_TRANSPARENT), so the app
	// sees the original client's IP; the zero Addr lets the kernel choose.
	Dial(ctx context.Context, src netip.Addr, dst netip.AddrPort) (net.Conn, error)
}

// LocalDialer is optionally implemented by a PodNetwork: DialLocal is Dial
// for a peer in the pod itself (the tunnel delivering to the pod's app),
// which may skip what only remote peers need (TCP keepalive probes: a
// local socket cannot vanish unnoticed, and turning them on costs system
// calls on every connection). The tunnel calls it on a per-connection
// goroutine that has not locked its OS thread and returns soon after a
// failed dial, so an implementation may do its work on that goroutine's
// thread (and, if that thread cannot be restored, keep it locked).
type LocalDialer interface {
	DialLocal(ctx context.Context, src netip.Addr, dst netip.AddrPort) (net.Conn, error)
}

// OwnPortDialer is optionally implemented by a PodNetwork:
// DialLocalOwnPort is DialLocal for delivering a plaintext client's
// connection, whose source port must never be one that client may use
// for a connection of its own to the pod (podnet: a port below the
// clients' ephemeral ranges), nor one avoid reports (the pod's app
// ports: a socket of ours there would keep an app from binding it
// again). Called like DialLocal.
type OwnPortDialer interface {
	DialLocalOwnPort(ctx context.Context, src netip.Addr, dst netip.AddrPort, avoid func(port uint16) bool) (net.Conn, error)
}

// Pod is everything the tunnel needs to serve one enrolled pod. The
// listeners are already open inside the pod's network namespace.
type Pod struct {
	Workload Workload
	// Outbound receives the pod's redirected outbound TCP (15001).
	Outbound net.Listener
	// Inbound receives redirected plaintext inbound TCP (15006).
	Inbound net.Listener
	// HBONE receives mTLS HBONE connections (15008).
	HBONE net.Listener
	Net   PodNetwork
}
