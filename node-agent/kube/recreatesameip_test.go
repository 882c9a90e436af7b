package kube

import (
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"

	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/record"
)

// A pod made again under its name with the same IP (a StatefulSet on a
// CNI that keeps its pods' IPs) reported by a relist as an update from
// the old UID to the new: the relist comes at any time, often long after
// the new pod started serving, so its IP must resolve throughout the
// update. Removing the old UID's entry and adding the new one in two
// steps let a lookup between them miss, and a connection then made to
// the running meshed pod went in plaintext (passthrough).
func TestRecreatedPodWithItsIPResolvesThroughTheUpdate(t *testing.T) {
	s, err := New(Config{Client: fake.NewClientset(), NodeName: "node-a", Recorder: record.NewFakeRecorder(10)})
	if err != nil {
		t.Fatal(err)
	}
	ip := netip.MustParseAddr("10.1.0.5")
	a := pod("shop", "web-0", "a", "node-b", []string{"10.1.0.5"}, nil, enabled)
	b := pod("shop", "web-0", "b", "node-b", []string{"10.1.0.5"}, nil, enabled)
	s.dir.upsert(a)

	var misses atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if wl, ok := s.WorkloadByIP(ip); !ok || !wl.Meshed {
				misses.Add(1)
			}
		}
	}()
	// Back and forth, so each update is one from another UID.
	cur, next := a, b
	for range 20000 {
		s.podUpdated(cur, next)
		cur, next = next, cur
	}
	close(stop)
	wg.Wait()
	if n := misses.Load(); n > 0 {
		t.Fatalf("10.1.0.5 did not resolve to the meshed web-0 %d times while its UID changed", n)
	}
	if wl, ok := s.WorkloadByIP(ip); !ok || wl.UID != string(cur.UID) {
		t.Fatalf("after: %+v %v, want uid %s", wl, ok, cur.UID)
	}
}
