package kube

import (
	"context"
	"fmt"
	"net/netip"
	"testing"
	"time"

	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/record"
)

// WaitSynced means the workload directory and the Service index hold the
// initial lists, not only the informers' stores: both are built by the
// informers' handlers, which client-go runs after the store is filled,
// on their own goroutines. An agent that served as soon as the stores
// were synced took a meshed pod, or a Service's clusterIP, still waiting
// in a handler for an address outside the mesh and connected in
// plaintext. Here the handlers are held (s.wait.mu, which both the pod
// handler and a Service rebuild take) until the stores are synced.
func TestWaitSyncedWaitsForTheHandlers(t *testing.T) {
	ports := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}}
	objs := []runtime.Object{clusterIPService("web", "10.96.0.10", 80),
		slice("web-a", "web", discoveryv1.AddressTypeIPv4, ports, ep("10.1.0.1", nil))}
	for i := range 5 {
		objs = append(objs, pod("shop", fmt.Sprintf("p%d", i), "", "node-b", []string{fmt.Sprintf("10.1.0.%d", 10+i)}, nil, enabled))
	}
	client := fake.NewClientset(objs...)
	s, err := New(Config{Client: client, NodeName: "node-a", Recorder: record.NewFakeRecorder(100)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() { cancel(); s.Close() })

	s.wait.mu.Lock()
	held := true
	defer func() {
		if held {
			s.wait.mu.Unlock()
		}
	}()
	s.Start(ctx)
	eventually(t, "the informers' stores", func() bool {
		return s.localPods.HasSynced() && s.allPods.HasSynced() && s.namespaces.HasSynced() &&
			s.services.HasSynced() && s.slices.HasSynced() && s.nodeSynced.HasSynced() && s.nodesSynced.HasSynced()
	})
	// The handlers cannot finish while s.wait.mu is held: WaitSynced
	// must not report the view ready.
	wctx, wcancel := context.WithTimeout(ctx, 200*time.Millisecond)
	err = s.WaitSynced(wctx)
	wcancel()
	if err == nil {
		var missing []string
		for i := range 5 {
			if _, ok := s.WorkloadByIP(netip.MustParseAddr(fmt.Sprintf("10.1.0.%d", 10+i))); !ok {
				missing = append(missing, fmt.Sprintf("p%d", i))
			}
		}
		_, svcOK := s.ServiceEndpoints(netip.MustParseAddrPort("10.96.0.10:80"))
		t.Fatalf("WaitSynced returned nil while the handlers were held: pods not in the directory %v, Service indexed %v", missing, svcOK)
	}
	s.wait.mu.Unlock()
	held = false
	wctx, wcancel = context.WithTimeout(ctx, 10*time.Second)
	defer wcancel()
	if err := s.WaitSynced(wctx); err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		if wl, ok := s.WorkloadByIP(netip.MustParseAddr(fmt.Sprintf("10.1.0.%d", 10+i))); !ok || !wl.Meshed {
			t.Fatalf("after WaitSynced p%d: %+v %v", i, wl, ok)
		}
	}
	if eps, ok := s.ServiceEndpoints(netip.MustParseAddrPort("10.96.0.10:80")); !ok || len(eps) != 1 {
		t.Fatalf("after WaitSynced the Service: %v %v", eps, ok)
	}
}
