package kube

import (
	"encoding/json"
	"net/netip"
	"reflect"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/ambit-mesh/ambit/tunnel"
)

func ptr[T any](v T) *T { return &v }

func slice(name, svc string, family discoveryv1.AddressType, ports []discoveryv1.EndpointPort, eps ...discoveryv1.Endpoint) *discoveryv1.EndpointSlice {
	return &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: name, Namespace: "shop", Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: family,
		Ports:       ports,
		Endpoints:   eps,
	}
}

func ep(addr string, ready *bool) discoveryv1.Endpoint {
	return discoveryv1.Endpoint{Addresses: []string{addr}, Conditions: discoveryv1.EndpointConditions{Ready: ready}}
}

// endpointsOf keeps only the endpoint lists of ServiceEntries' result.
func endpointsOf(m map[netip.AddrPort]tunnel.Service) map[netip.AddrPort][]netip.AddrPort {
	if m == nil {
		return nil
	}
	out := make(map[netip.AddrPort][]netip.AddrPort, len(m))
	for k, v := range m {
		out[k] = v.Endpoints
	}
	return out
}

func aps(s ...string) []netip.AddrPort {
	out := []netip.AddrPort{}
	for _, x := range s {
		out = append(out, netip.MustParseAddrPort(x))
	}
	return out
}

func webService() *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "shop"},
		Spec: corev1.ServiceSpec{
			ClusterIP:  "10.96.0.10",
			ClusterIPs: []string{"10.96.0.10", "fd00:96::10"},
			Ports: []corev1.ServicePort{
				{Name: "http", Port: 80, TargetPort: intstr.FromString("web"), Protocol: corev1.ProtocolTCP},
				{Name: "metrics", Port: 9100, TargetPort: intstr.FromInt32(9100)}, // protocol defaulted
				{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP},
			},
		},
	}
}

func TestServiceEntriesNamedPortsReadinessFamilies(t *testing.T) {
	httpA := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080), Protocol: ptr(corev1.ProtocolTCP)}, {Name: ptr("metrics"), Port: ptr[int32](9100)}}
	// The named target port "web" resolves to 9090 on the second group of
	// pods: the controller puts them in their own slice.
	httpB := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](9090), Protocol: ptr(corev1.ProtocolTCP)}}
	sl := []*discoveryv1.EndpointSlice{
		slice("web-a", "web", discoveryv1.AddressTypeIPv4, httpA,
			ep("10.1.0.1", ptr(true)),
			ep("10.1.0.2", nil),        // nil means ready
			ep("10.1.0.3", ptr(false)), // not ready: excluded
		),
		slice("web-b", "web", discoveryv1.AddressTypeIPv4, httpB, ep("10.1.0.4", ptr(true)), ep("10.1.0.1", ptr(true))),
		slice("web-v6", "web", discoveryv1.AddressTypeIPv6, httpA, ep("fd00::1", ptr(true))),
		slice("web-fqdn", "web", discoveryv1.AddressTypeFQDN, httpA, ep("db.example", ptr(true))),
	}
	got := endpointsOf(ServiceEntries(webService(), sl, Locality{Node: "node-a"}))
	want := map[netip.AddrPort][]netip.AddrPort{
		netip.MustParseAddrPort("10.96.0.10:80"):      aps("10.1.0.1:8080", "10.1.0.1:9090", "10.1.0.2:8080", "10.1.0.4:9090"),
		netip.MustParseAddrPort("10.96.0.10:9100"):    aps("10.1.0.1:9100", "10.1.0.2:9100"),
		netip.MustParseAddrPort("[fd00:96::10]:80"):   aps("[fd00::1]:8080"),
		netip.MustParseAddrPort("[fd00:96::10]:9100"): aps("[fd00::1]:9100"),
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("entries:\n got %v\nwant %v", got, want)
	}
}

