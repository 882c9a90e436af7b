package kube

import (
	"context"
	"errors"
	"net/netip"
	"reflect"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	ktesting "k8s.io/client-go/testing"

	"github.com/ambit-mesh/ambit/tunnel"
)

// hinted is an endpoint on node in zone, with the hints the EndpointSlice
// controller writes (forZones for PreferClose / PreferSameZone, forNodes
// too for PreferSameNode); empty hint lists leave that hint out.
func hinted(addr, node, zone string, forZones, forNodes []string, ready *bool) discoveryv1.Endpoint {
	e := epOn(addr, node, ready)
	e.Zone = ptr(zone)
	if len(forZones)+len(forNodes) > 0 {
		e.Hints = &discoveryv1.EndpointHints{}
	}
	for _, z := range forZones {
		e.Hints.ForZones = append(e.Hints.ForZones, discoveryv1.ForZone{Name: z})
	}
	for _, n := range forNodes {
		e.Hints.ForNodes = append(e.Hints.ForNodes, discoveryv1.ForNode{Name: n})
	}
	return e
}

func zones(z ...string) []string { return z }

func node(name, zone string) *corev1.Node {
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"kubernetes.io/hostname": name}}}
	if zone != "" {
		n.Labels[corev1.LabelTopologyZone] = zone
	}
	return n
}

// kube-proxy's topology rules (topologyModeFromHints), one case each.
func TestServiceEntriesTopologyHints(t *testing.T) {
	ports := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}}
	termination := func(e discoveryv1.Endpoint) discoveryv1.Endpoint {
		e.Conditions = discoveryv1.EndpointConditions{Ready: ptr(false), Serving: ptr(true), Terminating: ptr(true)}
		return e
	}
	z1a := hinted("10.1.0.1", "node-a", "z1", zones("z1"), nil, nil)
	z1b := hinted("10.1.0.2", "node-b", "z1", zones("z1"), nil, nil)
	z2c := hinted("10.2.0.1", "node-c", "z2", zones("z2"), nil, nil)
	bare := hinted("10.2.0.2", "node-d", "z2", nil, nil, nil)
	// PreferSameNode: each endpoint hinted for its own node and zone.
	nodeA := hinted("10.1.0.1", "node-a", "z1", zones("z1"), []string{"node-a"}, nil)
	nodeB := hinted("10.1.0.2", "node-b", "z1", zones("z1"), []string{"node-b"}, nil)
	nodeC := hinted("10.2.0.1", "node-c", "z2", zones("z2"), []string{"node-c"}, nil)
	for _, c := range []struct {
		name string
		loc  Locality
		eps  []discoveryv1.Endpoint
		want []netip.AddrPort
	}{
		{"every ready endpoint hinted: our zone's only", Locality{"node-a", "z1"}, []discoveryv1.Endpoint{z1a, z1b, z2c}, aps("10.1.0.1:8080", "10.1.0.2:8080")},
		{"the other zone's client", Locality{"node-c", "z2"}, []discoveryv1.Endpoint{z1a, z1b, z2c}, aps("10.2.0.1:8080")},
		{"one ready endpoint without hints: all", Locality{"node-a", "z1"}, []discoveryv1.Endpoint{z1a, z2c, bare}, aps("10.1.0.1:8080", "10.2.0.1:8080", "10.2.0.2:8080")},
		{"an unhinted endpoint that is not ready does not count", Locality{"node-a", "z1"}, []discoveryv1.Endpoint{z1a, z2c, hinted("10.2.0.2", "node-d", "z2", nil, nil, ptr(false))}, aps("10.1.0.1:8080")},
		{"node's zone unknown: all", Locality{"node-a", ""}, []discoveryv1.Endpoint{z1a, z1b, z2c}, aps("10.1.0.1:8080", "10.1.0.2:8080", "10.2.0.1:8080")},
		{"nothing hinted for our zone: all", Locality{"node-e", "z3"}, []discoveryv1.Endpoint{z1a, z1b, z2c}, aps("10.1.0.1:8080", "10.1.0.2:8080", "10.2.0.1:8080")},
		{"a hint for several zones", Locality{"node-c", "z2"}, []discoveryv1.Endpoint{hinted("10.1.0.1", "node-a", "z1", zones("z1", "z2"), nil, nil), z1b, z2c}, aps("10.1.0.1:8080", "10.2.0.1:8080")},
		{"PreferSameNode: our node's only", Locality{"node-a", "z1"}, []discoveryv1.Endpoint{nodeA, nodeB, nodeC}, aps("10.1.0.1:8080")},
		{"PreferSameNode, none on our node: our zone's", Locality{"node-e", "z1"}, []discoveryv1.Endpoint{nodeA, nodeB, nodeC}, aps("10.1.0.1:8080", "10.1.0.2:8080")},
		{"node hints on some endpoints only: zone hints decide", Locality{"node-a", "z1"}, []discoveryv1.Endpoint{nodeA, z1b, z2c}, aps("10.1.0.1:8080", "10.1.0.2:8080")},
		{"no ready endpoint: serving terminating ones, hints or not", Locality{"node-a", "z1"}, []discoveryv1.Endpoint{termination(z1a), termination(z2c)}, aps("10.1.0.1:8080", "10.2.0.1:8080")},
		{"ready endpoints only elsewhere still win over our zone's terminating one", Locality{"node-a", "z1"}, []discoveryv1.Endpoint{termination(z1a), z2c}, aps("10.2.0.1:8080")},
	} {
		t.Run(c.name, func(t *testing.T) {
			got := ServiceEntries(clusterIPService("web", "10.96.0.10", 80), []*discoveryv1.EndpointSlice{slice("web-a", "web", discoveryv1.AddressTypeIPv4, ports, c.eps...)}, c.loc)
			if eps := got[netip.MustParseAddrPort("10.96.0.10:80")].Endpoints; !reflect.DeepEqual(eps, c.want) {
				t.Fatalf("on %s in zone %q: %v, want %v", c.loc.Node, c.loc.Zone, eps, c.want)
			}
		})
	}
}

