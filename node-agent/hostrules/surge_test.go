package hostrules

import (
	"net/netip"
	"sync/atomic"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// TestSurgeBothRemoveADeletedPod: during a surge upgrade both agents
// watch the API, so a pod deleted then is released by both, and both
// remove its probe entry. The second removal finds the entry gone. That
// is what it wanted, not drift: it must neither count a repair (e2e/kube's
// rolling update fails on repairs) nor rewrite the sets from its own
// picture — for the old agent, yielding to its ready successor, that
// would drop the entries of pods only the successor knows.
func TestSurgeBothRemoveADeletedPod(t *testing.T) {
	for _, bc := range backends() {
		t.Run(bc.name, func(t *testing.T) {
			tp := newTopo(t)
			tp.server(t)
			other := netip.MustParseAddr("10.77.1.9")
			third := netip.MustParseAddr("10.77.1.3")
			var newReady atomic.Bool
			old, err := New(Config{Backend: bc.backend, NetNS: tp.hostNS, Shared: true,
				Yield: newReady.Load, Registerer: prometheus.NewRegistry()})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { old.Uninstall() })
			if err := old.Sync(map[string][]netip.Addr{"a": {podV4}, "b": {other}}); err != nil {
				t.Fatal(err)
			}
			neu, err := New(Config{Backend: bc.backend, NetNS: tp.hostNS, Shared: true,
				Registerer: prometheus.NewRegistry()})
			if err != nil {
				t.Fatal(err)
			}
			// The new agent is ready, with a pod created during the surge
			// that the old one never enrolled.
			if err := neu.Sync(map[string][]netip.Addr{"a": {podV4}, "b": {other}, "c": {third}}); err != nil {
				t.Fatal(err)
			}
			newReady.Store(true)
			// Pod a is deleted; each agent releases it, the new one first
			// and then the old one (and the other way round).
			if err := neu.Remove("a", []netip.Addr{podV4}); err != nil {
				t.Fatal(err)
			}
			if err := old.Remove("a", []netip.Addr{podV4}); err != nil {
				t.Fatal(err)
			}
			if err := old.Remove("b", []netip.Addr{other}); err != nil {
				t.Fatal(err)
			}
			if err := neu.Remove("b", []netip.Addr{other}); err != nil {
				t.Fatal(err)
			}
			if d, err := neu.be.check(map[netip.Addr]string{third: "c"}); err != nil || d != "" {
				t.Fatalf("after both agents removed a and b: drift %q, %v (want only the new agent's c)", d, err)
			}
			for _, m := range []*Manager{old, neu} {
				if err := m.Reconcile(); err != nil {
					t.Fatal(err)
				}
			}
			if old.Repairs() != 0 || neu.Repairs() != 0 {
				t.Fatalf("repairs: old %d, new %d; an entry both agents removed is not drift", old.Repairs(), neu.Repairs())
			}
		})
	}
}

// TestSurgeIPReusedAfterTheOtherAgentRemovedIt: a pod's IP goes to a new
// pod, and this agent learns of the new pod before the old one's
// deletion, while the other agent on the node already removed the old
// pod's entry. Moving the entry to the new owner must not fail on the
// missing element: that sent the Manager to a full rewrite, counted as a
// repair.
func TestSurgeIPReusedAfterTheOtherAgentRemovedIt(t *testing.T) {
	for _, bc := range backends() {
		t.Run(bc.name, func(t *testing.T) {
			tp := newTopo(t)
			tp.server(t)
			var newReady atomic.Bool
			old, err := New(Config{Backend: bc.backend, NetNS: tp.hostNS, Shared: true,
				Yield: newReady.Load, Registerer: prometheus.NewRegistry()})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { old.Uninstall() })
			neu, err := New(Config{Backend: bc.backend, NetNS: tp.hostNS, Shared: true,
				Registerer: prometheus.NewRegistry()})
			if err != nil {
				t.Fatal(err)
			}
			for _, m := range []*Manager{old, neu} {
				if err := m.Sync(map[string][]netip.Addr{"a": {podV4}}); err != nil {
					t.Fatal(err)
				}
			}
			newReady.Store(true)
			if err := old.Remove("a", []netip.Addr{podV4}); err != nil {
				t.Fatal(err)
			}
			if err := neu.Add("b", []netip.Addr{podV4}); err != nil {
				t.Fatal(err)
			}
			if d, err := neu.be.check(map[netip.Addr]string{podV4: "b"}); err != nil || d != "" {
				t.Fatalf("after the IP moved to b: drift %q, %v", d, err)
			}
			if err := neu.Reconcile(); err != nil {
				t.Fatal(err)
			}
			if neu.Repairs() != 0 {
				t.Fatalf("new agent repairs = %d; the entry the other agent removed is not drift", neu.Repairs())
			}
		})
	}
}
