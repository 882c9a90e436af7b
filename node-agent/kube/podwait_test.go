package kube

import (
	"context"
	"fmt"
	"net/netip"
	"testing"
	"time"

	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

// A pod a Service waits for arrives while a rebuild takes long (a Service
// of thousands of endpoints; here the rebuild lock held): the pod informer
// goes on with the next pods (the workload directory, the other Services'
// waits) instead of queueing behind the rebuild, and the Service is
// rebuilt once the lock is free. The handler rebuilt inline: every pod
// behind it waited, and at an agent's start, when the EndpointSlices were
// read before the pods, each of a Service's n pods rebuilt its n
// endpoints in turn (BenchmarkPodsAfterTheirSlice).
func TestPodArrivalsDoNotWaitForRebuilds(t *testing.T) {
	ports := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}}
	client := fake.NewClientset(clusterIPService("web", "10.96.0.10", 80),
		slice("web-a", "web", discoveryv1.AddressTypeIPv4, ports,
			epFor("10.1.0.1", "web-1", "u1"), epFor("10.1.0.2", "web-2", "u2"), ep("10.1.0.3", nil)))
	s, _ := startSource(t, client, Config{})
	wantResolves(t, s, "pods not there yet", "10.96.0.10:80", aps("10.1.0.3:8080"))

	s.svc.recompute.Lock() // a rebuild under way
	locked := true
	defer func() {
		if locked {
			s.svc.recompute.Unlock()
		}
	}()
	pods := client.CoreV1().Pods("shop")
	for _, p := range []struct{ name, uid, ip string }{{"web-1", "u1", "10.1.0.1"}, {"web-2", "u2", "10.1.0.2"}} {
		if _, err := pods.Create(context.Background(), podAt(p.name, p.uid, p.ip), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for _, ip := range []string{"10.1.0.1", "10.1.0.2"} {
		for {
			if _, ok := s.WorkloadByIP(netip.MustParseAddr(ip)); ok {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("pod %s not in the workload directory after 5 s: the pod informer waits for a Service rebuild", ip)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	s.svc.recompute.Unlock()
	locked = false
	wantResolves(t, s, "both pods arrived", "10.96.0.10:80", aps("10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080"))
	s.wait.mu.Lock()
	left := len(s.wait.byPod) + len(s.wait.bySvc)
	s.wait.mu.Unlock()
	if left != 0 {
		t.Fatalf("%d wait records left", left)
	}
}

// BenchmarkPodsAfterTheirSlice: a Service of 2,000 endpoints (20 slices)
// whose pods reach the pod cache after its EndpointSlices (an agent's
// start, when the slice list is read first): the time from the first
// pod's arrival, through the pod informer's handler, until the Service
// lists every endpoint, against the same pods arriving before the slices
// (the usual order: one rebuild), alternated in the same run; medians
// and their ratio.
func BenchmarkPodsAfterTheirSlice(b *testing.B) {
	const n = 2000
	ports := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}}
	var pods, slices_ []any
	for sn := 0; sn < n/100; sn++ {
		var eps []discoveryv1.Endpoint
		for i := 0; i < 100; i++ {
			ip := fmt.Sprintf("10.2.%d.%d", sn, i)
			name := fmt.Sprintf("web-%d-%d", sn, i)
			p, _ := TrimPod(podAt(name, "u-"+name, ip))
			pods = append(pods, p)
			eps = append(eps, epFor(ip, name, "u-"+name))
		}
		es, _ := TrimEndpointSlice(slice(fmt.Sprintf("s%d", sn), "web", discoveryv1.AddressTypeIPv4, ports, eps...))
		slices_ = append(slices_, es)
	}
	svc, _ := TrimService(clusterIPService("web", "10.96.0.10", 80))
	vip := netip.MustParseAddrPort("10.96.0.10:80")
	// run feeds the objects as the informers' handlers see them and
	// returns the time until the Service is complete.
	run := func(podsFirst bool) float64 {
		s, err := New(Config{Client: fake.NewClientset(), NodeName: "node-a"})
		if err != nil {
			b.Fatal(err)
		}
		_ = s.services.GetStore().Add(svc)
		addPod := func(p any) { _ = s.allPods.GetStore().Add(p); s.dir.upsert(p); s.podArrived(p) }
		addSlices := func() {
			for _, es := range slices_ {
				_ = s.slices.GetStore().Add(es)
			}
			s.rebuildService("shop/web")
		}
		start := time.Now()
		if podsFirst {
			for _, p := range pods {
				addPod(p)
			}
			addSlices()
		} else {
			addSlices()
			start = time.Now()
			for _, p := range pods {
				addPod(p)
			}
		}
		for {
			if eps, _ := s.ServiceEndpoints(vip); len(eps) == n {
				return float64(time.Since(start).Nanoseconds())
			}
			time.Sleep(100 * time.Microsecond)
		}
	}
	var first, after []float64
	for i := 0; i < b.N; i++ {
		after = append(after, run(false))
		first = append(first, run(true))
	}
	ratios := make([]float64, len(first))
	for i := range first {
		ratios[i] = after[i] / first[i]
	}
	b.ReportMetric(median(first)/1e6, "pods-first-ms")
	b.ReportMetric(median(after)/1e6, "slices-first-ms")
	b.ReportMetric(median(ratios), "slices-first/pods-first")
}
