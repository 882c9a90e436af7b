package tunnel

import (
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The rule of share.go on its own (counts, no sockets): the water level,
// and what it admits on a node of busy pods, a hog, pods arriving and
// goroutines racing. The real-socket tests are in share_test.go.

// shareProxy is a Proxy with only a budget and its pods: admitConn
// needs nothing else. The level is computed at each admission past T
// unless cached is set (the agent's 10 ms).
func shareProxy(budget int64, cached bool) *Proxy {
	p := &Proxy{servings: map[*Serving]struct{}{}, draining: map[*Serving]struct{}{}}
	p.share.init(budget, "test")
	if !cached {
		p.share.every = 0
	}
	return p
}

// arrive serves one more pod (for the counts only).
func arrive(p *Proxy, name string) *Serving {
	sv := &Serving{p: p, pod: Pod{Workload: Workload{Namespace: "ns", Name: name}}, key: "ns/" + name}
	p.mu.Lock()
	p.servings[sv] = struct{}{}
	p.mu.Unlock()
	return sv
}

// open admits up to n connections of sv; how many got in.
func open(sv *Serving, n int) int {
	got := 0
	for i := 0; i < n; i++ {
		if ok, _, _ := sv.admitConn(); ok {
			got++
		}
	}
	return got
}

// fill admits connections of sv until one is refused; how many got in.
func fill(sv *Serving) int {
	n := 0
	for {
		if ok, _, _ := sv.admitConn(); !ok {
			return n
		}
		n++
	}
}

// TestWaterLevel: the level for hand-computed cases.
func TestWaterLevel(t *testing.T) {
	inf := int64(math.MaxInt64)
	for _, c := range []struct {
		counts      []int64
		capacity    int64
		level, room int64
	}{
		{nil, 100, inf, 100},
		{[]int64{10, 20, 30}, 100, inf, 40},
		{[]int64{100, 10, 20}, 100, 70, 0}, // 10 + 20 + 70
		{[]int64{50, 50, 50}, 90, 30, 0},   // an even split
		{[]int64{100, 1, 100}, 101, 50, 0}, // 1 + 50 + 50
		{[]int64{90, 10}, 100, 90, 0},      // exactly full: the biggest is at it
		{[]int64{33, 34, 33}, 100, 34, 0},  // 33 + 33 + 34
		{[]int64{34, 34, 34}, 100, 33, 0},  // rounded down: 99
		{[]int64{0, 0, 1000}, 21504, inf, 20504},
		// A node of 110 pods under the DaemonSet's budget (24,576, C =
		// 21,504): an ingress of 5,000, a database of 500, 107 pods of
		// 20 and a hog of 20,000: 2,140 + 500 + 5,000 leave the hog
		// 13,864.
		{append(twenty(107), 5000, 500, 20000), 21504, 13864, 0},
		// The same with the hog and the ingress at 12,000 each: they
		// split what the small ones leave, 9,432 each.
		{append(twenty(107), 12000, 500, 12000), 21504, 9432, 0},
	} {
		in := fmt.Sprint(c.counts)
		if l, room := waterLevel(c.counts, c.capacity); l != c.level || room != c.room {
			t.Errorf("waterLevel(%s, %d) = %d, %d; want %d, %d", in, c.capacity, l, room, c.level, c.room)
		}
	}
}

func twenty(n int) []int64 {
	s := make([]int64, n)
	for i := range s {
		s[i] = 20
	}
	return s
}

// node is 110 pods under the DaemonSet's budget: an ingress, a database,
// a hog and 107 small pods, each opening what it holds in normal
// operation (the ingress 5,000, the database 500, the small pods 20).
type node struct {
	p                *Proxy
	ingress, db, hog *Serving
	small            []*Serving
}

const nodeBudget = 24576 // 3/4 GiB at 32 KiB a connection

func newNode(t *testing.T) *node {
	n := &node{p: shareProxy(nodeBudget, false)}
	n.ingress, n.db, n.hog = arrive(n.p, "ingress"), arrive(n.p, "db"), arrive(n.p, "hog")
	for i := 0; i < 107; i++ {
		n.small = append(n.small, arrive(n.p, fmt.Sprintf("small-%d", i)))
	}
	for _, o := range []struct {
		sv   *Serving
		want int
	}{{n.ingress, 5000}, {n.db, 500}} {
		if got := open(o.sv, o.want); got != o.want {
			t.Fatalf("%s: %d of %d connections got in on a quiet node", o.sv.pod.Workload.Name, got, o.want)
		}
	}
	for _, sv := range n.small {
		if got := open(sv, 20); got != 20 {
			t.Fatalf("%s: %d of 20 connections got in on a quiet node", sv.pod.Workload.Name, got)
		}
	}
	return n
}

// TestShareBusyPodsNotRefused: below 3/4 of the budget nothing is
// refused, however many one pod holds: the ingress grows from 5,000 to
// 15,792 (the agent at T = 18,432) and the database to 1,000 without a
// refusal. Before (a share of B/2/n past B/2), the ingress was refused
// from 12,288 connections on the node: 4,628 more than its 5,000 and
// nothing more, an outage with the agent at a quarter of its memory.
func TestShareBusyPodsNotRefused(t *testing.T) {
	n := newNode(t)
	if got := open(n.db, 500); got != 500 {
		t.Errorf("the database got %d of 500 more connections", got)
	}
	held, _ := n.p.Connections()
	more := int(n.p.share.thresh) - held
	if got := open(n.ingress, more); got != more {
		t.Errorf("the ingress got %d of %d more connections (it holds %d, the agent %d of a budget of %d)",
			got, more, n.ingress.Connections(), held+got, nodeBudget)
	}
	if held, _ := n.p.Connections(); held != 18432 {
		t.Errorf("the agent holds %d, want T = 18,432", held)
	}
}

// TestShareHogShedFirst: a hog pushes the node past T; it is capped at
// the water level (C less what the others hold: 21,504 - 7,640 =
// 13,864), and then the ingress, the database and every small pod still
// get new connections, out of the reserve C..B, until the agent holds
// its whole budget and nothing more gets in.
func TestShareHogShedFirst(t *testing.T) {
	n := newNode(t)
	if got := fill(n.hog); got != 13864 {
		t.Errorf("the hog took %d, want the water level 13,864", got)
	}
	if got := open(n.hog, 100); got != 0 {
		t.Errorf("the hog at the level got %d more of 100", got)
	}
	if got := open(n.ingress, 1000); got != 1000 {
		t.Errorf("the ingress got %d of 1,000 more past T, below the level", got)
	}
	if got := open(n.db, 100); got != 100 {
		t.Errorf("the database got %d of 100 more", got)
	}
	for _, sv := range n.small {
		if got := open(sv, 10); got != 10 {
			t.Errorf("%s got %d of 10 more", sv.pod.Workload.Name, got)
		}
	}
	if got := open(n.hog, 100); got != 0 {
		t.Errorf("the hog got %d more of 100", got)
	}
	// What is left of the budget: 24,576 - 21,504 - 1,000 - 100 - 1,070.
	if got := fill(n.ingress); got != 902 {
		t.Errorf("the ingress then took %d more, want the 902 left of the budget", got)
	}
	if held, _ := n.p.Connections(); held != nodeBudget {
		t.Errorf("the agent holds %d, want its whole budget %d", held, nodeBudget)
	}
	if ok, _, _ := n.small[0].admitConn(); ok {
		t.Errorf("a connection got in past the budget")
	}
}

// TestShareBudgetHoldsAsPodsArrive: a hog takes what it may, and then
// pods arrive one after the other on the node, each opening all it may:
// the agent never holds more than its budget (before the hard bound of
// 0894c4e, shares taken as pods came added up to 5,856 of 4,000). Under
// the water level the hog takes C = 3,500 alone, the next pod the rest,
// and the budget is full.
func TestShareBudgetHoldsAsPodsArrive(t *testing.T) {
	const budget = 4000
	p := shareProxy(budget, false)
	hog := arrive(p, "hog")
	took := []int{fill(hog)}
	most := 0
	for i := 2; i <= 10; i++ {
		took = append(took, fill(arrive(p, fmt.Sprint("pod-", i))))
		held, _ := p.Connections()
		most = max(most, held)
	}
	t.Logf("pods took %v", took)
	if most > budget {
		t.Errorf("the agent held up to %d connections, budget %d (pods took %v)", most, budget, took)
	}
	if took[0] != budget/8*7 || took[1] != budget/8 {
		t.Errorf("the hog took %d and the next pod %d, want C = %d and the rest %d", took[0], took[1], budget/8*7, budget/8)
	}
	if held, _ := p.Connections(); held != budget {
		t.Errorf("the agent holds %d, want the whole budget %d (room left unused)", held, budget)
	}
}

// TestShareServedTwice: a pod served again while its old Serving drains
// (closed, its connections not yet ended) has one level for both: with
// 500 draining and the other pod at 100 (budget 1,000: T = 750, C =
// 875), the new Serving gets 275 (the pod at 775 = 875 - 100), and the
// other pod, below the level, the rest of the budget. Counted as two
// pods the new Serving got 387 (each Serving a level of its own);
// without the draining ones, 400 (up to the budget).
func TestShareServedTwice(t *testing.T) {
	p := shareProxy(1000, false)
	old, other := arrive(p, "web"), arrive(p, "other")
	open(old, 500)
	open(other, 100)
	p.mu.Lock() // what Close does
	delete(p.servings, old)
	p.draining[old] = struct{}{}
	p.mu.Unlock()
	again := arrive(p, "web")
	if got := fill(again); got != 275 {
		t.Errorf("the pod's new Serving took %d, want 275 (the pod at 775)", got)
	}
	if got := fill(other); got != 125 {
		t.Errorf("the other pod took %d more, want the 125 left of the budget", got)
	}
}

// TestShareConcurrentAdmissions: goroutines admitting at once, four per
// pod for two hogs, with the level cached as in the agent. Documented
// bounds: never more than the budget admitted; a pod admitted past T
// holds at most C (the level never exceeds C, and a cached one is used
// only while the agent's count stays within its room: the room under C
// while every pod fits) plus the admissions racing with the check; a
// small pod below the level gets in while the budget has room. Whether
// the hogs split C (both capped at the level, each a little past it:
// 10,925 and 10,912 for a level of 10,727) or the first takes C and the
// second the reserve depends on how they interleave.
func TestShareConcurrentAdmissions(t *testing.T) {
	const budget = 24576
	const capacity = budget / 8 * 7
	const workers = 4
	p := shareProxy(budget, true)
	small := arrive(p, "small")
	open(small, 50)
	hogs := []*Serving{arrive(p, "hog-1"), arrive(p, "hog-2")}
	var admitted, most atomic.Int64
	var wg sync.WaitGroup
	for _, h := range hogs {
		for w := 0; w < workers; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for refused := 0; refused < 200; {
					if ok, _, _ := h.admitConn(); !ok {
						refused++
						time.Sleep(time.Microsecond)
						continue
					}
					a := admitted.Add(1)
					for m := most.Load(); a > m && !most.CompareAndSwap(m, a); m = most.Load() {
					}
				}
			}()
		}
	}
	wg.Wait()
	if m := most.Load() + 50; m > budget {
		t.Errorf("%d connections admitted at once, budget %d", m, budget)
	}
	for _, h := range hogs {
		if c := h.Connections(); c > capacity+2*workers {
			t.Errorf("%s holds %d, more than C = %d and the %d admissions racing", h.pod.Workload.Name, c, capacity, 2*workers)
		}
	}
	held, _ := p.Connections()
	counts := []int64{50, int64(hogs[0].Connections()), int64(hogs[1].Connections())}
	l, _ := waterLevel(counts, capacity)
	t.Logf("hogs hold %d and %d, the agent %d of %d; the level now %d", hogs[0].Connections(), hogs[1].Connections(), held, budget, l)
	if held > budget {
		t.Errorf("the agent holds %d, budget %d", held, budget)
	}
	// The small pod is below any level: it gets in while there is room.
	if ok, _, _ := small.admitConn(); ok != (held < budget) {
		t.Errorf("the small pod's connection admitted: %v, with the agent at %d of %d", ok, held, budget)
	}
}

// BenchmarkShareAdmit: what an admission costs below T (the fast path),
// past T with the level cached, and a computation of the level (110
// pods: the lock, the counts, a sort), which past T happens at most
// every 10 ms or 384 connections.
func BenchmarkShareAdmit(b *testing.B) {
	for _, c := range []struct {
		name   string
		held   int
		cached bool
	}{{"below-T", 1000, true}, {"past-T-cached", 20000, true}, {"past-T-computed", 20000, false}} {
		b.Run(c.name, func(b *testing.B) {
			p := shareProxy(nodeBudget, c.cached)
			var pods []*Serving
			for i := 0; i < 110; i++ {
				pods = append(pods, arrive(p, fmt.Sprint("pod-", i)))
			}
			for i := 0; i < c.held; i++ {
				open(pods[i%110], 1)
			}
			sv := pods[0]
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if ok, _, _ := sv.admitConn(); ok {
					sv.connDone()
				}
			}
		})
	}
}
