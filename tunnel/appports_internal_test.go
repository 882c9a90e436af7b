package tunnel

import (
	"sync"
	"testing"
)

// TestAppPorts: the ports a pod's apps were delivered to are remembered,
// each once, from any number of deliveries at once; past the slots the
// rest are not (and nothing breaks).
func TestAppPorts(t *testing.T) {
	var a appPorts
	if a.has(8080) {
		t.Fatal("an empty set has 8080")
	}
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for _, p := range []uint16{8080, 9090, 8080, 3000} {
				a.add(p)
			}
		}()
	}
	wg.Wait()
	n := 0
	for i := range a.slots {
		if a.slots[i].Load() != 0 {
			n++
		}
	}
	if n != 3 || !a.has(8080) || !a.has(9090) || !a.has(3000) || a.has(3001) {
		t.Fatalf("after 8 × {8080, 9090, 8080, 3000}: %d slots used, has 8080/9090/3000/3001 = %v/%v/%v/%v; want 3, true, true, true, false",
			n, a.has(8080), a.has(9090), a.has(3000), a.has(3001))
	}
	for p := uint16(10000); p < 10100; p++ {
		a.add(p)
	}
	if !a.has(8080) || !a.has(10000) || a.has(10099) {
		t.Fatalf("past the slots: has 8080/10000/10099 = %v/%v/%v, want true, true, false", a.has(8080), a.has(10000), a.has(10099))
	}
}