// internalTrafficPolicy Local ignores hints (this node's endpoints, as
// before); a pod's connection to an external address takes the
// cluster-wide endpoints, hints applied, as kube-proxy's cluster policy
// chain.
func TestTopologyWithLocalPolicyAndExternalIPs(t *testing.T) {
	svc := clusterIPService("web", "10.96.0.10", 80)
	local := corev1.ServiceInternalTrafficPolicyLocal
	svc.Spec.InternalTrafficPolicy = &local
	svc.Spec.ExternalIPs = []string{"203.0.113.7"}
	ports := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}}
	sl := slice("web-a", "web", discoveryv1.AddressTypeIPv4, ports,
		hinted("10.1.0.1", "node-a", "z1", zones("z2"), nil, nil), // hinted away from its zone (the controller balances load)
		hinted("10.1.0.2", "node-b", "z1", zones("z1"), nil, nil),
		hinted("10.2.0.1", "node-c", "z2", zones("z2"), nil, nil))
	got := ServiceEntries(svc, []*discoveryv1.EndpointSlice{sl}, Locality{"node-a", "z1"})
	if eps := got[netip.MustParseAddrPort("10.96.0.10:80")].Endpoints; !reflect.DeepEqual(eps, aps("10.1.0.1:8080")) {
		t.Errorf("Local policy: %v, want node-a's endpoint whatever its hints", eps)
	}
	if eps := got[netip.MustParseAddrPort("203.0.113.7:80")].Endpoints; !reflect.DeepEqual(eps, aps("10.1.0.2:8080")) {
		t.Errorf("externalIP: %v, want the endpoint hinted for z1", eps)
	}
}

