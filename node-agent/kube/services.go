package kube

import (
	"net/netip"
	"slices"
	"sync"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/client-go/tools/cache"
)

// serviceIndex maps Service VIP:port → endpoint addr:port. Each Service's
// entries are recomputed from its current Service and EndpointSlices on
// every change, so the per-connection lookup is one map read.
type serviceIndex struct {
	// recompute serializes rebuilds: a rebuild reads the informer stores
	// and then writes the map, and two interleaved rebuilds of one Service
	// could otherwise leave the older picture in place.
	recompute sync.Mutex

	mu    sync.RWMutex
	byVIP map[netip.AddrPort][]netip.AddrPort
	owned map[string][]netip.AddrPort // service key → its VIP:port keys
}

func (x *serviceIndex) init() {
	x.byVIP = map[netip.AddrPort][]netip.AddrPort{}
	x.owned = map[string][]netip.AddrPort{}
}

// ServiceEndpoints implements tunnel.Directory. The returned slice is
// shared and read-only: rebuilds replace slices, never modify them.
func (s *Source) ServiceEndpoints(vip netip.AddrPort) ([]netip.AddrPort, bool) {
	s.svc.mu.RLock()
	defer s.svc.mu.RUnlock()
	eps, ok := s.svc.byVIP[netip.AddrPortFrom(vip.Addr().Unmap(), vip.Port())]
	return eps, ok
}

// serviceTouched rebuilds the Service that obj (a Service or one of its
// EndpointSlices) belongs to.
func (s *Source) serviceTouched(obj any) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	var key string
	switch o := obj.(type) {
	case *corev1.Service:
		key = o.Namespace + "/" + o.Name
	case *discoveryv1.EndpointSlice:
		name := o.Labels[discoveryv1.LabelServiceName]
		if name == "" {
			return
		}
		key = o.Namespace + "/" + name
	default:
		return
	}
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
	entries := ServiceEntries(svc, sl, s.cfg.NodeName)

	s.svc.mu.Lock()
	defer s.svc.mu.Unlock()
	for _, k := range s.svc.owned[key] {
		delete(s.svc.byVIP, k)
	}
	delete(s.svc.owned, key)
	if len(entries) == 0 {
		return
	}
	keys := make([]netip.AddrPort, 0, len(entries))
	for k, v := range entries {
		s.svc.byVIP[k] = v
		keys = append(keys, k)
	}
	s.svc.owned[key] = keys
}

// ServiceEntries computes VIP:port → endpoints for one Service and its
// EndpointSlices, the way kube-proxy on node does for TCP from a pod:
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
//   - with internalTrafficPolicy Local only endpoints on node count for
//     the clusterIPs (ready ones, else serving terminating ones), and
//     none elsewhere is a substitute: kube-proxy drops the connection
//     then. The agent serves the pods of its own node, so node is the
//     client's. A pod's connection to an external address uses every
//     node's endpoints whatever the policies (kube-proxy's short-circuit
//     of pod traffic to the cluster-wide endpoints).
//
// A VIP:port with no usable endpoint is present with an empty list: the
// address is a Service (the tunnel must not pass it through as if it were
// a pod) but nothing can serve it.
func ServiceEntries(svc *corev1.Service, sl []*discoveryv1.EndpointSlice, node string) map[netip.AddrPort][]netip.AddrPort {
	if svc == nil || svc.Spec.Type == corev1.ServiceTypeExternalName {
		return nil
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
		return nil // headless: kube-proxy ignores its external addresses too
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
	out := map[netip.AddrPort][]netip.AddrPort{}
	for _, sp := range svc.Spec.Ports {
		proto := sp.Protocol
		if proto == "" {
			proto = corev1.ProtocolTCP
		}
		if proto != corev1.ProtocolTCP || sp.Port <= 0 || sp.Port > 65535 {
			continue
		}
		for _, vip := range vips {
			ready, terminating := endpointsFor(vip.ip.Is4(), sp.Name, local && !vip.external, node, sl)
			eps := ready
			if len(eps) == 0 {
				eps = terminating
			}
			out[netip.AddrPortFrom(vip.ip, uint16(sp.Port))] = eps
		}
	}
	return out
}

// endpointsFor lists the endpoints of one Service port and family; when
// local, only those on node (none when node is empty).
func endpointsFor(v4 bool, portName string, local bool, node string, sl []*discoveryv1.EndpointSlice) (ready, terminating []netip.AddrPort) {
	// Sets, not slices: an address may sit in two slices while the
	// controller moves it, and large Services have thousands of endpoints.
	readySet := map[netip.AddrPort]struct{}{}
	termSet := map[netip.AddrPort]struct{}{}
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
			if local && (node == "" || e.NodeName == nil || *e.NodeName != node) {
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
			for _, a := range e.Addresses {
				ip, err := netip.ParseAddr(a)
				if err != nil || ip.Unmap().Is4() != v4 {
					continue
				}
				ap := netip.AddrPortFrom(ip.Unmap(), uint16(port))
				if isReady {
					readySet[ap] = struct{}{}
				} else {
					termSet[ap] = struct{}{}
				}
			}
		}
	}
	return sortedAddrPorts(readySet), sortedAddrPorts(termSet)
}

func sortedAddrPorts(set map[netip.AddrPort]struct{}) []netip.AddrPort {
	if len(set) == 0 {
		return []netip.AddrPort{}
	}
	l := make([]netip.AddrPort, 0, len(set))
	for ap := range set {
		l = append(l, ap)
	}
	slices.SortFunc(l, func(a, b netip.AddrPort) int { return a.Compare(b) })
	return l
}
