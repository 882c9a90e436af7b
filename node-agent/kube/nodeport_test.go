package kube

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"reflect"
	"strings"
	"sync"
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

	"github.com/ambit-mesh/ambit/internal/testenv"
)

// nodeWith is a Node with addresses ("InternalIP=…", "ExternalIP=…",
// "Hostname=…").
func nodeWith(name, zone string, addrs ...string) *corev1.Node {
	n := node(name, zone)
	for _, a := range addrs {
		typ, ip, _ := strings.Cut(a, "=")
		n.Status.Addresses = append(n.Status.Addresses, corev1.NodeAddress{Type: corev1.NodeAddressType(typ), Address: ip})
	}
	return n
}

// nodePortService is a dual-stack NodePort Service "web" in shop: port
// http 80 → nodePort, port metrics 9100 without one, a UDP port with one
// (ignored: the mesh is TCP).
func nodePortService(nodePort int32) *corev1.Service {
	svc := webService()
	svc.Spec.Type = corev1.ServiceTypeNodePort
	svc.Spec.Ports[0].NodePort = nodePort
	svc.Spec.Ports[2].NodePort = 30053
	return svc
}

// A nodePort resolves, per family, to the cluster-wide endpoints: the
// externalIPs' list, not the clusterIP's when internalTrafficPolicy is
// Local (kube-proxy short-circuits pod traffic to the cluster policy
// chain), whatever externalTrafficPolicy says; the Service port's
// affinity is shared with its other addresses; a single-stack Service has
// no nodePort entry in the other family.
func TestServiceEntriesNodePorts(t *testing.T) {
	svc := nodePortService(30080)
	local := corev1.ServiceInternalTrafficPolicyLocal
	svc.Spec.InternalTrafficPolicy = &local
	svc.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
	svc.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
	ports := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}, {Name: ptr("dns"), Port: ptr[int32](53), Protocol: ptr(corev1.ProtocolUDP)}}
	sl := []*discoveryv1.EndpointSlice{
		slice("web-4", "web", discoveryv1.AddressTypeIPv4, ports, epOn("10.1.0.1", "node-a", nil), epOn("10.2.0.1", "node-b", nil)),
		slice("web-6", "web", discoveryv1.AddressTypeIPv6, ports, epOn("fd00:1::1", "node-a", nil), epOn("fd00:2::1", "node-b", nil)),
	}
	byAddr, nps := serviceEntries(svc, sl, Locality{Node: "node-a"}, nil)
	if eps := byAddr[netip.MustParseAddrPort("10.96.0.10:80")].Endpoints; !reflect.DeepEqual(eps, aps("10.1.0.1:8080")) {
		t.Fatalf("clusterIP under internalTrafficPolicy Local: %v, want node-a's endpoint", eps)
	}
	if len(nps) != 1 {
		t.Fatalf("nodePorts %v, want 30080 alone (no nodePort on metrics, dns is UDP)", nps)
	}
	np, ok := nps[30080]
	if !ok || !np.has[0] || !np.has[1] {
		t.Fatalf("nodePort 30080: %+v %v, want both families", np, ok)
	}
	if !reflect.DeepEqual(np.fam[0].Endpoints, aps("10.1.0.1:8080", "10.2.0.1:8080")) ||
		!reflect.DeepEqual(np.fam[1].Endpoints, aps("[fd00:1::1]:8080", "[fd00:2::1]:8080")) {
		t.Fatalf("nodePort endpoints v4 %v v6 %v, want every endpoint of each family", np.fam[0].Endpoints, np.fam[1].Endpoints)
	}
	want := byAddr[netip.MustParseAddrPort("10.96.0.10:80")].Affinity
	if want == nil || np.fam[0].Affinity != want || np.fam[1].Affinity != want {
		t.Fatalf("affinity: nodePort %+v/%+v, clusterIP %+v: want the one Service port's", np.fam[0].Affinity, np.fam[1].Affinity, want)
	}
	if got := ServiceEntries(svc, sl, Locality{Node: "node-a"}); !reflect.DeepEqual(endpointsOf(got), endpointsOf(byAddr)) {
		t.Fatalf("ServiceEntries %v differs from serviceEntries %v", endpointsOf(got), endpointsOf(byAddr))
	}

	single := nodePortService(30080)
	single.Spec.ClusterIPs = []string{"10.96.0.10"}
	_, nps = serviceEntries(single, sl, Locality{Node: "node-a"}, nil)
	if np := nps[30080]; !np.has[0] || np.has[1] {
		t.Fatalf("single-stack v4: %+v, want a v4 entry only", np)
	}
	headless := nodePortService(30080)
	headless.Spec.ClusterIP, headless.Spec.ClusterIPs = "None", []string{"None"}
	if _, nps := serviceEntries(headless, sl, Locality{Node: "node-a"}, nil); nps != nil {
		t.Fatalf("headless: %v, want no nodePort", nps)
	}
}

