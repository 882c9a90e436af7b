package kube

import (
	"net/netip"
	"slices"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/ambit-mesh/ambit/tunnel"
)

// serviceIndex maps Service VIP:port → what it resolves to. Each
// Service's entries are recomputed from its current Service and
// EndpointSlices (and the node's zone) on every change, so the
// per-connection lookup is one map read.
type serviceIndex struct {
	// recompute serializes rebuilds: a rebuild reads the informer stores
	// and then writes the map, and two interleaved rebuilds of one Service
	// could otherwise leave the older picture in place. It also guards
	// zone, which every rebuild reads.
	recompute sync.Mutex
	zone      string // this node's topology.kubernetes.io/zone ("" unknown)

	mu    sync.RWMutex
	byVIP map[netip.AddrPort][]netip.AddrPort
	// sticky holds the addresses of Services with session affinity
	// only: byVIP keeps the layout of before (slices, not Services),
	// and a Service without affinity costs one more read of a map that
	// is usually empty.
	sticky map[netip.AddrPort]*tunnel.Affinity
	owned  map[string][]netip.AddrPort // service key → its VIP:port keys
	// vipClaims: every Service declaring a VIP:port (two may list one
	// externalIP); byVIP holds one, another takes over when it goes.
	vipClaims map[netip.AddrPort]map[string]tunnel.Service

	// NodePorts: <any node's address>:<nodePort> resolves like the
	// Service's external addresses. Not expanded into byVIP (1,000 nodes
	// × 500 NodePorts would be half a million keys, rewritten at every
	// node change): a set of node addresses and a map by port, read only
	// when byVIP misses.
	nodeAddrs  map[netip.Addr]int       // InternalIP/ExternalIP of every Node → how many Nodes list it
	nodeOwned  map[string][]netip.Addr  // node name → the addresses it added
	byNodePort map[uint16]nodePortEntry // TCP nodePort → what it resolves to
	// nodePortBits has bit p set when byNodePort has port p: a
	// connection to any other port (pod to pod, the most common one)
	// misses with one array read instead of two map lookups.
	nodePortBits [1 << 16 / 64]uint64
	// portClaims: every Service claiming a nodePort. The API server
	// allocates each once, but a port freed by one Service and given to
	// another can be claimed by both in the informer's view for a moment
	// (the second's event first); byNodePort holds one of the claims, and
	// another takes over when it goes.
	portClaims map[uint16]map[string]nodePortEntry
	portsOwned map[string][]uint16 // service key → its nodePorts
}

// nodePortEntry is one Service port's nodePort: per family of the node
// address the client used, the endpoints of that family.
type nodePortEntry struct {
	owner string            // service key ("namespace/name")
	fam   [2]tunnel.Service // [0] IPv4, [1] IPv6
	has   [2]bool           // the Service has a clusterIP of that family
}

func (x *serviceIndex) init() {
	x.byVIP = map[netip.AddrPort][]netip.AddrPort{}
	x.sticky = map[netip.AddrPort]*tunnel.Affinity{}
	x.owned = map[string][]netip.AddrPort{}
	x.vipClaims = map[netip.AddrPort]map[string]tunnel.Service{}
	x.nodeAddrs = map[netip.Addr]int{}
	x.nodeOwned = map[string][]netip.Addr{}
	x.byNodePort = map[uint16]nodePortEntry{}
	x.portClaims = map[uint16]map[string]nodePortEntry{}
	x.portsOwned = map[string][]uint16{}
}

// setNodePortsLocked replaces the nodePorts of the Service key; x.mu is
// held for writing.
func (x *serviceIndex) setNodePortsLocked(key string, ports map[uint16]nodePortEntry) {
	for _, p := range x.portsOwned[key] {
		claims := x.portClaims[p]
		delete(claims, key)
		if len(claims) == 0 {
			delete(x.portClaims, p)
		}
		if x.byNodePort[p].owner != key {
			continue
		}
		delete(x.byNodePort, p)
		x.nodePortBits[p/64] &^= 1 << (p % 64)
		for _, e := range claims { // another claim, if any, takes over
			x.byNodePort[p] = e
			x.nodePortBits[p/64] |= 1 << (p % 64)
			break
		}
	}
	delete(x.portsOwned, key)
	if len(ports) == 0 {
		return
	}
	owned := make([]uint16, 0, len(ports))
	for p, e := range ports {
		e.owner = key
		if x.portClaims[p] == nil {
			x.portClaims[p] = map[string]nodePortEntry{}
		}
		x.portClaims[p][key] = e
		x.byNodePort[p] = e
		x.nodePortBits[p/64] |= 1 << (p % 64)
		owned = append(owned, p)
	}
	x.portsOwned[key] = owned
}