func TestServiceEntriesTerminatingFallbackAndEdgeCases(t *testing.T) {
	ports := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}}
	term := discoveryv1.Endpoint{Addresses: []string{"10.1.0.7"}, Conditions: discoveryv1.EndpointConditions{
		Ready: ptr(false), Serving: ptr(true), Terminating: ptr(true)}}
	svc := webService()
	// Only a serving-but-terminating endpoint: use it (rolling update).
	got := endpointsOf(ServiceEntries(svc, []*discoveryv1.EndpointSlice{slice("s", "web", discoveryv1.AddressTypeIPv4, ports, term)}, Locality{Node: "node-a"}))
	if eps := got[netip.MustParseAddrPort("10.96.0.10:80")]; !reflect.DeepEqual(eps, aps("10.1.0.7:8080")) {
		t.Fatalf("terminating fallback: %v", eps)
	}
	// A ready endpoint wins over the terminating one.
	got = endpointsOf(ServiceEntries(svc, []*discoveryv1.EndpointSlice{slice("s", "web", discoveryv1.AddressTypeIPv4, ports, term, ep("10.1.0.8", ptr(true)))}, Locality{Node: "node-a"}))
	if eps := got[netip.MustParseAddrPort("10.96.0.10:80")]; !reflect.DeepEqual(eps, aps("10.1.0.8:8080")) {
		t.Fatalf("ready over terminating: %v", eps)
	}
	// No endpoints: the VIP is still known (not passed through), list empty.
	got = endpointsOf(ServiceEntries(svc, nil, Locality{Node: "node-a"}))
	if eps, ok := got[netip.MustParseAddrPort("10.96.0.10:80")]; !ok || len(eps) != 0 {
		t.Fatalf("service without endpoints: %v %v", eps, ok)
	}
	if _, ok := got[netip.MustParseAddrPort("10.96.0.10:53")]; ok {
		t.Fatal("UDP port must not be a TCP entry")
	}
	// Headless and nil services have no VIP.
	svc.Spec.ClusterIP, svc.Spec.ClusterIPs = corev1.ClusterIPNone, []string{corev1.ClusterIPNone}
	if got := ServiceEntries(svc, nil, Locality{Node: "node-a"}); len(got) != 0 {
		t.Fatalf("headless: %v", got)
	}
	if got := ServiceEntries(nil, nil, Locality{Node: "node-a"}); got != nil {
		t.Fatalf("nil: %v", got)
	}
}

// FuzzServiceEntries feeds arbitrary EndpointSlices (as the API could
// serve them, or worse) to the mapping: no panic, and every endpoint is
// valid, of the VIP's family, with a usable port.
func FuzzServiceEntries(f *testing.F) {
	seed, _ := json.Marshal(slice("s", "web", discoveryv1.AddressTypeIPv4,
		[]discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}}, ep("10.1.0.1", nil)))
	f.Add(seed)
	f.Add([]byte(`{"addressType":"IPv6","ports":[{"name":"http","port":-1},{"name":"http","port":70000}],"endpoints":[{"addresses":["::ffff:1.2.3.4","zz"]}]}`))
	f.Add([]byte(`{"addressType":"IPv4","ports":[{"port":80,"protocol":"UDP"}],"endpoints":[{"addresses":["1.2.3.4"],"conditions":{"ready":false,"serving":true,"terminating":true}}]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var es discoveryv1.EndpointSlice
		if json.Unmarshal(data, &es) != nil {
			return
		}
		for vip, eps := range endpointsOf(ServiceEntries(webService(), []*discoveryv1.EndpointSlice{&es}, Locality{Node: "node-a"})) {
			for _, e := range eps {
				if !e.Addr().IsValid() || e.Addr().Is4() != vip.Addr().Is4() || e.Addr().Is4In6() || e.Port() == 0 {
					t.Fatalf("bad endpoint %v for %v from %s", e, vip, data)
				}
			}
		}
	})
}
