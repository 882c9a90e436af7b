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

// kube-proxy sends to an endpoint's first address only; the API calls
// the others fungible.
func TestOnlyFirstAddressOfAnEndpoint(t *testing.T) {
	ports := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}}
	e := ep("10.1.0.1", nil)
	e.Addresses = append(e.Addresses, "10.1.0.5")
	m := ServiceEntries(clusterIPService("a", "10.96.0.10", 80),
		[]*discoveryv1.EndpointSlice{slice("a-1", "a", discoveryv1.AddressTypeIPv4, ports, e, ep("10.1.0.2", nil))}, Locality{Node: "n"})
	got := m[netip.MustParseAddrPort("10.96.0.10:80")].Endpoints
	if !reflect.DeepEqual(got, aps("10.1.0.1:8080", "10.1.0.2:8080")) {
		t.Fatalf("got %v, want the first address of each endpoint (kube-proxy)", got)
	}
}

// Two Services listing one externalIP and port: deleting one must not
// take the address from the other (its clients would go out in
// plaintext through kube-proxy, which a strict endpoint refuses).
func TestSharedExternalIPSurvivesOtherServiceDeletion(t *testing.T) {
	ports := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}}
	a := clusterIPService("a", "10.96.0.10", 80)
	b := clusterIPService("b", "10.96.0.11", 80)
	a.Spec.ExternalIPs = []string{"192.0.2.7"}
	b.Spec.ExternalIPs = []string{"192.0.2.7"}
	client := fake.NewClientset(a, b,
		slice("a-1", "a", discoveryv1.AddressTypeIPv4, ports, ep("10.1.0.1", nil)),
		slice("b-1", "b", discoveryv1.AddressTypeIPv4, ports, ep("10.1.0.2", nil)))
	s, _ := startSource(t, client, Config{})
	ext := netip.MustParseAddrPort("192.0.2.7:80")
	if _, ok := s.ServiceEndpoints(ext); !ok {
		t.Fatal("the external IP both Services declare is not known")
	}
	if err := client.CoreV1().Services("shop").Delete(context.Background(), "a", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a gone", func() bool { _, ok := s.ServiceEndpoints(netip.MustParseAddrPort("10.96.0.10:80")); return !ok })
	if eps, ok := s.ServiceEndpoints(ext); !ok || !reflect.DeepEqual(eps, aps("10.1.0.2:8080")) {
		t.Fatalf("after a's deletion the external IP b still declares resolves to %v (known %v)", eps, ok)
	}
}