// ServiceEndpoints implements tunnel.Directory. The returned slice is
// shared and read-only: rebuilds replace slices, never modify them.
func (s *Source) ServiceEndpoints(vip netip.AddrPort) ([]netip.AddrPort, bool) {
	svc, ok := s.ServiceByAddr(vip)
	return svc.Endpoints, ok
}

// ServiceByAddr implements tunnel.ServiceDirectory: the endpoints, and
// the Service port's session affinity.
func (s *Source) ServiceByAddr(vip netip.AddrPort) (tunnel.Service, bool) {
	k := netip.AddrPortFrom(vip.Addr().Unmap(), vip.Port())
	// No defer: map reads cannot panic, and this runs once per
	// connection.
	s.svc.mu.RLock()
	eps, ok := s.svc.byVIP[k]
	var a *tunnel.Affinity
	if ok {
		if len(s.svc.sticky) > 0 {
			a = s.svc.sticky[k]
		}
	} else if p := k.Port(); s.svc.nodePortBits[p/64]&(1<<(p%64)) != 0 {
		// Not a Service address, but a nodePort: on a node's address?
		// (A call, so the common path above stays small.)
		svc, ok := s.svc.nodePortLocked(k)
		s.svc.mu.RUnlock()
		return svc, ok
	}
	s.svc.mu.RUnlock()
	return tunnel.Service{Endpoints: eps, Affinity: a}, ok
}

// nodePortLocked resolves <node address>:<nodePort>; x.mu is held.
func (x *serviceIndex) nodePortLocked(k netip.AddrPort) (tunnel.Service, bool) {
	if x.nodeAddrs[k.Addr()] == 0 {
		return tunnel.Service{}, false
	}
	np, ok := x.byNodePort[k.Port()]
	if !ok {
		return tunnel.Service{}, false
	}
	f := 0
	if !k.Addr().Is4() {
		f = 1
	}
	// A Service without a clusterIP of the address's family has no
	// NodePort there (kube-proxy's proxier of that family does not know
	// it): passed through, as before.
	return np.fam[f], np.has[f]
}

// nodeAddresses records the InternalIP and ExternalIP addresses of a
// Node (nil: the Node is gone): the addresses kube-proxy serves NodePorts
// on.
func (s *Source) nodeAddresses(name string, addrs []netip.Addr) {
	s.svc.mu.Lock()
	defer s.svc.mu.Unlock()
	if slices.Equal(s.svc.nodeOwned[name], addrs) {
		return
	}
	for _, a := range s.svc.nodeOwned[name] {
		if s.svc.nodeAddrs[a]--; s.svc.nodeAddrs[a] <= 0 {
			delete(s.svc.nodeAddrs, a)
		}
	}
	delete(s.svc.nodeOwned, name)
	if len(addrs) == 0 {
		return
	}
	for _, a := range addrs {
		s.svc.nodeAddrs[a]++
	}
	s.svc.nodeOwned[name] = addrs
}

// serviceTouched rebuilds the Service that obj (a Service or one of its
// EndpointSlices) belongs to.
func (s *Source) serviceTouched(obj any) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	switch o := obj.(type) {
	case *corev1.Service:
		s.rebuildService(o.Namespace + "/" + o.Name)
	case *discoveryv1.EndpointSlice:
		if name := o.Labels[discoveryv1.LabelServiceName]; name != "" {
			s.rebuildService(o.Namespace + "/" + name)
		}
	}
}

