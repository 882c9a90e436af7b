package kube

import (
	"fmt"
	mrand "math/rand/v2"
	"net/netip"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/ambit-mesh/ambit/tunnel"
	"github.com/ambit-mesh/ambit/tunnel/balance"
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

// beforeIndex is the Service index as it was before ServiceByAddr and
// affinity (map of endpoint slices, ServiceEndpoints, a random pick in
// the tunnel): the baseline BenchmarkServiceChoice measures against.
type beforeIndex struct {
	mu    sync.RWMutex
	byVIP map[netip.AddrPort][]netip.AddrPort
}

func (x *beforeIndex) ServiceEndpoints(vip netip.AddrPort) ([]netip.AddrPort, bool) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	eps, ok := x.byVIP[netip.AddrPortFrom(vip.Addr().Unmap(), vip.Port())]
	return eps, ok
}

// BenchmarkServiceChoice: the per-connection Service lookup and endpoint
// choice the outbound path makes, 1,000 Services of 10 endpoints, 100
// client pods: "before" (the code before affinity, kept above as
// beforeIndex plus a random pick), "none" (ServiceByAddr and
// balance.Table.Choose, Services without affinity: the common path) and
// "clientip" (every Service with sessionAffinity ClientIP), interleaved
// over 21 rounds in rotating order in the same run; reported as medians
// (ns/conn) and ratios against "before".
func BenchmarkServiceChoice(b *testing.B) {
	const nSvc, nEp, nClients = 1000, 10, 100
	mk := func(affinity bool) (*Source, []netip.AddrPort) {
		s := &Source{}
		s.svc.init()
		var vips []netip.AddrPort
		for i := 0; i < nSvc; i++ {
			ip := netip.AddrFrom4([4]byte{10, 96, byte(i >> 8), byte(i)}).String()
			svc := clusterIPService(fmt.Sprintf("svc-%d", i), ip, 80)
			if affinity {
				svc.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
			}
			var eps []discoveryv1.Endpoint
			for j := 0; j < nEp; j++ {
				eps = append(eps, ep(fmt.Sprintf("10.%d.%d.%d", 1+i>>8, i&255, j), nil))
			}
			ports := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}}
			for k, v := range ServiceEntries(svc, []*discoveryv1.EndpointSlice{slice("s", svc.Name, discoveryv1.AddressTypeIPv4, ports, eps...)}, Locality{Node: "node-a"}) {
				s.svc.byVIP[k] = v.Endpoints
				if v.Affinity != nil {
					s.svc.sticky[k] = v.Affinity
				}
				vips = append(vips, k)
			}
		}
		return s, vips
	}
	plain, vips := mk(false)
	sticky, _ := mk(true)
	before := &beforeIndex{byVIP: map[netip.AddrPort][]netip.AddrPort{}}
	for k, v := range plain.svc.byVIP {
		before.byVIP[k] = v
	}
	clients := make([]netip.Addr, nClients)
	for i := range clients {
		clients[i] = netip.AddrFrom4([4]byte{10, 244, 0, byte(i)})
	}
	// Called through the interfaces, as the tunnel calls them.
	var oldDir interface {
		ServiceEndpoints(netip.AddrPort) ([]netip.AddrPort, bool)
	} = before
	var noneDir, stickyDir tunnel.ServiceDirectory = plain, sticky
	table, full := balance.NewTable(0), balance.NewTable(0)
	var sink netip.AddrPort
	variants := []struct {
		name string
		f    func(i int, now time.Time)
	}{
		{"before", func(i int, _ time.Time) {
			eps, ok := oldDir.ServiceEndpoints(vips[i%len(vips)])
			if !ok || len(eps) == 0 {
				b.Fatal("miss")
			}
			sink = eps[mrand.IntN(len(eps))]
		}},
		// The same steps as tunnel/conns.go (inline there too).
		{"none", func(i int, now time.Time) {
			vip := vips[i%len(vips)]
			svc, ok := noneDir.ServiceByAddr(vip)
			if !ok || len(svc.Endpoints) == 0 {
				b.Fatal("miss")
			}
			if a := svc.Affinity; a != nil {
				sink = table.Choose(clients[(i/len(vips))%nClients], vip, a.Port, svc.Endpoints, a.Timeout, now)
			} else {
				sink = balance.Random(svc.Endpoints)
			}
		}},
		// 100 clients × 100 Services: 10,000 entries, within the cap.
		{"clientip", func(i int, now time.Time) {
			sink = choose(stickyDir, table, clients[(i/100)%nClients], vips[i%100], now)
		}},
		// 100 clients × 1,000 Services: 100,000 pairs, past the cap of
		// 16,384, so every connection evicts (the worst case).
		{"clientip-full", func(i int, now time.Time) {
			sink = choose(stickyDir, full, clients[(i/len(vips))%nClients], vips[i%len(vips)], now)
		}},
	}
	const rounds = 21
	per := b.N/rounds + 1
	ns := make([][]float64, len(variants))
	b.ResetTimer()
	for r := 0; r < rounds; r++ {
		for k := range variants {
			v := (k + r) % len(variants)
			now := time.Now()
			start := time.Now()
			for i := 0; i < per; i++ {
				variants[v].f(i, now)
			}
			ns[v] = append(ns[v], float64(time.Since(start).Nanoseconds())/float64(per))
		}
	}
	b.StopTimer()
	_ = sink
	med := func(x []float64) float64 { x = slices.Clone(x); slices.Sort(x); return x[len(x)/2] }
	for v := range variants {
		b.ReportMetric(med(ns[v]), variants[v].name+"-ns/conn")
		if v > 0 {
			var ratios []float64
			for r := range ns[v] {
				ratios = append(ratios, ns[v][r]/ns[0][r])
			}
			b.ReportMetric(med(ratios), variants[v].name+"/before")
		}
	}
}

// choose is the outbound path's Service step (tunnel/conns.go), for
// BenchmarkServiceChoice's affinity cases.
func choose(dir tunnel.ServiceDirectory, t *balance.Table, client netip.Addr, vip netip.AddrPort, now time.Time) netip.AddrPort {
	svc, ok := dir.ServiceByAddr(vip)
	if !ok || len(svc.Endpoints) == 0 {
		panic("miss")
	}
	if a := svc.Affinity; a != nil {
		return t.Choose(client, vip, a.Port, svc.Endpoints, a.Timeout, now)
	}
	return balance.Random(svc.Endpoints)
}
