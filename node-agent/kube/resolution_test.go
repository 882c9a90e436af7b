package kube

import (
	"context"
	"net/http"
	"net/netip"
	"reflect"
	"sync"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

// serviceWatches takes over the Service watch of a fake clientset, so a
// test can cut it the way the API server does when the resource version
// it resumes from is too old (410 Gone): the reflector then lists again,
// and the informer delivers the listed objects first and the ones missing
// from the list (deleted while the watch was down) after them, as
// DeletedFinalStateUnknown (client-go's DeltaFIFO.Replace).
type serviceWatches struct {
	mu      sync.Mutex
	current *watch.FakeWatcher
	opened  chan struct{}
}

func takeOverServiceWatch(client *fake.Clientset) *serviceWatches {
	w := &serviceWatches{opened: make(chan struct{}, 16)}
	client.PrependWatchReactor("services", func(k8stesting.Action) (bool, watch.Interface, error) {
		fw := watch.NewFakeWithChanSize(16, false)
		w.mu.Lock()
		w.current = fw
		w.mu.Unlock()
		w.opened <- struct{}{}
		return true, fw, nil
	})
	return w
}

// expire ends the current watch with 410 Gone and waits for the next one
// (opened after the relist).
func (w *serviceWatches) expire(t *testing.T) {
	t.Helper()
	w.mu.Lock()
	fw := w.current
	w.mu.Unlock()
	fw.Error(&metav1.Status{Status: metav1.StatusFailure, Code: http.StatusGone, Reason: metav1.StatusReasonExpired, Message: "too old resource version"})
	<-w.opened
}

func (w *serviceWatches) add(obj runtime.Object) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.current.Add(obj)
}

func clusterIPService(name, ip string, port int32) *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "shop"},
		Spec: corev1.ServiceSpec{ClusterIP: ip, ClusterIPs: []string{ip},
			Ports: []corev1.ServicePort{{Name: "http", Port: port, Protocol: corev1.ProtocolTCP}}},
	}
}

// A ClusterIP freed by a deleted Service and given to a new one while the
// agent's watch was down: after the relist the new Service must own it.
// The informer delivers the new Service first and the old one's deletion
// after it, and that deletion used to take the VIP away from the new
// owner: connections to it were then passed through as if to a pod
// (plaintext via kube-proxy to the meshed endpoints).
func TestClusterIPReusedAcrossARelist(t *testing.T) {
	ports := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}}
	client := fake.NewClientset(clusterIPService("old", "10.96.0.10", 80),
		slice("old-a", "old", discoveryv1.AddressTypeIPv4, ports, ep("10.1.0.1", nil)))
	watches := takeOverServiceWatch(client)
	s, _ := startSource(t, client, Config{})
	<-watches.opened
	vip := netip.MustParseAddrPort("10.96.0.10:80")
	if eps, ok := s.ServiceEndpoints(vip); !ok || !reflect.DeepEqual(eps, aps("10.1.0.1:8080")) {
		t.Fatalf("before: %v %v", eps, ok)
	}

	// While the Service watch is down: "old" is deleted, "new" gets its
	// ClusterIP. The tracker changes without telling the (taken over)
	// watch; the slices' watch still works.
	ctx := context.Background()
	gvr := corev1.SchemeGroupVersion.WithResource("services")
	if err := client.Tracker().Delete(gvr, "shop", "old"); err != nil {
		t.Fatal(err)
	}
	if err := client.Tracker().Add(clusterIPService("new", "10.96.0.10", 80)); err != nil {
		t.Fatal(err)
	}
	if _, err := client.DiscoveryV1().EndpointSlices("shop").Create(ctx,
		slice("new-a", "new", discoveryv1.AddressTypeIPv4, ports, ep("10.1.0.2", nil)), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	watches.expire(t)
	// A marker Service sent on the new watch: once it resolves, every
	// event of the relist before it has been handled.
	watches.add(clusterIPService("marker", "10.96.0.99", 80))
	eventually(t, "the marker service", func() bool {
		_, ok := s.ServiceEndpoints(netip.MustParseAddrPort("10.96.0.99:80"))
		return ok
	})
	if eps, ok := s.ServiceEndpoints(vip); !ok || !reflect.DeepEqual(eps, aps("10.1.0.2:8080")) {
		t.Fatalf("after the relist the reused ClusterIP resolves to %v (known: %v), want the new Service's endpoint 10.1.0.2:8080", eps, ok)
	}
}