// rebuildService recomputes the entries of the Service key
// ("namespace/name") from the informer stores.
func (s *Source) rebuildService(key string) {
	s.svc.recompute.Lock()
	defer s.svc.recompute.Unlock()

	var svc *corev1.Service
	if obj, ok, _ := s.services.GetStore().GetByKey(key); ok {
		svc, _ = obj.(*corev1.Service)
	}
	var sl []*discoveryv1.EndpointSlice
	if svc != nil {
		objs, _ := s.slices.GetIndexer().ByIndex(sliceByService, key)
		for _, o := range objs {
			if es, ok := o.(*discoveryv1.EndpointSlice); ok {
				sl = append(sl, es)
			}
		}
	}
	// Pods the slices name that the pod cache lacks: registered in the
	// same critical section (s.wait.mu) as the checks, so a pod stored
	// meanwhile is either seen by a check or finds the registration
	// (podArrived takes it after the informer stored the pod), and the
	// Service is rebuilt once it is there.
	s.wait.mu.Lock()
	known, missing := s.knownPods()
	entries, nodePorts := serviceEntries(svc, sl, Locality{Node: s.cfg.NodeName, Zone: s.svc.zone}, known)
	s.wait.setLocked(key, *missing)
	s.wait.mu.Unlock()

	s.svc.mu.Lock()
	defer s.svc.mu.Unlock()
	for _, k := range s.svc.owned[key] {
		claims := s.svc.vipClaims[k]
		delete(claims, key)
		delete(s.svc.byVIP, k)
		delete(s.svc.sticky, k)
		if len(claims) == 0 {
			delete(s.svc.vipClaims, k)
			continue
		}
		// Another Service declares the address and port too (an
		// externalIP both list): it keeps it.
		for _, v := range claims {
			s.svc.byVIP[k] = v.Endpoints
			if v.Affinity != nil {
				s.svc.sticky[k] = v.Affinity
			}
			break
		}
	}
	delete(s.svc.owned, key)
	s.svc.setNodePortsLocked(key, nodePorts)
	if len(entries) == 0 {
		return
	}
	keys := make([]netip.AddrPort, 0, len(entries))
	for k, v := range entries {
		s.svc.byVIP[k] = v.Endpoints
		delete(s.svc.sticky, k)
		if v.Affinity != nil {
			s.svc.sticky[k] = v.Affinity
		}
		if s.svc.vipClaims[k] == nil {
			s.svc.vipClaims[k] = map[string]tunnel.Service{}
		}
		s.svc.vipClaims[k][key] = v
		keys = append(keys, k)
	}
	s.svc.owned[key] = keys
}

// setZone records this node's zone and, when it changed, rebuilds every
// Service: topology hints are read against it.
func (s *Source) setZone(zone string) {
	s.svc.recompute.Lock()
	changed := s.svc.zone != zone
	s.svc.zone = zone
	s.svc.recompute.Unlock()
	if !changed {
		return
	}
	s.log.Info("node zone", "zone", zone)
	for _, key := range s.services.GetStore().ListKeys() {
		s.rebuildService(key)
	}
}

// Locality is where the agent runs, hence where every client it resolves
// for runs: its node, and the node's topology.kubernetes.io/zone label
// ("" when the node has none).
type Locality struct {
	Node, Zone string
}

// ServiceEntries computes VIP:port → Service for one Service and its
// EndpointSlices, the way kube-proxy on loc.Node does for TCP from a pod:
//
//   - VIPs are the Service's clusterIPs (headless and ExternalName have
//     none and get no entry) and, for a Service that has one, its
//     externalIPs and LoadBalancer ingress IPs: kube-proxy sends a pod's
//     connection to those straight to the endpoints too (not an ingress
//     IP with ipMode Proxy: that traffic goes to the load balancer);
//   - a Service port matches the slice port of the same name and
//     protocol; the slice port number is the target port, already resolved
//     per endpoint group by the EndpointSlice controller (named target
//     ports differ per pod), so each slice contributes its own number;
//   - an endpoint counts when ready (nil means ready); when a port has no
//     ready endpoint at all, serving-and-terminating endpoints are used so
//     connections keep working through a rolling update (serving nil
//     means serving, as the API says);
//   - a VIP maps only to endpoints of its own family;
//   - topology (trafficDistribution PreferSameNode, PreferClose or
//     PreferSameZone, and the older topology-mode Auto annotation: the
//     EndpointSlice controller turns them into hints): when every ready
//     endpoint of the port and family is hinted for some node and one is
//     hinted for loc.Node, only those hinted for loc.Node; else, when
//     every ready endpoint is hinted for some zone and one for loc.Zone,
//     only those; else all. The serving-terminating fallback ignores
//     hints, as kube-proxy's does;
//   - with internalTrafficPolicy Local only endpoints on loc.Node count
//     for the clusterIPs (ready ones, else serving terminating ones; no
//     hints), and none elsewhere is a substitute: kube-proxy drops the
//     connection then. The agent serves the pods of its own node, so
//     loc.Node is the client's. A pod's connection to an external address
//     uses the cluster-wide endpoints (hints apply) whatever the policies
//     (kube-proxy's short-circuit of pod traffic to the cluster policy);
//   - sessionAffinity ClientIP sets Affinity: its timeout
//     (sessionAffinityConfig.clientIP.timeoutSeconds, default 10800 s)
//     and Port "<namespace>/<name>:<port name>", one Affinity for every
//     address of the port, since kube-proxy keeps one affinity per client
//     and Service port whichever address the client used.
//
// A VIP:port with no usable endpoint is present with an empty list: the
// address is a Service (the tunnel must not pass it through as if it were
// a pod) but nothing can serve it.
//
// NodePorts are not in the result (they are not one address: see
// serviceEntries).
func ServiceEntries(svc *corev1.Service, sl []*discoveryv1.EndpointSlice, loc Locality) map[netip.AddrPort]tunnel.Service {
	out, _ := serviceEntries(svc, sl, loc, nil)
	return out
}

