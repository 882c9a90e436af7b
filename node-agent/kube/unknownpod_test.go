package kube

import (
	"context"
	"net/netip"
	"reflect"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
)

// podAt is a running pod of shop with one IP ("" for none yet).
func podAt(name, uid, ip string) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "shop", UID: types.UID(uid)},
		Spec:       corev1.PodSpec{NodeName: "node-b"},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning},
	}
	if ip != "" {
		p.Status.PodIP, p.Status.PodIPs = ip, []corev1.PodIP{{IP: ip}}
	}
	return p
}

// epFor is a ready endpoint naming its pod, as the EndpointSlice
// controller writes it.
func epFor(addr, pod, uid string) discoveryv1.Endpoint {
	e := ep(addr, nil)
	e.TargetRef = &corev1.ObjectReference{Kind: "Pod", Namespace: "shop", Name: pod, UID: types.UID(uid)}
	return e
}

// An endpoint whose pod the cache does not have (yet), with that address
// and UID, is left out while another can serve: the tunnel would take it
// for a pod outside the mesh and connect in plaintext. Once the pod is in
// the cache the Service is rebuilt with it. With nothing else left, such
// endpoints are used as before. Endpoints naming no pod, and host-network
// pods (in the cache, not in the workload directory), count as known.
func TestEndpointOfUnknownPodAvoided(t *testing.T) {
	ports := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}}
	sl := slice("web-a", "web", discoveryv1.AddressTypeIPv4, ports,
		epFor("10.1.0.1", "web-1", "u1"),
		epFor("10.1.0.2", "web-2", "u2"),  // not created yet
		ep("10.1.0.3", nil),               // no targetRef
		epFor("10.1.0.4", "web-4", "u4"),  // created without an IP yet
		epFor("10.1.0.5", "web-5", "new"), // the cache has its predecessor (same name)
		epFor("172.18.0.3", "ingress", "ui"))
	host := podAt("ingress", "ui", "172.18.0.3")
	host.Spec.HostNetwork = true
	client := fake.NewClientset(clusterIPService("web", "10.96.0.10", 80), sl,
		clusterIPService("api", "10.96.0.11", 80),
		slice("api-a", "api", discoveryv1.AddressTypeIPv4, ports, epFor("10.2.0.1", "api-1", "a1")),
		podAt("web-1", "u1", "10.1.0.1"), podAt("web-4", "u4", ""), podAt("web-5", "old", "10.1.0.5"), host)
	s, _ := startSource(t, client, Config{})
	want := func(what, vip string, eps []netip.AddrPort) {
		t.Helper()
		wantResolves(t, s, what, vip, eps)
	}
	want("unknown pods left out", "10.96.0.10:80", aps("10.1.0.1:8080", "10.1.0.3:8080", "172.18.0.3:8080"))
	want("only unknown pods: used as before", "10.96.0.11:80", aps("10.2.0.1:8080"))

	ctx := context.Background()
	pods := client.CoreV1().Pods("shop")
	if _, err := pods.Create(ctx, podAt("web-2", "u2", "10.1.0.2"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	want("web-2 arrived", "10.96.0.10:80", aps("10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080", "172.18.0.3:8080"))
	if _, err := pods.UpdateStatus(ctx, podAt("web-4", "u4", "10.1.0.4"), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	want("web-4 got its IP", "10.96.0.10:80", aps("10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080", "10.1.0.4:8080", "172.18.0.3:8080"))
	if err := pods.Delete(ctx, "web-5", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := pods.Create(ctx, podAt("web-5", "new", "10.1.0.5"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	want("web-5 recreated", "10.96.0.10:80", aps("10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080", "10.1.0.4:8080", "10.1.0.5:8080", "172.18.0.3:8080"))
	s.wait.mu.Lock()
	waiting := len(s.wait.bySvc["shop/web"])
	s.wait.mu.Unlock()
	if waiting != 0 {
		t.Fatalf("web waits for %d pods after all arrived", waiting)
	}

	// A slice that stops naming the pod ends the wait: nothing is kept
	// for pods that never come.
	if err := client.DiscoveryV1().EndpointSlices("shop").Delete(ctx, "api-a", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	want("api's slice gone", "10.96.0.11:80", aps())
	s.wait.mu.Lock()
	left := len(s.wait.byPod) + len(s.wait.bySvc)
	s.wait.mu.Unlock()
	if left != 0 {
		t.Fatalf("%d wait records left: %v %v", left, s.wait.byPod, s.wait.bySvc)
	}
}

// The slice cache keeps a Pod target's name and UID, nothing else of it,
// and no other kind of target.
func TestTrimEndpointSliceTargetRef(t *testing.T) {
	ports := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}}
	e := epFor("10.1.0.1", "web-1", "u1")
	e.TargetRef.ResourceVersion, e.TargetRef.APIVersion = "17", "v1"
	other := epFor("10.1.0.2", "web-2", "u2")
	other.TargetRef.Namespace = "elsewhere"
	vm := ep("10.1.0.3", nil)
	vm.TargetRef = &corev1.ObjectReference{Kind: "VirtualMachineInstance", Namespace: "shop", Name: "vm"}
	got, _ := TrimEndpointSlice(slice("web-a", "web", discoveryv1.AddressTypeIPv4, ports, e, other, vm))
	es := got.(*discoveryv1.EndpointSlice).Endpoints
	for i, want := range []*corev1.ObjectReference{
		{Kind: "Pod", Name: "web-1", UID: "u1"},
		{Kind: "Pod", Namespace: "elsewhere", Name: "web-2", UID: "u2"},
		nil,
	} {
		if !reflect.DeepEqual(es[i].TargetRef, want) {
			t.Errorf("endpoint %d: targetRef %+v, want %+v", i, es[i].TargetRef, want)
		}
	}
}