// The agent reads its own Node's zone label (and only its own: another
// node's zone must not count) and applies the slices' hints with it; a
// relabelled node, or a slice losing its hints, takes effect without a
// restart.
func TestSourceTopologyFromNodeZone(t *testing.T) {
	ports := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}}
	sl := slice("web-a", "web", discoveryv1.AddressTypeIPv4, ports,
		hinted("10.1.0.1", "node-a", "z1", zones("z1"), nil, nil),
		hinted("10.2.0.1", "node-b", "z2", zones("z2"), nil, nil))
	me := node("node-a", "z1")
	// node-b sorts after node-a: were the field selector ignored and
	// every Node taken, its zone would be the last one applied.
	client := fake.NewClientset(me, node("node-b", "z2"), clusterIPService("web", "10.96.0.10", 80), sl)
	s, _ := startSource(t, client, Config{NodeName: "node-a"})
	vip := netip.MustParseAddrPort("10.96.0.10:80")
	if eps, _ := s.ServiceEndpoints(vip); !reflect.DeepEqual(eps, aps("10.1.0.1:8080")) {
		t.Fatalf("node-a in z1, every endpoint hinted: %v, want z1's endpoint 10.1.0.1:8080 only", eps)
	}
	ctx := context.Background()
	me.Labels[corev1.LabelTopologyZone] = "z2"
	if _, err := client.CoreV1().Nodes().Update(ctx, me, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "node moved to z2", func() bool {
		eps, _ := s.ServiceEndpoints(vip)
		return reflect.DeepEqual(eps, aps("10.2.0.1:8080"))
	})
	delete(me.Labels, corev1.LabelTopologyZone)
	if _, err := client.CoreV1().Nodes().Update(ctx, me, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "zone label removed: all endpoints", func() bool {
		eps, _ := s.ServiceEndpoints(vip)
		return reflect.DeepEqual(eps, aps("10.1.0.1:8080", "10.2.0.1:8080"))
	})
	me.Labels[corev1.LabelTopologyZone] = "z1"
	if _, err := client.CoreV1().Nodes().Update(ctx, me, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "back in z1", func() bool {
		eps, _ := s.ServiceEndpoints(vip)
		return reflect.DeepEqual(eps, aps("10.1.0.1:8080"))
	})
	// The Service's trafficDistribution removed: the controller drops
	// the hints, and every endpoint is used again.
	sl.Endpoints[1].Hints = nil
	if _, err := client.DiscoveryV1().EndpointSlices("shop").Update(ctx, sl, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "an endpoint without hints", func() bool {
		eps, _ := s.ServiceEndpoints(vip)
		return reflect.DeepEqual(eps, aps("10.1.0.1:8080", "10.2.0.1:8080"))
	})
}

// sessionAffinity ClientIP reaches the tunnel: its timeout (default 3 h)
// and one Service port identity for the clusterIP and the externalIP;
// None (and a change back to it) is no affinity.
func TestSourceSessionAffinity(t *testing.T) {
	svc := clusterIPService("web", "10.96.0.10", 80)
	svc.Spec.ExternalIPs = []string{"203.0.113.7"}
	svc.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
	svc.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: ptr[int32](600)}}
	dflt := clusterIPService("api", "10.96.0.11", 443)
	dflt.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
	none := clusterIPService("db", "10.96.0.12", 5432)
	none.Spec.SessionAffinity = corev1.ServiceAffinityNone
	ports := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}}
	client := fake.NewClientset(svc, dflt, none, slice("web-a", "web", discoveryv1.AddressTypeIPv4, ports, ep("10.1.0.1", nil)))
	s, _ := startSource(t, client, Config{})
	for _, c := range []struct {
		vip  string
		want tunnel.Service
	}{
		{"10.96.0.10:80", tunnel.Service{Endpoints: aps("10.1.0.1:8080"), Affinity: &tunnel.Affinity{Timeout: 10 * time.Minute, Port: "shop/web:http"}}},
		{"203.0.113.7:80", tunnel.Service{Endpoints: aps("10.1.0.1:8080"), Affinity: &tunnel.Affinity{Timeout: 10 * time.Minute, Port: "shop/web:http"}}},
		{"10.96.0.11:443", tunnel.Service{Endpoints: aps(), Affinity: &tunnel.Affinity{Timeout: 3 * time.Hour, Port: "shop/api:http"}}},
		{"10.96.0.12:5432", tunnel.Service{Endpoints: aps()}},
	} {
		if got, ok := s.ServiceByAddr(netip.MustParseAddrPort(c.vip)); !ok || !reflect.DeepEqual(got, c.want) {
			t.Errorf("%s: %v %+v (%v), want %v %+v", c.vip, got.Endpoints, got.Affinity, ok, c.want.Endpoints, c.want.Affinity)
		}
	}
	svc.Spec.SessionAffinity, svc.Spec.SessionAffinityConfig = corev1.ServiceAffinityNone, nil
	if _, err := client.CoreV1().Services("shop").Update(context.Background(), svc, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "affinity turned off", func() bool {
		got, _ := s.ServiceByAddr(netip.MustParseAddrPort("10.96.0.10:80"))
		return got.Affinity == nil
	})
}

