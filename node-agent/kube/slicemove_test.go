package kube

import (
	"context"
	"net/netip"
	"reflect"
	"testing"

	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

// A slice moved to another Service (its service-name label changed,
// as hand-made slices of selector-less Services may be) leaves the old
// one: its endpoints must not keep serving it.
func TestSliceRelabeledLeavesItsOldService(t *testing.T) {
	ports := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}}
	a := clusterIPService("a", "10.96.0.10", 80)
	b := clusterIPService("b", "10.96.0.11", 80)
	a.Spec.Selector, b.Spec.Selector = nil, nil
	moved := slice("manual", "a", discoveryv1.AddressTypeIPv4, ports, ep("10.1.0.1", nil))
	client := fake.NewClientset(a, b, moved,
		slice("a-stay", "a", discoveryv1.AddressTypeIPv4, ports, ep("10.1.0.2", nil)))
	s, _ := startSource(t, client, Config{})
	va, vb := netip.MustParseAddrPort("10.96.0.10:80"), netip.MustParseAddrPort("10.96.0.11:80")
	if eps, _ := s.ServiceEndpoints(va); !reflect.DeepEqual(eps, aps("10.1.0.1:8080", "10.1.0.2:8080")) {
		t.Fatalf("before: %v", eps)
	}
	moved.Labels[discoveryv1.LabelServiceName] = "b"
	if _, err := client.DiscoveryV1().EndpointSlices("shop").Update(context.Background(), moved, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "b has the moved slice", func() bool {
		eps, _ := s.ServiceEndpoints(vb)
		return reflect.DeepEqual(eps, aps("10.1.0.1:8080"))
	})
	if eps, _ := s.ServiceEndpoints(va); !reflect.DeepEqual(eps, aps("10.1.0.2:8080")) {
		t.Fatalf("a still resolves to %v after its slice moved to b, want 10.1.0.2:8080 only", eps)
	}
	// The label removed: the slice belongs to no Service any more.
	moved.Labels = nil
	if _, err := client.DiscoveryV1().EndpointSlices("shop").Update(context.Background(), moved, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "b without the unlabeled slice", func() bool {
		eps, ok := s.ServiceEndpoints(vb)
		return ok && len(eps) == 0
	})
}