// An IP claimed by two live pods in the cache: the old owner's sandbox is
// gone (eviction, a sandbox recreated with a new IP) but the kubelet's
// status updates for it trail behind, and a new pod already has the IP.
// A late status update of the old pod (here its Ready condition) must not
// take the IP back: the client would expect the old pod's identity (TLS
// to the new one fails) or, were the old pod not meshed and the new one
// meshed, send plaintext to a meshed pod.
func TestStaleStatusUpdateDoesNotRetakeAReusedIP(t *testing.T) {
	old := pod("shop", "old", "", "node-b", []string{"10.1.0.9"}, nil, nil) // not meshed
	client := fake.NewClientset(old)
	s, _ := startSource(t, client, Config{})
	ip := netip.MustParseAddr("10.1.0.9")
	ctx := context.Background()
	fresh := pod("other", "new", "", "node-b", []string{"10.1.0.9"}, nil, enabled)
	if _, err := client.CoreV1().Pods("other").Create(ctx, fresh, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "new owner", func() bool { wl, ok := s.WorkloadByIP(ip); return ok && wl.UID == "uid-new" })

	old.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionFalse}}
	if _, err := client.CoreV1().Pods("shop").UpdateStatus(ctx, old, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	// A marker pod: once it is seen, the update before it was handled
	// (one informer, in order).
	if _, err := client.CoreV1().Pods("shop").Create(ctx, pod("shop", "marker", "", "node-b", []string{"10.1.0.99"}, nil, nil), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "marker", func() bool { _, ok := s.WorkloadByIP(netip.MustParseAddr("10.1.0.99")); return ok })
	if wl, ok := s.WorkloadByIP(ip); !ok || wl.UID != "uid-new" || !wl.Meshed || wl.Identity != "spiffe://cluster.local/ns/other/sa/sa-new" {
		t.Fatalf("after the old pod's status update 10.1.0.9 is %s/%s (uid %s, meshed %v, identity %s), want other/new, meshed", wl.Namespace, wl.Name, wl.UID, wl.Meshed, wl.Identity)
	}
}

// The EndpointSlice API: "serving ... A nil value should be interpreted
// as true", and kube-proxy falls back to serving terminating endpoints
// when no endpoint is ready. An endpoint written without the serving
// condition (slices from a controller other than Kubernetes' own, older
// mirrors) that is terminating is such a fallback.
func TestServingNilMeansServing(t *testing.T) {
	ports := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}}
	term := discoveryv1.Endpoint{Addresses: []string{"10.1.0.7"}, Conditions: discoveryv1.EndpointConditions{
		Ready: ptr(false), Terminating: ptr(true)}}
	notServing := discoveryv1.Endpoint{Addresses: []string{"10.1.0.8"}, Conditions: discoveryv1.EndpointConditions{
		Ready: ptr(false), Serving: ptr(false), Terminating: ptr(true)}}
	got := endpointsOf(ServiceEntries(webService(), []*discoveryv1.EndpointSlice{slice("s", "web", discoveryv1.AddressTypeIPv4, ports, term, notServing)}, Locality{Node: "node-a"}))
	if eps := got[netip.MustParseAddrPort("10.96.0.10:80")]; !reflect.DeepEqual(eps, aps("10.1.0.7:8080")) {
		t.Fatalf("terminating endpoint without the serving condition: got %v, want [10.1.0.7:8080] (and never the not-serving 10.1.0.8)", eps)
	}
}

func epOn(addr, node string, ready *bool) discoveryv1.Endpoint {
	e := ep(addr, ready)
	e.NodeName = ptr(node)
	return e
}