// serviceEntries is ServiceEntries and, per TCP nodePort of the Service,
// what a pod's connection to <a node's address>:<nodePort> resolves to.
// kube-proxy sends a NodePort connection from a pod to the Service's
// cluster-wide endpoints whatever its traffic policies: with
// externalTrafficPolicy Local its "external" chain short-circuits traffic
// from pods ("short-circuit pod traffic") to the cluster policy chain, and
// it keeps the cluster endpoints even under internalTrafficPolicy Local
// for that (UsesClusterEndpoints: "we need Cluster endpoints to implement
// short circuiting"). So a nodePort resolves like an externalIP of the
// node address's family (hints applied), not like the clusterIP when
// that is Local. Only families the Service has a clusterIP of get an
// entry.
//
// With known set, an endpoint naming a pod (targetRef) that known says
// the pod cache lacks is left out of each list that has another: the
// tunnel would take it for a pod outside the mesh (no workload at that
// IP) and connect in plaintext, which a strict destination refuses. The
// EndpointSlice and the pod come through different watches, so for a
// moment a new pod can be in one and not the other. ztunnel skips such
// endpoints; when nothing else is left they are kept (the connection is
// tried as before, not refused).
func serviceEntries(svc *corev1.Service, sl []*discoveryv1.EndpointSlice, loc Locality, known podKnown) (map[netip.AddrPort]tunnel.Service, map[uint16]nodePortEntry) {
	if svc == nil || svc.Spec.Type == corev1.ServiceTypeExternalName {
		return nil, nil
	}
	type address struct {
		ip       netip.Addr
		external bool
	}
	var vips []address
	ips := svc.Spec.ClusterIPs
	if len(ips) == 0 && svc.Spec.ClusterIP != "" {
		ips = []string{svc.Spec.ClusterIP}
	}
	for _, s := range ips {
		if a, err := netip.ParseAddr(s); err == nil {
			vips = append(vips, address{ip: a.Unmap()})
		}
	}
	if len(vips) == 0 {
		return nil, nil // headless: kube-proxy ignores its external addresses (and it has no nodePort)
	}
	external := slices.Clone(svc.Spec.ExternalIPs)
	for _, in := range svc.Status.LoadBalancer.Ingress {
		if in.IPMode == nil || *in.IPMode != corev1.LoadBalancerIPModeProxy {
			external = append(external, in.IP)
		}
	}
	for _, s := range external {
		if a, err := netip.ParseAddr(s); err == nil {
			vips = append(vips, address{ip: a.Unmap(), external: true})
		}
	}
	p := svc.Spec.InternalTrafficPolicy
	local := p != nil && *p == corev1.ServiceInternalTrafficPolicyLocal
	timeout := sessionAffinity(svc)
	out := map[netip.AddrPort]tunnel.Service{}
	var nodePorts map[uint16]nodePortEntry
	for _, sp := range svc.Spec.Ports {
		proto := sp.Protocol
		if proto == "" {
			proto = corev1.ProtocolTCP
		}
		if proto != corev1.ProtocolTCP || sp.Port <= 0 || sp.Port > 65535 {
			continue
		}
		var aff *tunnel.Affinity
		if timeout > 0 {
			aff = &tunnel.Affinity{Timeout: timeout, Port: svc.Namespace + "/" + svc.Name + ":" + sp.Name}
		}
		// The lists depend only on the family and on whether the
		// node-local policy applies: computed once each per port, and
		// shared (read-only) by the addresses that use them.
		var memo [2][2][]netip.AddrPort
		var done [2][2]bool
		list := func(v4, nodeLocal bool) []netip.AddrPort {
			f, l := 1, 0
			if v4 {
				f = 0
			}
			if nodeLocal {
				l = 1
			}
			if !done[f][l] {
				ready, terminating := endpointsFor(v4, sp.Name, nodeLocal, loc, sl, known)
				memo[f][l], done[f][l] = ready, true
				if len(ready) == 0 {
					memo[f][l] = terminating
				}
			}
			return memo[f][l]
		}
		var np nodePortEntry
		for _, vip := range vips {
			out[netip.AddrPortFrom(vip.ip, uint16(sp.Port))] = tunnel.Service{Endpoints: list(vip.ip.Is4(), local && !vip.external), Affinity: aff}
			if !vip.external {
				f := 1
				if vip.ip.Is4() {
					f = 0
				}
				np.fam[f], np.has[f] = tunnel.Service{Endpoints: list(vip.ip.Is4(), false), Affinity: aff}, true
			}
		}
		if sp.NodePort > 0 && sp.NodePort <= 65535 {
			if nodePorts == nil {
				nodePorts = map[uint16]nodePortEntry{}
			}
			nodePorts[uint16(sp.NodePort)] = np
		}
	}
	return out, nodePorts
}

