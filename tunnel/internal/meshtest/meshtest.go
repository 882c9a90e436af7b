// Package meshtest assembles a two-pod mesh in real network namespaces
// for the tunnel's tests and benchmarks: pods A and B on a veth link, the
// in-pod redirection in both, an agent-like Proxy per pod ("two nodes")
// with podnet listeners on 15001/15006/15008, a test CA, a static
// Directory and a switchable Authorizer.
package meshtest

import (
	"context"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambit-mesh/ambit/internal/testca"
	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/tunnel"
	"github.com/ambit-mesh/ambit/tunnel/internal/podtest"
	"github.com/ambit-mesh/ambit/tunnel/podnet"
)

// Directory is a static, mutable tunnel.Directory (and
// tunnel.ServiceDirectory, for Services with affinity).
type Directory struct {
	mu   sync.RWMutex
	ws   map[netip.Addr]tunnel.Workload
	svcs map[netip.AddrPort]tunnel.Service
}

func (d *Directory) WorkloadByIP(ip netip.Addr) (tunnel.Workload, bool) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	w, ok := d.ws[ip.Unmap()]
	return w, ok
}

func (d *Directory) ServiceEndpoints(vip netip.AddrPort) ([]netip.AddrPort, bool) {
	svc, ok := d.ServiceByAddr(vip)
	return svc.Endpoints, ok
}

func (d *Directory) ServiceByAddr(vip netip.AddrPort) (tunnel.Service, bool) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	svc, ok := d.svcs[netip.AddrPortFrom(vip.Addr().Unmap(), vip.Port())]
	return svc, ok
}

// AddWorkload registers w under each of its IPs.
func (d *Directory) AddWorkload(w tunnel.Workload) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, ip := range w.IPs {
		d.ws[ip] = w
	}
}

// AddService maps a VIP to endpoints.
func (d *Directory) AddService(vip netip.AddrPort, eps ...netip.AddrPort) {
	d.SetService(vip, tunnel.Service{Endpoints: eps})
}

// SetService maps a VIP to a Service (replacing what it was).
func (d *Directory) SetService(vip netip.AddrPort, svc tunnel.Service) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.svcs[vip] = svc
}

// Authorizer is a switchable tunnel.Authorizer (allow all by default).
type Authorizer struct {
	mu sync.RWMutex
	fn func(tunnel.ConnInfo) tunnel.Verdict
}

func (a *Authorizer) Authorize(c tunnel.ConnInfo) tunnel.Verdict {
	a.mu.RLock()
	fn := a.fn
	a.mu.RUnlock()
	if fn == nil {
		return tunnel.Verdict{Allow: true}
	}
	return fn(c)
}

// Set replaces the policy.
func (a *Authorizer) Set(fn func(tunnel.ConnInfo) tunnel.Verdict) {
	a.mu.Lock()
	a.fn = fn
	a.mu.Unlock()
}

// Node is one pod with its own agent (Proxy).
type Node struct {
	Pod      *podtest.Pod
	Workload tunnel.Workload
	Net      *podnet.Net
	Proxy    *tunnel.Proxy
	Serving  *tunnel.Serving
	Reg      *prometheus.Registry
}

// Mesh is pods A (client side) and B (server side).
type Mesh struct {
	A, B  *Node
	CA    *testca.CA
	Certs *testca.Store
	Dir   *Directory
	Auth  *Authorizer
}

// Options tune New.
type Options struct {
	// Config is the base tunnel config (Certificates and Authorizer are
	// filled in, and Directory when nil: the mesh's static Dir).
	Config tunnel.Config
	// NoServe leaves the proxies unstarted (for baselines).
	NoServe bool
	// NoServeB starts A's agent only (B's HBONE port is left to another
	// implementation, e.g. Istio's, for interop).
	NoServeB bool
	// CertificatesB, when set, gives B's agent its own view of the
	// shared store (two nodes whose bundles change at different times).
	CertificatesB func(*testca.Store) tunnel.Certificates
}

