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
	"k8s.io/client-go/kubernetes/fake"

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

// todayIndex is the Service index as it was before NodePorts (session 8:
// byVIP and sticky, nothing read on a miss): the baseline of the
// ClusterIP hit and of the miss (a pod IP, the most common destination)
// in BenchmarkServiceChoice.
type todayIndex struct {
	mu     sync.RWMutex
	byVIP  map[netip.AddrPort][]netip.AddrPort
	sticky map[netip.AddrPort]*tunnel.Affinity
}

func (x *todayIndex) ServiceByAddr(vip netip.AddrPort) (tunnel.Service, bool) {
	k := netip.AddrPortFrom(vip.Addr().Unmap(), vip.Port())
	x.mu.RLock()
	eps, ok := x.byVIP[k]
	var a *tunnel.Affinity
	if ok && len(x.sticky) > 0 {
		a = x.sticky[k]
	}
	x.mu.RUnlock()
	return tunnel.Service{Endpoints: eps, Affinity: a}, ok
}

// BenchmarkServiceChoice: the per-connection Service lookup and endpoint
// choice the outbound path makes, 1,000 Services of 10 endpoints (every
// other one a NodePort Service), 1,000 nodes of two addresses, 100
// client pods: "before" (the code before affinity, kept above as
// beforeIndex plus a random pick), "today" (the index before NodePorts,
// todayIndex), "none" (ServiceByAddr and balance.Table.Choose, a
// clusterIP of a Service without affinity: the common path), "nodeport"
// (a node's address and a nodePort), "clientip" (every Service with
// sessionAffinity ClientIP), and "miss-today"/"miss" (a pod IP, not a
// Service: the most common destination, before and now), interleaved
// over 21 rounds in rotating order in the same run; reported as medians
// (ns/conn) and ratios against "before", "today" and "miss-today".
func BenchmarkServiceChoice(b *testing.B) {
	const nSvc, nEp, nClients, nNodes = 1000, 10, 100, 1000
	mk := func(affinity bool) (*Source, []netip.AddrPort, []netip.AddrPort) {
		s := &Source{}
		s.svc.init()
		var vips, nodePorts []netip.AddrPort
		for n := 0; n < nNodes; n++ {
			s.nodeAddresses(fmt.Sprintf("node-%d", n), []netip.Addr{
				netip.AddrFrom4([4]byte{172, 18, byte(n >> 8), byte(n)}),
				netip.AddrFrom4([4]byte{198, 18, byte(n >> 8), byte(n)}),
			})
		}
		for i := 0; i < nSvc; i++ {
			ip := netip.AddrFrom4([4]byte{10, 96, byte(i >> 8), byte(i)}).String()
			svc := clusterIPService(fmt.Sprintf("svc-%d", i), ip, 80)
			if affinity {
				svc.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
			}
			if i%2 == 0 {
				svc.Spec.Type = corev1.ServiceTypeNodePort
				svc.Spec.Ports[0].NodePort = int32(30000 + i/2)
			}
			var eps []discoveryv1.Endpoint
			for j := 0; j < nEp; j++ {
				eps = append(eps, ep(fmt.Sprintf("10.%d.%d.%d", 1+i>>8, i&255, j), nil))
			}
			ports := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}}
			byAddr, nps := serviceEntries(svc, []*discoveryv1.EndpointSlice{slice("s", svc.Name, discoveryv1.AddressTypeIPv4, ports, eps...)}, Locality{Node: "node-a"}, nil)
			for k, v := range byAddr {
				s.svc.byVIP[k] = v.Endpoints
				if v.Affinity != nil {
					s.svc.sticky[k] = v.Affinity
				}
				vips = append(vips, k)
			}
			s.svc.setNodePortsLocked("shop/"+svc.Name, nps)
			for p := range nps {
				nodePorts = append(nodePorts, netip.AddrPortFrom(netip.AddrFrom4([4]byte{172, 18, byte(i >> 8), byte(i)}), p))
			}
		}
		return s, vips, nodePorts
	}
	plain, vips, nodePorts := mk(false)
	sticky, _, _ := mk(true)
	before := &beforeIndex{byVIP: map[netip.AddrPort][]netip.AddrPort{}}
	today := &todayIndex{byVIP: map[netip.AddrPort][]netip.AddrPort{}, sticky: map[netip.AddrPort]*tunnel.Affinity{}}
	for k, v := range plain.svc.byVIP {
		before.byVIP[k] = v
		today.byVIP[k] = v
	}
	// Pod IPs on port 8080: not Services, not nodes.
	pods := make([]netip.AddrPort, 1000)
	for i := range pods {
		pods[i] = netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1 + byte(i>>8), byte(i), 1}), 8080)
	}
	clients := make([]netip.Addr, nClients)
	for i := range clients {
		clients[i] = netip.AddrFrom4([4]byte{10, 244, 0, byte(i)})
	}
	// Called through the interfaces, as the tunnel calls them.
	var oldDir interface {
		ServiceEndpoints(netip.AddrPort) ([]netip.AddrPort, bool)
	} = before
	var noneDir, stickyDir, todayDir tunnel.ServiceDirectory = plain, sticky, today
	table, full := balance.NewTable(0), balance.NewTable(0)
	var sink netip.AddrPort
	variants := []struct {
		name, base string // base: the variant its ratio is against
		f          func(i int, now time.Time)
	}{
		{"before", "", func(i int, _ time.Time) {
			eps, ok := oldDir.ServiceEndpoints(vips[i%len(vips)])
			if !ok || len(eps) == 0 {
				b.Fatal("miss")
			}
			sink = eps[mrand.IntN(len(eps))]
		}},
		{"today", "before", func(i int, now time.Time) {
			sink = choose(todayDir, table, netip.Addr{}, vips[i%len(vips)], now)
		}},
		{"nodeport", "today", func(i int, now time.Time) {
			sink = choose(noneDir, table, netip.Addr{}, nodePorts[i%len(nodePorts)], now)
		}},
		{"miss-today", "", func(i int, _ time.Time) {
			if _, ok := todayDir.ServiceByAddr(pods[i%len(pods)]); ok {
				b.Fatal("a pod resolved as a Service")
			}
		}},
		{"miss", "miss-today", func(i int, _ time.Time) {
			if _, ok := noneDir.ServiceByAddr(pods[i%len(pods)]); ok {
				b.Fatal("a pod resolved as a Service")
			}
		}},
		// The same steps as tunnel/conns.go (inline there too).
		{"none", "before", func(i int, now time.Time) {
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
		{"clientip", "before", func(i int, now time.Time) {
			sink = choose(stickyDir, table, clients[(i/100)%nClients], vips[i%100], now)
		}},
		// 100 clients × 1,000 Services: 100,000 pairs, past the cap of
		// 16,384, so every connection evicts (the worst case).
		{"clientip-full", "before", func(i int, now time.Time) {
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
	index := map[string]int{}
	for v := range variants {
		index[variants[v].name] = v
	}
	ratio := func(v, base int) {
		var ratios []float64
		for r := range ns[v] {
			ratios = append(ratios, ns[v][r]/ns[base][r])
		}
		b.ReportMetric(median(ratios), variants[v].name+"/"+variants[base].name)
	}
	for v := range variants {
		b.ReportMetric(median(ns[v]), variants[v].name+"-ns/conn")
		if base := variants[v].base; base != "" {
			ratio(v, index[base])
		}
	}
	ratio(index["none"], index["today"]) // the hit: as fast as before NodePorts?
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

// BenchmarkServiceRebuildKnownPods: what checking every endpoint's pod
// against the pod cache adds to rebuilding one Service of 1,000
// endpoints in 10 slices (two ports, dual-stack): serviceEntries with
// the check rebuildService makes (every pod in the cache) and without,
// alternated in the same run; medians and their ratio.
func BenchmarkServiceRebuildKnownPods(b *testing.B) {
	s, err := New(Config{Client: fake.NewClientset(), NodeName: "node-a"})
	if err != nil {
		b.Fatal(err)
	}
	svc := webService()
	var sl []*discoveryv1.EndpointSlice
	ports := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}, {Name: ptr("metrics"), Port: ptr[int32](9100)}}
	for sn := 0; sn < 10; sn++ {
		var eps []discoveryv1.Endpoint
		for i := 0; i < 100; i++ {
			ip := fmt.Sprintf("10.2.%d.%d", sn, i)
			name := fmt.Sprintf("web-%d-%d", sn, i)
			p, _ := TrimPod(podAt(name, "u-"+name, ip))
			if err := s.allPods.GetStore().Add(p); err != nil {
				b.Fatal(err)
			}
			eps = append(eps, epFor(ip, name, "u-"+name))
		}
		es, _ := TrimEndpointSlice(slice(fmt.Sprintf("s%d", sn), "web", discoveryv1.AddressTypeIPv4, ports, eps...))
		sl = append(sl, es.(*discoveryv1.EndpointSlice))
	}
	var plain, checked []float64
	for i := 0; i < b.N; i++ {
		for _, check := range []bool{false, true} {
			start := time.Now()
			var known podKnown
			if check {
				known, _ = s.knownPods() // as rebuildService
			}
			byAddr, _ := serviceEntries(svc, sl, Locality{Node: "node-a"}, known)
			d := float64(time.Since(start).Nanoseconds())
			if len(byAddr[netip.MustParseAddrPort("10.96.0.10:80")].Endpoints) != 1000 {
				b.Fatal("endpoints missing")
			}
			if check {
				checked = append(checked, d)
			} else {
				plain = append(plain, d)
			}
		}
	}
	ratios := make([]float64, len(plain))
	for i := range plain {
		ratios[i] = checked[i] / plain[i]
	}
	b.ReportMetric(median(plain)/1e3, "unchecked-µs")
	b.ReportMetric(median(checked)/1e3, "checked-µs")
	b.ReportMetric(median(ratios), "checked/unchecked")
}

// median of x (x is left as it was).
func median(x []float64) float64 {
	x = slices.Clone(x)
	slices.Sort(x)
	return x[len(x)/2]
}
