package tunnel

import (
	"sync"
	"testing"
)

// The rule of share.go on its own (counts, no sockets): what it admits
// as pods come and go and as goroutines race. The real-socket tests are
// in share_test.go.

// shareProxy is a Proxy with only a budget: admitConn and podsChanged
// need nothing else.
func shareProxy(budget int64) *Proxy {
	p := &Proxy{}
	p.share.init(budget, "test")
	return p
}

// arrive serves one more pod (for the count only).
func arrive(p *Proxy) *Serving {
	p.share.podsChanged(1)
	return &Serving{p: p}
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

// TestShareBudgetHoldsAsPodsArrive: a hog takes the free half of a
// budget of 4,000, and then pods arrive one after the other on the node,
// each opening all it may (its share when it came: 1,000, 666, 500, …;
// all above the floor). Shares shrink as pods come, but what a pod took
// under its earlier, larger share stays: before the budget was also a
// hard bound, ten pods brought the agent to 5,856 connections of a
// budget of 4,000 (B/2 times the harmonic sum: ~2.6 B with 110 pods),
// the memory the budget was there to keep.
func TestShareBudgetHoldsAsPodsArrive(t *testing.T) {
	const budget = 4000
	p := shareProxy(budget)
	hog := arrive(p)
	took := []int{fill(hog)}
	most := 0
	for i := 2; i <= 10; i++ {
		took = append(took, fill(arrive(p)))
		held, _ := p.Connections()
		most = max(most, held)
	}
	t.Logf("pods took %v", took)
	if most > budget {
		t.Errorf("the agent held up to %d connections, budget %d (pods took %v)", most, budget, took)
	}
	if took[0] != budget/2 {
		t.Errorf("the hog took %d, want the free half, %d", took[0], budget/2)
	}
	if held, _ := p.Connections(); held != budget {
		t.Errorf("the agent holds %d, want the whole budget %d (room left unused)", held, budget)
	}
}

// TestShareUnderBudgetAlwaysAdmitted: below the budget a pod under its
// share always gets in, as before the hard bound.
func TestShareUnderBudgetAlwaysAdmitted(t *testing.T) {
	p := shareProxy(400)
	hog, other := arrive(p), arrive(p)
	if n := fill(hog); n != 200 {
		t.Fatalf("hog took %d, want 200", n)
	}
	if n := fill(other); n != 100 {
		t.Errorf("a pod under its share took %d, want its share, 100", n)
	}
}

// TestShareFollowsConcurrentPodChanges: pods served and closed at once
// (CNI ADDs beside a DEL's drain, an agent's start or stop) must leave
// the share as the number of pods says. Before, podsChanged stored the
// share computed from its own Add, so a goroutine preempted between the
// two stored a stale share over a newer one, and it stayed until the
// next pod change: four pods arriving at once beside one already
// served left the share of one, two or three pods (262,144 or 131,072
// or 174,762 where 5 pods have 104,857), in 4-10 of 20,000 rounds
// under -race, 1 of 20,000 in one of two runs without. On a node of 110
// pods one such store from the first pods leaves every pod a share of
// half the budget: no share at all.
func TestShareFollowsConcurrentPodChanges(t *testing.T) {
	const budget = 1 << 20
	p := shareProxy(budget)
	arrive(p)
	trials := 200000
	if testing.Short() {
		trials = 20000
	}
	stale := 0
	for trial := 0; trial < trials; trial++ {
		var start, wg sync.WaitGroup
		start.Add(1)
		for g := 0; g < 4; g++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				start.Wait()
				p.share.podsChanged(1)
			}()
		}
		start.Done()
		wg.Wait()
		p.share.mu.Lock()
		pods := p.share.pods
		p.share.mu.Unlock()
		if got, want := p.share.share.Load(), shareFor(budget, pods); got != want {
			stale++
			if stale == 1 {
				t.Errorf("trial %d: %d pods, share %d, want %d", trial, pods, got, want)
			}
		}
		p.share.podsChanged(-4)
	}
	if stale > 0 {
		t.Errorf("a stale share stayed after %d of %d rounds of concurrent pod changes", stale, trials)
	}
}