// New builds the mesh; everything is torn down by t.Cleanup.
func New(t testing.TB, o Options) *Mesh {
	t.Helper()
	a, b := podtest.Pair(t)
	for _, p := range []*podtest.Pod{a, b} {
		podtest.Redirect(t, p)
	}
	// Default routes so Service VIPs (not on the link) are routable and
	// get captured by the outbound rule.
	a.Run(t, "ip", "route", "add", "default", "via", b.IP4.String())
	a.Run(t, "ip", "-6", "route", "add", "default", "via", b.IP6.String())
	b.Run(t, "ip", "route", "add", "default", "via", a.IP4.String())
	b.Run(t, "ip", "-6", "route", "add", "default", "via", a.IP6.String())
	ca, err := testca.New("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	m := &Mesh{
		CA:    ca,
		Certs: testca.NewStore(ca),
		Dir:   &Directory{ws: map[netip.Addr]tunnel.Workload{}, svcs: map[netip.AddrPort]tunnel.Service{}},
		Auth:  &Authorizer{},
	}
	oa := o
	oa.CertificatesB = nil
	m.A = m.node(t, a, "a", "client", oa)
	ob := o
	ob.NoServe = o.NoServe || o.NoServeB
	m.B = m.node(t, b, "b", "server", ob)
	return m
}

func (m *Mesh) node(t testing.TB, p *podtest.Pod, ns, sa string, o Options) *Node {
	t.Helper()
	w := tunnel.Workload{UID: ns + "-uid", Namespace: ns, Name: sa + "-pod", ServiceAccount: sa,
		IPs: []netip.Addr{p.IP4, p.IP6}, Identity: m.CA.ID(ns, sa), Meshed: true}
	m.Dir.AddWorkload(w)
	n := &Node{Pod: p, Workload: w, Reg: prometheus.NewRegistry()}
	pn, err := podnet.Open(p.File(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pn.Close() })
	n.Net = pn
	if o.NoServe {
		return n
	}
	cfg := o.Config
	cfg.Certificates, cfg.Authorizer, cfg.Registerer = m.Certs, m.Auth, n.Reg
	if cfg.Directory == nil { // else the caller's (e.g. node-agent/kube's Source)
		cfg.Directory = m.Dir
	}
	if o.CertificatesB != nil { // B's node only (New)
		cfg.Certificates = o.CertificatesB(m.Certs)
	}
	px, err := tunnel.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	n.Proxy = px
	pod, err := PodListeners(w, pn)
	if err != nil {
		t.Fatal(err)
	}
	sv, err := px.Serve(pod)
	if err != nil {
		t.Fatal(err)
	}
	n.Serving = sv
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		sv.Close(ctx)
	})
	return n
}

// PodListeners opens the agent's three listeners in pn, as the node agent
// does, and returns the pod ready for Proxy.Serve.
func PodListeners(w tunnel.Workload, pn *podnet.Net) (tunnel.Pod, error) {
	pod := tunnel.Pod{Workload: w, Net: pn}
	for _, l := range []struct {
		port uint16
		dst  *net.Listener
		ka   time.Duration
	}{{15001, &pod.Outbound, -1}, {15006, &pod.Inbound, 0}, {15008, &pod.HBONE, 0}} {
		// The outbound port's peers are the pod's own apps: no
		// keepalive probes (as the node agent).
		ln, err := pn.Listen(l.port, podnet.ListenOptions{KeepAlive: l.ka})
		if err != nil {
			return pod, err
		}
		*l.dst = ln
	}
	return pod, nil
}

// Listen opens an app listener inside the node's pod.
func (n *Node) Listen(t testing.TB, addr string) net.Listener {
	t.Helper()
	var ln net.Listener
	n.Pod.Do(t, func() (err error) { ln, err = net.Listen("tcp", addr); return })
	t.Cleanup(func() { ln.Close() })
	return ln
}

// Dial connects from the node's pod, as its app would (captured by the
// redirection).
func (n *Node) Dial(addr netip.AddrPort) (net.Conn, error) {
	var c net.Conn
	err := n.Pod.NS.Do(func(_ nsNetNS) error {
		var err error
		c, err = net.DialTimeout("tcp", addr.String(), 10*time.Second)
		return err
	})
	return c, err
}

// Metric sums the series of a counter or gauge whose labels include all
// of match.
func (n *Node) Metric(t testing.TB, name string, match map[string]string) float64 {
	t.Helper()
	return testenv.Metric(t, n.Reg, name, match)
}