// internalTrafficPolicy: Local (node-local DNS caches, log and metrics
// agents): kube-proxy sends a pod's connection to the ClusterIP only to
// endpoints on the pod's own node, and drops it when there is none. The
// agent serves the pods of its node, so its node is the client's.
func TestInternalTrafficPolicyLocal(t *testing.T) {
	svc := clusterIPService("node-cache", "10.96.0.53", 80)
	local := corev1.ServiceInternalTrafficPolicyLocal
	svc.Spec.InternalTrafficPolicy = &local
	ports := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}}
	termLocal := epOn("10.1.0.3", "node-a", ptr(false))
	termLocal.Conditions.Serving, termLocal.Conditions.Terminating = ptr(true), ptr(true)
	sl := slice("node-cache-a", "node-cache", discoveryv1.AddressTypeIPv4, ports,
		epOn("10.1.0.1", "node-a", nil), epOn("10.2.0.1", "node-b", nil), termLocal)
	client := fake.NewClientset(svc, sl)
	s, _ := startSource(t, client, Config{NodeName: "node-a"})
	vip := netip.MustParseAddrPort("10.96.0.53:80")
	if eps, ok := s.ServiceEndpoints(vip); !ok || !reflect.DeepEqual(eps, aps("10.1.0.1:8080")) {
		t.Fatalf("Local policy on node-a resolves to %v (%v), want only node-a's ready endpoint 10.1.0.1:8080", eps, ok)
	}
	// The local endpoint stops being ready: the local serving terminating
	// one, never the other node's ready one.
	ctx := context.Background()
	sl.Endpoints[0].Conditions.Ready = ptr(false)
	if _, err := client.DiscoveryV1().EndpointSlices("shop").Update(ctx, sl, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "local terminating fallback", func() bool {
		eps, _ := s.ServiceEndpoints(vip)
		return reflect.DeepEqual(eps, aps("10.1.0.3:8080"))
	})
	// No local endpoint at all: known Service, nothing to send to.
	sl.Endpoints = sl.Endpoints[1:2]
	if _, err := client.DiscoveryV1().EndpointSlices("shop").Update(ctx, sl, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "no local endpoint", func() bool {
		eps, ok := s.ServiceEndpoints(vip)
		return ok && len(eps) == 0
	})
	// Cluster (the default) uses every node's endpoints.
	svc.Spec.InternalTrafficPolicy = nil
	if _, err := client.CoreV1().Services("shop").Update(ctx, svc, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "cluster policy", func() bool {
		eps, _ := s.ServiceEndpoints(vip)
		return reflect.DeepEqual(eps, aps("10.2.0.1:8080"))
	})
}

// A pod connecting to a Service's LoadBalancer ingress IP or one of its
// externalIPs (apps configured with the public URL): kube-proxy
// short-circuits it to the Service's endpoints inside the cluster. The
// agent passed it through as if to an outside address, so it reached a
// meshed endpoint in plaintext through kube-proxy (refused in strict
// mode). Not for an ingress IP with ipMode Proxy: that traffic really
// goes to the load balancer.
func TestLoadBalancerAndExternalIPsAreServiceAddresses(t *testing.T) {
	svc := clusterIPService("web", "10.96.0.10", 80)
	svc.Spec.Type = corev1.ServiceTypeLoadBalancer
	local := corev1.ServiceInternalTrafficPolicyLocal
	svc.Spec.InternalTrafficPolicy = &local // internal only: not for external addresses
	svc.Spec.ExternalIPs = []string{"203.0.113.7"}
	proxy := corev1.LoadBalancerIPModeProxy
	svc.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{
		{IP: "198.51.100.20"},
		{Hostname: "lb.example"},
		{IP: "198.51.100.21", IPMode: &proxy},
	}
	ports := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}}
	client := fake.NewClientset(svc, slice("web-a", "web", discoveryv1.AddressTypeIPv4, ports,
		epOn("10.1.0.1", "node-a", nil), epOn("10.2.0.1", "node-b", nil)))
	s, _ := startSource(t, client, Config{NodeName: "node-a"})
	for _, vip := range []string{"198.51.100.20:80", "203.0.113.7:80"} {
		if eps, ok := s.ServiceEndpoints(netip.MustParseAddrPort(vip)); !ok || !reflect.DeepEqual(eps, aps("10.1.0.1:8080", "10.2.0.1:8080")) {
			t.Errorf("%s resolves to %v (a Service address: %v), want the Service's endpoints [10.1.0.1:8080 10.2.0.1:8080]", vip, eps, ok)
		}
	}
	if eps, ok := s.ServiceEndpoints(netip.MustParseAddrPort("198.51.100.21:80")); ok {
		t.Errorf("ingress IP with ipMode Proxy resolves to %v: it belongs to the load balancer", eps)
	}
	if eps, _ := s.ServiceEndpoints(netip.MustParseAddrPort("10.96.0.10:80")); !reflect.DeepEqual(eps, aps("10.1.0.1:8080")) {
		t.Errorf("ClusterIP keeps the internal policy: %v", eps)
	}
}

// What kube-proxy ignores has no entry: an ExternalName Service, and the
// external addresses of a headless one.
func TestExternalNameAndHeadlessHaveNoAddresses(t *testing.T) {
	ports := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}}
	sl := []*discoveryv1.EndpointSlice{slice("web-a", "web", discoveryv1.AddressTypeIPv4, ports, ep("10.1.0.1", nil))}
	headless := clusterIPService("web", corev1.ClusterIPNone, 80)
	headless.Spec.ExternalIPs = []string{"203.0.113.7"}
	if got := ServiceEntries(headless, sl, Locality{Node: "node-a"}); len(got) != 0 {
		t.Errorf("headless with externalIPs: %v", got)
	}
	ext := clusterIPService("web", "", 80)
	ext.Spec.ClusterIPs = nil
	ext.Spec.Type, ext.Spec.ExternalName = corev1.ServiceTypeExternalName, "db.example"
	ext.Spec.ExternalIPs = []string{"203.0.113.7"}
	if got := ServiceEntries(ext, sl, Locality{Node: "node-a"}); len(got) != 0 {
		t.Errorf("ExternalName: %v", got)
	}
}

