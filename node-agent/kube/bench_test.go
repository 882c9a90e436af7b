package kube

import (
	"fmt"
	"net/netip"
	"runtime"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/ambit-mesh/ambit/tunnel"
)

func podN(i int) *corev1.Pod {
	p := fullPod()
	p.Name = fmt.Sprintf("web-%d", i)
	p.UID = types.UID(fmt.Sprintf("uid-%d", i))
	p.Labels = map[string]string{"app": "web", "pod-template-hash": fmt.Sprint(i % 7)}
	ip := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
	p.Status.PodIP = ip.String()
	p.Status.PodIPs = []corev1.PodIP{{IP: ip.String()}}
	return p
}

// BenchmarkWorkloadByIP: the per-connection directory lookup against a bare
// map read (the floor) in the same run, 10,000 pods.
func BenchmarkWorkloadByIP(b *testing.B) {
	const n = 10000
	var d directory
	d.init("cluster.local")
	base := map[netip.Addr]tunnel.Workload{}
	ips := make([]netip.Addr, n)
	for i := 0; i < n; i++ {
		p := podN(i)
		tp, _ := TrimPod(p)
		d.upsert(tp)
		ips[i] = podIPs(p)[0]
		base[ips[i]], _ = d.lookup(ips[i])
	}
	b.Run("baseline-map", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			if _, ok := base[ips[i%n]]; !ok {
				b.Fatal("miss")
			}
		}
	})
	b.Run("directory", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			if _, ok := d.lookup(ips[i%n]); !ok {
				b.Fatal("miss")
			}
		}
	})
	b.Run("directory-parallel", func(b *testing.B) {
		b.RunParallel(func(pb *testing.PB) {
			i := 0
			for pb.Next() {
				d.lookup(ips[i%n])
				i++
			}
		})
	})
}

// BenchmarkServiceEntries: rebuilding one Service of 1,000 endpoints in
// 10 slices (what one EndpointSlice change costs).
func BenchmarkServiceEntries(b *testing.B) {
	svc := webService()
	var sl []*discoveryv1.EndpointSlice
	ports := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}, {Name: ptr("metrics"), Port: ptr[int32](9100)}}
	for s := 0; s < 10; s++ {
		var eps []discoveryv1.Endpoint
		for i := 0; i < 100; i++ {
			eps = append(eps, ep(fmt.Sprintf("10.2.%d.%d", s, i), ptr(true)))
		}
		sl = append(sl, slice(fmt.Sprintf("s%d", s), "web", discoveryv1.AddressTypeIPv4, ports, eps...))
	}
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		if len(ServiceEntries(svc, sl, Locality{Node: "node-a"})) == 0 {
			b.Fatal("empty")
		}
	}
}

// BenchmarkPodCacheMemory reports the heap one cached pod costs, full (as
// an untrimmed informer keeps it) and trimmed, for a typical Deployment
// pod with kubectl's last-applied annotation. The ratio is the point.
func BenchmarkPodCacheMemory(b *testing.B) {
	const n = 5000
	measure := func(trim bool) float64 {
		runtime.GC()
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		keep := make([]any, n)
		for i := range keep {
			p := podN(i)
			if trim {
				keep[i], _ = TrimPod(p)
			} else {
				keep[i] = p
			}
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		runtime.KeepAlive(keep)
		return float64(int64(after.HeapAlloc)-int64(before.HeapAlloc)) / n
	}
	var full, trimmed float64
	for i := 0; i < b.N; i++ {
		full, trimmed = measure(false), measure(true)
	}
	b.ReportMetric(full, "full-B/pod")
	b.ReportMetric(trimmed, "trimmed-B/pod")
	b.ReportMetric(full/trimmed, "ratio")
}
