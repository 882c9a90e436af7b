package kube

import (
	"net/netip"
	"slices"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambit-mesh/ambit/node-agent/cluster"
	"github.com/ambit-mesh/ambit/node-agent/enrollment"
	"github.com/ambit-mesh/ambit/plugin/redirectspec"
)

// RedirectionAnnotation is the status contract on the pod. The trim keeps
// it and the annotations the enrollment decision reads
// (enrollment.Annotations: Istio's, which mark the pods Istio serves), and
// no other: every agent caches every pod of the cluster, and anyone who
// may edit a pod may give it any number of annotations of up to 256 KiB
// (last-applied-configuration alone can be kilobytes), ours included.
const RedirectionAnnotation = "ambit.dev/redirection"

// maxRedirectionValue bounds a kept value: ours are "enabled", "pending"
// and "failed", istio-cni's "enabled" and "pending"; a longer one is kept
// as "" (present, so an uninstall still removes ours, and no status we
// write, so the agent rewrites it; of istio-cni's, no status it writes,
// so no capture of Istio's). Istio's sidecar status, a JSON document of
// hundreds of bytes whose presence alone counts, is thus kept as "".
const maxRedirectionValue = 64

// keptAnnotations are the annotations TrimPod keeps, each bounded; the
// mirror annotation too (a static pod's: its value, 32 hex digits, is
// the UID the runtime gives that pod's sandbox, cluster.Pod.SandboxUID).
var keptAnnotations = append([]string{RedirectionAnnotation, cluster.MirrorAnnotation}, enrollment.Annotations...)

// TrimPod is the informer transform for pods: it returns a new, small Pod
// holding only what the mesh uses, so the cluster-wide cache does not keep
// specs, container statuses and managed fields. Objects that are not pods
// (e.g. cache tombstones) pass through unchanged.
func TrimPod(obj any) (any, error) {
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil
	}
	t := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name:              p.Name,
			Namespace:         p.Namespace,
			UID:               p.UID,
			ResourceVersion:   p.ResourceVersion,
			Labels:            p.Labels,
			DeletionTimestamp: p.DeletionTimestamp,
		},
		Spec: corev1.PodSpec{
			ServiceAccountName: p.Spec.ServiceAccountName,
			NodeName:           p.Spec.NodeName,
			HostNetwork:        p.Spec.HostNetwork,
		},
		Status: corev1.PodStatus{
			Phase:  p.Status.Phase,
			PodIPs: p.Status.PodIPs,
		},
	}
	t.Spec.InitContainers = reservedPorts(p.Spec.InitContainers)
	t.Spec.Containers = reservedPorts(p.Spec.Containers)
	if len(t.Status.PodIPs) == 0 && p.Status.PodIP != "" {
		t.Status.PodIPs = []corev1.PodIP{{IP: p.Status.PodIP}}
	}
	for _, k := range keptAnnotations {
		v, ok := p.Annotations[k]
		if !ok {
			continue
		}
		if len(v) > maxRedirectionValue {
			v = ""
		}
		if t.Annotations == nil {
			t.Annotations = make(map[string]string, 1)
		}
		t.Annotations[k] = v
	}
	return t, nil
}

// ReservedPorts are the ports the agent listens on in every enrolled pod
// (the redirection's defaults, which the agent uses). A pod that declares
// one as a TCP containerPort cannot be enrolled (docs/plugin.md).
var ReservedPorts = []uint16{redirectspec.DefaultOutboundPort, redirectspec.DefaultInboundPort, redirectspec.DefaultHBONEPort}

// reservedPorts keeps, of cs, the containers that declare a reserved TCP
// port, with those ports only (most pods: none, nil).
func reservedPorts(cs []corev1.Container) []corev1.Container {
	var out []corev1.Container
	for _, c := range cs {
		var ports []corev1.ContainerPort
		for _, cp := range c.Ports {
			if (cp.Protocol == "" || cp.Protocol == corev1.ProtocolTCP) && slices.Contains(ReservedPorts, uint16(cp.ContainerPort)) && cp.ContainerPort > 0 && cp.ContainerPort < 1<<16 {
				ports = append(ports, corev1.ContainerPort{ContainerPort: cp.ContainerPort, Protocol: corev1.ProtocolTCP})
			}
		}
		if len(ports) > 0 {
			out = append(out, corev1.Container{Name: c.Name, Ports: ports})
		}
	}
	return out
}

// TrimNamespace keeps name, labels and resource version.
func TrimNamespace(obj any) (any, error) {
	n, ok := obj.(*corev1.Namespace)
	if !ok {
		return obj, nil
	}
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{
		Name: n.Name, UID: n.UID, ResourceVersion: n.ResourceVersion, Labels: n.Labels,
	}}, nil
}

// TrimService keeps what VIP → endpoint resolution reads.
func TrimService(obj any) (any, error) {
	s, ok := obj.(*corev1.Service)
	if !ok {
		return obj, nil
	}
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: s.Name, Namespace: s.Namespace, UID: s.UID, ResourceVersion: s.ResourceVersion},
		Spec: corev1.ServiceSpec{
			Type:                  s.Spec.Type,
			ClusterIP:             s.Spec.ClusterIP,
			ClusterIPs:            s.Spec.ClusterIPs,
			Ports:                 s.Spec.Ports,
			InternalTrafficPolicy: s.Spec.InternalTrafficPolicy,
			ExternalIPs:           s.Spec.ExternalIPs,
			SessionAffinity:       s.Spec.SessionAffinity,
			SessionAffinityConfig: s.Spec.SessionAffinityConfig,
		},
		Status: corev1.ServiceStatus{LoadBalancer: s.Status.LoadBalancer},
	}, nil
}