// A timeout the API server would refuse falls back to its default.
func TestSessionAffinityTimeoutBounds(t *testing.T) {
	for _, secs := range []int32{0, -1, 86401} {
		svc := clusterIPService("web", "10.96.0.10", 80)
		svc.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
		svc.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: ptr(secs)}}
		if got := sessionAffinity(svc); got != 3*time.Hour {
			t.Errorf("timeoutSeconds %d: %v, want the default 3h", secs, got)
		}
	}
}

// The Node cache keeps the zone label and nothing the kubelet churns.
func TestTrimNode(t *testing.T) {
	n := node("node-a", "z1")
	n.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue}}
	n.Annotations = map[string]string{"node.alpha.kubernetes.io/ttl": "0"}
	got, _ := TrimNode(n)
	tn := got.(*corev1.Node)
	if tn.Name != "node-a" || !reflect.DeepEqual(tn.Labels, map[string]string{corev1.LabelTopologyZone: "z1"}) ||
		len(tn.Status.Conditions) != 0 || tn.Annotations != nil {
		t.Fatalf("trimmed node: %+v", tn)
	}
	if got, _ := TrimNode(node("node-b", "")); got.(*corev1.Node).Labels != nil {
		t.Fatalf("node without a zone kept labels %v", got.(*corev1.Node).Labels)
	}
}

// An agent whose ClusterRole predates topology (an image-only upgrade)
// may not read its Node. It must still become ready, without topology:
// every endpoint, as for a node without a zone label. Before, WaitSynced
// waited for the Node informer forever, and a surge rollout stalled.
func TestNodeForbiddenMeansNoTopology(t *testing.T) {
	ports := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}}
	sl := slice("web-a", "web", discoveryv1.AddressTypeIPv4, ports,
		hinted("10.1.0.1", "node-a", "z1", zones("z1"), nil, nil),
		hinted("10.2.0.1", "node-b", "z2", zones("z2"), nil, nil))
	client := fake.NewClientset(node("node-a", "z1"), clusterIPService("web", "10.96.0.10", 80), sl)
	client.PrependReactor("list", "nodes", func(ktesting.Action) (bool, runtime.Object, error) {
		return true, nil, apierrors.NewForbidden(corev1.Resource("nodes"), "", errors.New("RBAC: nodes is forbidden"))
	})
	s, _ := startSource(t, client, Config{NodeName: "node-a"})
	if eps, _ := s.ServiceEndpoints(netip.MustParseAddrPort("10.96.0.10:80")); !reflect.DeepEqual(eps, aps("10.1.0.1:8080", "10.2.0.1:8080")) {
		t.Fatalf("zone unknown: %v, want every endpoint", eps)
	}
}

// RBAC fixed while the agent runs (the ClusterRole updated after an
// image-only upgrade): the Node informer keeps retrying its list, and
// once it may read the Node the zone applies without a restart.
func TestNodeAllowedLaterAppliesZone(t *testing.T) {
	ports := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}}
	sl := slice("web-a", "web", discoveryv1.AddressTypeIPv4, ports,
		hinted("10.1.0.1", "node-a", "z1", zones("z1"), nil, nil),
		hinted("10.2.0.1", "node-b", "z2", zones("z2"), nil, nil))
	client := fake.NewClientset(node("node-a", "z1"), clusterIPService("web", "10.96.0.10", 80), sl)
	var allowed atomic.Bool
	client.PrependReactor("list", "nodes", func(ktesting.Action) (bool, runtime.Object, error) {
		if allowed.Load() {
			return false, nil, nil
		}
		return true, nil, apierrors.NewForbidden(corev1.Resource("nodes"), "", errors.New("RBAC: nodes is forbidden"))
	})
	s, _ := startSource(t, client, Config{NodeName: "node-a"})
	if eps, _ := s.ServiceEndpoints(netip.MustParseAddrPort("10.96.0.10:80")); !reflect.DeepEqual(eps, aps("10.1.0.1:8080", "10.2.0.1:8080")) {
		t.Fatalf("zone unknown: %v, want every endpoint", eps)
	}
	allowed.Store(true)
	deadline := time.Now().Add(45 * time.Second)
	for {
		eps, _ := s.ServiceEndpoints(netip.MustParseAddrPort("10.96.0.10:80"))
		if reflect.DeepEqual(eps, aps("10.1.0.1:8080")) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("45 s after the Node became readable: %v, want the zone's endpoint only", eps)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