// resolves reports what the Source resolves addr to.
func resolves(s *Source, addr string) ([]netip.AddrPort, bool) {
	svc, ok := s.ServiceByAddr(netip.MustParseAddrPort(addr))
	return svc.Endpoints, ok
}

func wantResolves(t *testing.T, s *Source, what, addr string, want []netip.AddrPort) {
	t.Helper()
	eventually(t, what, func() bool {
		eps, ok := resolves(s, addr)
		if want == nil {
			return !ok
		}
		return ok && reflect.DeepEqual(eps, want)
	})
}

// <any node's InternalIP or ExternalIP>:<nodePort>, v4 and v6, resolves
// like the Service; nodes added, readdressed and removed, and nodePorts
// added, changed and removed, take effect without a restart.
func TestSourceNodePorts(t *testing.T) {
	ports := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}}
	v4 := aps("10.1.0.1:8080")
	v6 := aps("[fd00:1::1]:8080")
	svc := nodePortService(30080)
	client := fake.NewClientset(
		nodeWith("node-a", "", "InternalIP=172.18.0.2", "InternalIP=fd00:18::2", "ExternalIP=198.51.100.2", "Hostname=node-a"),
		nodeWith("node-b", "", "InternalIP=172.18.0.3"),
		svc,
		slice("web-4", "web", discoveryv1.AddressTypeIPv4, ports, ep("10.1.0.1", nil)),
		slice("web-6", "web", discoveryv1.AddressTypeIPv6, ports, ep("fd00:1::1", nil)))
	s, _ := startSource(t, client, Config{NodeName: "node-a"})
	for _, c := range []struct {
		addr string
		want []netip.AddrPort
	}{
		{"172.18.0.2:30080", v4},
		{"172.18.0.3:30080", v4}, // another node's address
		{"198.51.100.2:30080", v4},
		{"[fd00:18::2]:30080", v6},
		{"[::ffff:172.18.0.3]:30080", v4}, // v4-mapped, as a v6 socket reports it
		{"172.18.0.2:30081", nil},         // not a nodePort
		{"172.18.0.2:30053", nil},         // the UDP port's
		{"10.1.0.1:30080", nil},           // a pod, not a node
		{"172.18.0.9:30080", nil},         // no node has it
	} {
		eps, ok := resolves(s, c.addr)
		if c.want == nil {
			if ok {
				t.Errorf("%s resolved to %v, want passthrough (not a Service)", c.addr, eps)
			}
			continue
		}
		if !ok || !reflect.DeepEqual(eps, c.want) {
			t.Errorf("%s: %v %v, want %v", c.addr, eps, ok, c.want)
		}
	}

	ctx := context.Background()
	nodes := client.CoreV1().Nodes()
	if _, err := nodes.Create(ctx, nodeWith("node-c", "", "InternalIP=172.18.0.4"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	wantResolves(t, s, "node added", "172.18.0.4:30080", v4)
	if _, err := nodes.Update(ctx, nodeWith("node-b", "", "InternalIP=172.18.0.5"), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	wantResolves(t, s, "node readdressed: new address", "172.18.0.5:30080", v4)
	wantResolves(t, s, "node readdressed: old address gone", "172.18.0.3:30080", nil)
	// Two nodes listing one address (an address moving between nodes):
	// it stays a node address until neither lists it.
	if _, err := nodes.Create(ctx, nodeWith("node-d", "", "InternalIP=172.18.0.4"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "node-d seen", func() bool {
		s.svc.mu.RLock()
		defer s.svc.mu.RUnlock()
		return s.svc.nodeAddrs[netip.MustParseAddr("172.18.0.4")] == 2
	})
	if err := nodes.Delete(ctx, "node-c", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "node-c gone", func() bool {
		s.svc.mu.RLock()
		defer s.svc.mu.RUnlock()
		return s.svc.nodeAddrs[netip.MustParseAddr("172.18.0.4")] == 1
	})
	wantResolves(t, s, "address still node-d's", "172.18.0.4:30080", v4)
	if err := nodes.Delete(ctx, "node-d", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	wantResolves(t, s, "both nodes gone", "172.18.0.4:30080", nil)

	services := client.CoreV1().Services("shop")
	svc.Spec.Ports[0].NodePort = 30090
	if _, err := services.Update(ctx, svc, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	wantResolves(t, s, "nodePort changed: new port", "172.18.0.2:30090", v4)
	wantResolves(t, s, "nodePort changed: old port gone", "172.18.0.2:30080", nil)
	svc.Spec.Ports[1].NodePort = 30091
	if _, err := services.Update(ctx, svc, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	wantResolves(t, s, "nodePort added (metrics: no endpoint port)", "172.18.0.2:30091", aps())
	svc.Spec.Type = corev1.ServiceTypeClusterIP
	for i := range svc.Spec.Ports {
		svc.Spec.Ports[i].NodePort = 0
	}
	if _, err := services.Update(ctx, svc, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	wantResolves(t, s, "type ClusterIP: nodePort removed", "172.18.0.2:30090", nil)
	wantResolves(t, s, "type ClusterIP: the clusterIP stays", "10.96.0.10:80", v4)
	s.svc.mu.RLock()
	left := len(s.svc.byNodePort) + len(s.svc.portClaims) + len(s.svc.portsOwned)
	for _, w := range s.svc.nodePortBits {
		if w != 0 {
			left++
		}
	}
	s.svc.mu.RUnlock()
	if left != 0 {
		t.Fatalf("%d nodePort records left after the last one was removed", left)
	}
}

// The API server gives a freed nodePort to another Service; its event can
// come before the first Service's. The port must end up the second's,
// whichever order the two rebuilds run in.
func TestNodePortHandedOver(t *testing.T) {
	mk := func(name, ip string) *corev1.Service {
		svc := clusterIPService(name, ip, 80)
		svc.Spec.Type = corev1.ServiceTypeNodePort
		svc.Spec.Ports[0].NodePort = 30080
		return svc
	}
	ports := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}}
	web, api := mk("web", "10.96.0.10"), mk("api", "10.96.0.11")
	client := fake.NewClientset(nodeWith("node-a", "", "InternalIP=172.18.0.2"), web,
		slice("web-a", "web", discoveryv1.AddressTypeIPv4, ports, ep("10.1.0.1", nil)),
		slice("api-a", "api", discoveryv1.AddressTypeIPv4, ports, ep("10.1.0.2", nil)))
	s, _ := startSource(t, client, Config{NodeName: "node-a"})
	wantResolves(t, s, "web's", "172.18.0.2:30080", aps("10.1.0.1:8080"))
	ctx := context.Background()
	if _, err := client.CoreV1().Services("shop").Create(ctx, api, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	wantResolves(t, s, "api's (claimed second, both claim it)", "172.18.0.2:30080", aps("10.1.0.2:8080"))
	// A rebuild of web while it still claims the port (its slice
	// changed) takes it back for a moment...
	s.rebuildService("shop/web")
	if eps, _ := resolves(s, "172.18.0.2:30080"); !reflect.DeepEqual(eps, aps("10.1.0.1:8080")) {
		t.Fatalf("after web's rebuild: %v", eps)
	}
	// ...and web's release leaves it to api, not to nobody.
	web.Spec.Type = corev1.ServiceTypeClusterIP
	web.Spec.Ports[0].NodePort = 0
	if _, err := client.CoreV1().Services("shop").Update(ctx, web, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	wantResolves(t, s, "api's after web released it", "172.18.0.2:30080", aps("10.1.0.2:8080"))
}

// A ClusterRole that may read this node's Node but not list all of them:
// the agent becomes ready, warns once, keeps its topology (zone from its
// own Node) and passes NodePort connections through, as before NodePorts
// were resolved.
func TestNodesForbiddenMeansNoNodePorts(t *testing.T) {
	ports := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}}
	sl := slice("web-a", "web", discoveryv1.AddressTypeIPv4, ports,
		hinted("10.1.0.1", "node-a", "z1", zones("z1"), nil, nil),
		hinted("10.2.0.1", "node-b", "z2", zones("z2"), nil, nil))
	svc := clusterIPService("web", "10.96.0.10", 80)
	svc.Spec.Type = corev1.ServiceTypeNodePort
	svc.Spec.Ports[0].NodePort = 30080
	client := fake.NewClientset(nodeWith("node-a", "z1", "InternalIP=172.18.0.2"), svc, sl)
	var lists, forbidden int
	var mu sync.Mutex
	client.PrependReactor("list", "nodes", func(a ktesting.Action) (bool, runtime.Object, error) {
		mu.Lock()
		defer mu.Unlock()
		lists++
		// RBAC can allow a list narrowed to one name (resourceNames
		// with a metadata.name field selector); the fake ignores field
		// selectors, so the reactor refuses the unnarrowed list.
		if f := a.(ktesting.ListAction).GetListRestrictions().Fields; f != nil && strings.Contains(f.String(), "metadata.name=node-a") {
			return false, nil, nil
		}
		forbidden++
		return true, nil, apierrors.NewForbidden(corev1.Resource("nodes"), "", errors.New("RBAC: nodes is forbidden"))
	})
	logs := &testenv.Buffer{}
	s, _ := startSource(t, client, Config{NodeName: "node-a", Logger: slog.New(slog.NewTextHandler(logs, nil))})
	if eps, ok := resolves(s, "10.96.0.10:80"); !ok || !reflect.DeepEqual(eps, aps("10.1.0.1:8080")) {
		t.Fatalf("clusterIP: %v %v, want z1's endpoint (own node's zone still read)", eps, ok)
	}
	if eps, ok := resolves(s, "172.18.0.2:30080"); ok {
		t.Fatalf("nodePort resolved to %v without the Node list, want passthrough", eps)
	}
	// The informer keeps retrying the list; the warning stays one.
	eventually(t, "a retried list", func() bool { mu.Lock(); defer mu.Unlock(); return forbidden >= 2 })
	if n := strings.Count(logs.String(), "may not list Nodes"); n != 1 {
		t.Fatalf("%d warnings about the Node list, want 1:\n%s", n, logs.String())
	}
	if strings.Contains(logs.String(), "may not read this node's Node") {
		t.Fatalf("own Node reported forbidden:\n%s", logs.String())
	}
}

// The transform keeps what NodePorts need and nothing the kubelet churns.
func TestTrimNodeAddresses(t *testing.T) {
	n := nodeWith("node-a", "z1", "InternalIP=172.18.0.2", "Hostname=node-a", "ExternalIP=198.51.100.2", "InternalDNS=node-a.internal")
	n.Status.Images = []corev1.ContainerImage{{Names: []string{"registry.example/app:v1"}, SizeBytes: 1 << 20}}
	got, _ := TrimNode(n)
	tn := got.(*corev1.Node)
	want := []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "172.18.0.2"}, {Type: corev1.NodeExternalIP, Address: "198.51.100.2"}}
	if !reflect.DeepEqual(tn.Status.Addresses, want) || tn.Status.Images != nil {
		t.Fatalf("trimmed node status: %+v", tn.Status)
	}
	bad := nodeWith("node-b", "", "InternalIP=not-an-ip", "InternalIP=::", "ExternalIP=172.18.0.3", "InternalIP=172.18.0.3")
	if ips := nodeIPs(bad); !reflect.DeepEqual(ips, []netip.Addr{netip.MustParseAddr("172.18.0.3")}) {
		t.Fatalf("nodeIPs: %v", ips)
	}
}

// RBAC fixed while the agent runs: the Node list is retried, and NodePorts
// resolve once it is allowed, without a restart.
func TestNodesAllowedLaterResolvesNodePorts(t *testing.T) {
	ports := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}}
	svc := clusterIPService("web", "10.96.0.10", 80)
	svc.Spec.Type = corev1.ServiceTypeNodePort
	svc.Spec.Ports[0].NodePort = 30080
	client := fake.NewClientset(nodeWith("node-a", "", "InternalIP=172.18.0.2"), svc,
		slice("web-a", "web", discoveryv1.AddressTypeIPv4, ports, ep("10.1.0.1", nil)))
	var allowed atomic.Bool
	client.PrependReactor("list", "nodes", func(ktesting.Action) (bool, runtime.Object, error) {
		if allowed.Load() {
			return false, nil, nil
		}
		return true, nil, apierrors.NewForbidden(corev1.Resource("nodes"), "", errors.New("RBAC: nodes is forbidden"))
	})
	s, _ := startSource(t, client, Config{NodeName: "node-a"})
	if eps, ok := resolves(s, "172.18.0.2:30080"); ok {
		t.Fatalf("forbidden: resolved to %v, want passthrough", eps)
	}
	allowed.Store(true)
	start := time.Now()
	for {
		if eps, ok := resolves(s, "172.18.0.2:30080"); ok && reflect.DeepEqual(eps, aps("10.1.0.1:8080")) {
			t.Logf("NodePort resolved %v after the list was allowed", time.Since(start).Round(time.Millisecond))
			return
		}
		if time.Since(start) > 45*time.Second {
			t.Fatal("45 s after the Node list became allowed, the NodePort is still passed through")
		}
		time.Sleep(50 * time.Millisecond)
	}
}