// TrimEndpointSlice drops managed fields and annotations, keeping
// addresses, conditions, node names (internalTrafficPolicy Local),
// topology hints, ports, and of a target reference only a Pod's name and
// UID (namespace when not the slice's): an endpoint whose pod the pod
// cache does not have yet is avoided while others can serve (see
// serviceEntries).
func TrimEndpointSlice(obj any) (any, error) {
	s, ok := obj.(*discoveryv1.EndpointSlice)
	if !ok {
		return obj, nil
	}
	t := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Name: s.Name, Namespace: s.Namespace, UID: s.UID, ResourceVersion: s.ResourceVersion,
			Labels: map[string]string{discoveryv1.LabelServiceName: s.Labels[discoveryv1.LabelServiceName]},
		},
		AddressType: s.AddressType,
		Ports:       s.Ports,
		Endpoints:   make([]discoveryv1.Endpoint, len(s.Endpoints)),
	}
	for i, e := range s.Endpoints {
		t.Endpoints[i] = discoveryv1.Endpoint{Addresses: e.Addresses, Conditions: e.Conditions, NodeName: e.NodeName, Hints: e.Hints}
		if r := e.TargetRef; r != nil && r.Kind == "Pod" && r.Name != "" {
			ref := &corev1.ObjectReference{Kind: "Pod", Name: r.Name, UID: r.UID}
			if r.Namespace != "" && r.Namespace != s.Namespace {
				ref.Namespace = r.Namespace
			}
			t.Endpoints[i].TargetRef = ref
		}
	}
	return t, nil
}

// TrimNode keeps the node's name, its zone label and its InternalIP and
// ExternalIP addresses: all the agent reads of Nodes (the kubelet rewrites
// the rest, status above all, often; a Node's image list alone can be
// tens of kilobytes).
func TrimNode(obj any) (any, error) {
	n, ok := obj.(*corev1.Node)
	if !ok {
		return obj, nil
	}
	t := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n.Name, UID: n.UID, ResourceVersion: n.ResourceVersion}}
	if z, ok := n.Labels[corev1.LabelTopologyZone]; ok {
		t.Labels = map[string]string{corev1.LabelTopologyZone: z}
	}
	for _, a := range n.Status.Addresses {
		if a.Type == corev1.NodeInternalIP || a.Type == corev1.NodeExternalIP {
			t.Status.Addresses = append(t.Status.Addresses, a)
		}
	}
	return t, nil
}

// nodeIPs parses a Node's InternalIP and ExternalIP addresses (the
// addresses kube-proxy serves NodePorts on), sorted, without duplicates
// or anything unparsable.
func nodeIPs(n *corev1.Node) []netip.Addr {
	var out []netip.Addr
	for _, a := range n.Status.Addresses {
		if a.Type != corev1.NodeInternalIP && a.Type != corev1.NodeExternalIP {
			continue
		}
		if ip, err := netip.ParseAddr(a.Address); err == nil && !ip.Unmap().IsUnspecified() {
			out = append(out, ip.Unmap())
		}
	}
	slices.SortFunc(out, func(a, b netip.Addr) int { return a.Compare(b) })
	return slices.Compact(out)
}

// podIPs parses the pod's IPs, skipping anything unparsable (the API
// server validates them; a bad one must not poison the directory).
func podIPs(p *corev1.Pod) []netip.Addr {
	var out []netip.Addr
	for _, ip := range p.Status.PodIPs {
		if a, err := netip.ParseAddr(ip.IP); err == nil {
			out = append(out, a.Unmap())
		}
	}
	if len(out) == 0 && p.Status.PodIP != "" {
		if a, err := netip.ParseAddr(p.Status.PodIP); err == nil {
			out = append(out, a.Unmap())
		}
	}
	return out
}

// toPod converts a (trimmed or full) Kubernetes pod to the agent's Pod.
func toPod(p *corev1.Pod) cluster.Pod {
	return cluster.Pod{
		Namespace:      p.Namespace,
		Name:           p.Name,
		UID:            string(p.UID),
		ServiceAccount: serviceAccount(p),
		NodeName:       p.Spec.NodeName,
		Labels:         p.Labels,
		Annotations:    p.Annotations,
		IPs:            podIPs(p),
		HostNetwork:    p.Spec.HostNetwork,
		Terminal:       p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed,
		ReservedPorts:  declaredReserved(p),
	}
}

// declaredReserved lists the reserved TCP containerPorts of p's containers
// (a trimmed pod holds only those; a full one is filtered the same way).
func declaredReserved(p *corev1.Pod) []cluster.DeclaredPort {
	var out []cluster.DeclaredPort
	for _, cs := range [][]corev1.Container{p.Spec.InitContainers, p.Spec.Containers} {
		for _, c := range reservedPorts(cs) {
			for _, cp := range c.Ports {
				out = append(out, cluster.DeclaredPort{Container: c.Name, Port: uint16(cp.ContainerPort)})
			}
		}
	}
	return out
}

func serviceAccount(p *corev1.Pod) string {
	if p.Spec.ServiceAccountName == "" {
		return "default"
	}
	return p.Spec.ServiceAccountName
}

func toNamespace(n *corev1.Namespace) cluster.Namespace {
	return cluster.Namespace{Name: n.Name, Labels: n.Labels}
}