// A slice deleted from a Service of several, and spec.ports changing: the
// index follows both (old port gone, new port resolved).
func TestSliceDeletedAndPortsChanged(t *testing.T) {
	ports := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}}
	svc := clusterIPService("web", "10.96.0.10", 80)
	client := fake.NewClientset(svc,
		slice("web-a", "web", discoveryv1.AddressTypeIPv4, ports, ep("10.1.0.1", nil)),
		slice("web-b", "web", discoveryv1.AddressTypeIPv4, ports, ep("10.1.0.2", nil)))
	s, _ := startSource(t, client, Config{})
	vip := netip.MustParseAddrPort("10.96.0.10:80")
	if eps, _ := s.ServiceEndpoints(vip); !reflect.DeepEqual(eps, aps("10.1.0.1:8080", "10.1.0.2:8080")) {
		t.Fatalf("two slices merged: %v", eps)
	}
	ctx := context.Background()
	if err := client.DiscoveryV1().EndpointSlices("shop").Delete(ctx, "web-a", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "slice web-a gone", func() bool {
		eps, _ := s.ServiceEndpoints(vip)
		return reflect.DeepEqual(eps, aps("10.1.0.2:8080"))
	})
	svc.Spec.Ports[0].Port = 81
	if _, err := client.CoreV1().Services("shop").Update(ctx, svc, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "port 81", func() bool {
		eps, _ := s.ServiceEndpoints(netip.MustParseAddrPort("10.96.0.10:81"))
		return reflect.DeepEqual(eps, aps("10.1.0.2:8080"))
	})
	if eps, ok := s.ServiceEndpoints(vip); ok {
		t.Fatalf("the old port still resolves: %v", eps)
	}
}

// The directory is read on every new connection while the informers
// write it. Under churn (a pod's labels and status, a Service's slices
// flipping readiness) readers must never see a gap: the meshed pod always
// found and meshed, the Service always known with a ready endpoint (one
// stays ready throughout). Run with -race.
func TestReadsDuringInformerUpdates(t *testing.T) {
	ports := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}}
	web := pod("shop", "web", "", "node-b", []string{"10.1.0.5", "fd00::5"}, map[string]string{"v": "0"}, enabled)
	flip := slice("web-b", "web", discoveryv1.AddressTypeIPv4, ports, ep("10.1.0.2", ptr(true)))
	client := fake.NewClientset(web, clusterIPService("web", "10.96.0.10", 80),
		slice("web-a", "web", discoveryv1.AddressTypeIPv4, ports, ep("10.1.0.1", nil)), flip)
	s, _ := startSource(t, client, Config{})
	vip := netip.MustParseAddrPort("10.96.0.10:80")
	ip := netip.MustParseAddr("10.1.0.5")

	stop := make(chan struct{})
	var bad sync.Map
	var wg sync.WaitGroup
	for r := 0; r < 4; r++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if wl, ok := s.WorkloadByIP(ip); !ok || !wl.Meshed || wl.Name != "web" {
					bad.Store("pod", wl)
				}
				if eps, ok := s.ServiceEndpoints(vip); !ok || len(eps) == 0 {
					bad.Store("service", eps)
				}
			}
		}()
	}
	ctx := context.Background()
	for i := 0; i < 100; i++ {
		web.Labels["v"] = string(rune('a' + i%26))
		if _, err := client.CoreV1().Pods("shop").Update(ctx, web, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		flip.Endpoints[0].Conditions.Ready = ptr(i%2 == 0)
		if _, err := client.DiscoveryV1().EndpointSlices("shop").Update(ctx, flip, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "last update seen", func() bool {
		wl, _ := s.WorkloadByIP(ip)
		eps, _ := s.ServiceEndpoints(vip)
		return wl.Labels["v"] == web.Labels["v"] && reflect.DeepEqual(eps, aps("10.1.0.1:8080"))
	})
	close(stop)
	wg.Wait()
	bad.Range(func(k, v any) bool { t.Errorf("a reader saw a gap in the %s: %v", k, v); return true })
}