// maxAffinitySeconds is the API server's upper bound on
// sessionAffinityConfig.clientIP.timeoutSeconds (one day).
const maxAffinitySeconds = 86400

// sessionAffinity is the ClientIP affinity timeout, 0 for none.
func sessionAffinity(svc *corev1.Service) time.Duration {
	if svc.Spec.SessionAffinity != corev1.ServiceAffinityClientIP {
		return 0
	}
	secs := corev1.DefaultClientIPServiceAffinitySeconds
	// The API server defaults and validates (1..86400); a value it would
	// refuse falls back to the default rather than to no affinity.
	if c := svc.Spec.SessionAffinityConfig; c != nil && c.ClientIP != nil && c.ClientIP.TimeoutSeconds != nil &&
		*c.ClientIP.TimeoutSeconds > 0 && *c.ClientIP.TimeoutSeconds <= maxAffinitySeconds {
		secs = *c.ClientIP.TimeoutSeconds
	}
	return time.Duration(secs) * time.Second
}

// candidate is one usable endpoint address before topology is applied.
type candidate struct {
	ap    netip.AddrPort
	ready bool // else serving and terminating
	hints *discoveryv1.EndpointHints
	// unknown: the endpoint names a pod the pod cache does not have
	// (yet), with this address.
	unknown bool
}

// podKnown reports whether the pod cache has the pod an endpoint's
// targetRef names (namespace, name, UID when set) with the endpoint's
// address; nil: every endpoint counts as known.
type podKnown func(namespace string, ref *corev1.ObjectReference, addr netip.Addr) bool

// endpointsFor lists the endpoints of one Service port and family; when
// local, only those on loc.Node (none when it is empty), else the ready
// ones narrowed by topology hints (see ServiceEntries). Of each list,
// endpoints whose pod known does not have are left out when one it has
// remains (see serviceEntries).
func endpointsFor(v4 bool, portName string, local bool, loc Locality, sl []*discoveryv1.EndpointSlice, known podKnown) (ready, terminating []netip.AddrPort) {
	var cands []candidate
	for _, es := range sl {
		if (v4 && es.AddressType != discoveryv1.AddressTypeIPv4) || (!v4 && es.AddressType != discoveryv1.AddressTypeIPv6) {
			continue
		}
		var port int32
		found := false
		for _, p := range es.Ports {
			name := ""
			if p.Name != nil {
				name = *p.Name
			}
			proto := corev1.ProtocolTCP
			if p.Protocol != nil {
				proto = *p.Protocol
			}
			if name == portName && proto == corev1.ProtocolTCP && p.Port != nil {
				port, found = *p.Port, true
				break
			}
		}
		if !found || port <= 0 || port > 65535 {
			continue
		}
		for _, e := range es.Endpoints {
			if local && (loc.Node == "" || e.NodeName == nil || *e.NodeName != loc.Node) {
				continue
			}
			// The API's defaults, as kube-proxy reads them: ready and
			// serving nil mean true, terminating nil means false.
			isReady := e.Conditions.Ready == nil || *e.Conditions.Ready
			isServingTerminating := (e.Conditions.Serving == nil || *e.Conditions.Serving) &&
				e.Conditions.Terminating != nil && *e.Conditions.Terminating
			if !isReady && !isServingTerminating {
				continue
			}
			// One endpoint, one address: the API calls them fungible
			// and kube-proxy uses only the first, so a second would
			// weigh the endpoint twice (or reach an address kube-proxy
			// never sends to).
			addrs := e.Addresses
			if len(addrs) > 1 {
				addrs = addrs[:1]
			}
			for _, a := range addrs {
				ip, err := netip.ParseAddr(a)
				if err != nil || ip.Unmap().Is4() != v4 {
					continue
				}
				// Only an endpoint that names a pod can be one the
				// cache lacks; one without (a selectorless Service's
				// slice) is whatever it is.
				unknown := known != nil && e.TargetRef != nil && !known(es.Namespace, e.TargetRef, ip.Unmap())
				cands = append(cands, candidate{ap: netip.AddrPortFrom(ip.Unmap(), uint16(port)), ready: isReady, hints: e.Hints, unknown: unknown})
			}
		}
	}
	mode := topologyNone
	if !local {
		mode = topologyFor(cands, loc)
	}
	// Sets, not slices: an address may sit in two slices while the
	// controller moves it, and large Services have thousands of endpoints.
	// The value: the pod is known (false while only unknown ones listed
	// the address).
	readySet := map[netip.AddrPort]bool{}
	termSet := map[netip.AddrPort]bool{}
	for _, c := range cands {
		switch {
		case !c.ready:
			termSet[c.ap] = termSet[c.ap] || !c.unknown
		case mode.admits(c.hints, loc):
			readySet[c.ap] = readySet[c.ap] || !c.unknown
		}
	}
	return preferKnown(readySet), preferKnown(termSet)
}

// preferKnown lists the endpoints of set whose pod is known, or all of
// them when none is: an endpoint whose pod the cache lacks would be taken
// for a pod outside the mesh (plaintext, refused by a strict
// destination), as ztunnel avoids too; with no other choice, the
// connection is tried as before rather than refused.
func preferKnown(set map[netip.AddrPort]bool) []netip.AddrPort {
	anyKnown := false
	for _, k := range set {
		anyKnown = anyKnown || k
	}
	l := make([]netip.AddrPort, 0, len(set))
	for ap, k := range set {
		if k || !anyKnown {
			l = append(l, ap)
		}
	}
	slices.SortFunc(l, func(a, b netip.AddrPort) int { return a.Compare(b) })
	return l
}

// topology is kube-proxy's topology mode for one Service port and family.
type topology int

const (
	topologyNone topology = iota
	topologySameNode
	topologySameZone
)

// topologyFor decides from the ready endpoints' hints, as kube-proxy's
// topologyModeFromHints: same node when every ready endpoint has a node
// hint and one names this node; else same zone when every ready endpoint
// has a zone hint and one names this node's (known) zone; else none. One
// endpoint without hints (a controller other than Kubernetes', a slice
// written before the hints) turns topology off: kube-proxy does not
// guess, and neither do we.
func topologyFor(cands []candidate, loc Locality) topology {
	anyReady, allNode, allZone, forNode, forZone := false, true, true, false, false
	for _, c := range cands {
		if !c.ready {
			continue
		}
		anyReady = true
		var nodes []discoveryv1.ForNode
		var zones []discoveryv1.ForZone
		if c.hints != nil {
			nodes, zones = c.hints.ForNodes, c.hints.ForZones
		}
		if len(nodes) == 0 {
			allNode = false
		} else if !forNode && slices.ContainsFunc(nodes, func(n discoveryv1.ForNode) bool { return n.Name == loc.Node }) {
			forNode = true
		}
		if len(zones) == 0 {
			allZone = false
		} else if !forZone && loc.Zone != "" && slices.ContainsFunc(zones, func(z discoveryv1.ForZone) bool { return z.Name == loc.Zone }) {
			forZone = true
		}
	}
	switch {
	case !anyReady:
		return topologyNone
	case allNode && forNode:
		return topologySameNode
	case allZone && forZone:
		return topologySameZone
	}
	return topologyNone
}

// admits reports whether a ready endpoint with hints h is used in mode m.
func (m topology) admits(h *discoveryv1.EndpointHints, loc Locality) bool {
	switch m {
	case topologySameNode:
		return h != nil && slices.ContainsFunc(h.ForNodes, func(n discoveryv1.ForNode) bool { return n.Name == loc.Node })
	case topologySameZone:
		return h != nil && slices.ContainsFunc(h.ForZones, func(z discoveryv1.ForZone) bool { return z.Name == loc.Zone })
	}
	return true
}
