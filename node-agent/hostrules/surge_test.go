package hostrules

import (
	"context"
	"net/netip"
	"sync/atomic"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
)

// surgePair is a surge upgrade's two agents on one host: old yields to
// neu once ready is set.
func surgePair(t *testing.T, backend string, tp *topo) (old, neu *Manager, ready *atomic.Bool) {
	t.Helper()
	ready = new(atomic.Bool)
	old, err := New(Config{Backend: backend, NetNS: tp.hostNS, Shared: true,
		Yield: ready.Load, Registerer: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { old.Uninstall() })
	neu, err = New(Config{Backend: backend, NetNS: tp.hostNS, Shared: true,
		Registerer: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	return old, neu, ready
}

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
			old, neu, newReady := surgePair(t, bc.backend, tp)
			if err := old.Sync(map[string][]netip.Addr{"a": {podV4}, "b": {other}}); err != nil {
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
			if d, err := neu.be.check(context.Background(), map[netip.Addr]string{third: "c"}); err != nil || d != "" {
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
			old, neu, newReady := surgePair(t, bc.backend, tp)
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
			if d, err := neu.be.check(context.Background(), map[netip.Addr]string{podV4: "b"}); err != nil || d != "" {
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

// TestYieldingAgentLeavesAFailedRemoveToItsSuccessor: a rollout that
// also turns IPv6 off (ConfigMap ipv6: off, then a rollout restart). The
// new agent's table has no v6 set. A dual-stack pod deleted during the
// overlap is released by both agents, and the old agent's removal of its
// IPv6 address fails on the missing set (the whole nftables transaction
// with it). The old agent has yielded: the rules are the new agent's. It
// must not fall back to a full rewrite from its own picture, which drops
// the pods only the new agent knows (their probes go out without SNAT
// until the new agent repairs it) and puts back the v6 set and rule the
// new agent does not want.
func TestYieldingAgentLeavesAFailedRemoveToItsSuccessor(t *testing.T) {
	tp := newTopo(t)
	tp.server(t)
	other := netip.MustParseAddr("10.77.1.9")
	third := netip.MustParseAddr("10.77.1.3")
	var newReady atomic.Bool
	reg := prometheus.NewRegistry()
	old, err := New(Config{Backend: BackendNFTables, NetNS: tp.hostNS, Shared: true,
		Yield: newReady.Load, Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { old.Uninstall() })
	if err := old.Sync(map[string][]netip.Addr{"a": {podV4, podV6}, "b": {other}}); err != nil {
		t.Fatal(err)
	}
	neu, err := New(Config{Backend: BackendNFTables, NetNS: tp.hostNS, Shared: true, IPv4Only: true,
		Registerer: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	if err := neu.Sync(map[string][]netip.Addr{"a": {podV4, podV6}, "b": {other}, "c": {third}}); err != nil {
		t.Fatal(err)
	}
	newReady.Store(true)
	want := map[netip.Addr]string{other: "b", third: "c"}

	if err := neu.Remove("a", []netip.Addr{podV4, podV6}); err != nil {
		t.Fatal(err)
	}
	if err := old.Remove("a", []netip.Addr{podV4, podV6}); err != nil {
		t.Fatalf("old agent's Remove: %v (the failure is left to the new agent, not an error of the caller's)", err)
	}
	if d, err := neu.be.check(context.Background(), want); err != nil || d != "" {
		t.Fatalf("after the yielding agent's failed removal: drift %q, %v (it rewrote the rules from its own picture)", d, err)
	}
	if got := sourceSeen(t, tp.hostNS, "10.77.1.3:8080"); got != probe4 {
		t.Fatalf("pod c (known only to the new agent): probe source %s, want %s", got, probe4)
	}
	// The same for an ADD the old agent was still finishing when the new
	// one took the plugin socket.
	if err := old.Add("d", []netip.Addr{netip.MustParseAddr("10.77.1.20"), netip.MustParseAddr("fd00:77:1::20")}); err != nil {
		t.Fatalf("old agent's Add: %v", err)
	}
	if d, err := neu.be.check(context.Background(), want); err != nil || d != "" {
		t.Fatalf("after the yielding agent's failed add: drift %q, %v", d, err)
	}
	if n := counterValue(old.failures); n != 2 {
		t.Fatalf("old agent's ambit_host_rules_errors_total = %v, want 2 (one per failed write)", n)
	}
	if err := neu.Reconcile(); err != nil {
		t.Fatal(err)
	}
	if old.Repairs() != 0 || neu.Repairs() != 0 {
		t.Fatalf("repairs: old %d, new %d", old.Repairs(), neu.Repairs())
	}

	// The new agent dies before the old one is stopped (a crash loop):
	// the old agent is in charge again and its next reconcile writes
	// its own picture, the removal it could not apply included.
	newReady.Store(false)
	if err := old.Reconcile(); err != nil {
		t.Fatal(err)
	}
	if d, err := old.be.check(context.Background(), old.Entries()); err != nil || d != "" {
		t.Fatalf("old agent in charge again: drift %q, %v", d, err)
	}
	if _, ok := old.Entries()[podV4]; ok {
		t.Fatal("the old agent forgot that pod a was removed")
	}
}

// failIncremental is a backend whose single-entry updates fail, as a
// transient netlink error would make them (ENOBUFS: the kernel could not
// queue the answer); checks and full writes go to the real backend.
type failIncremental struct{ backend }

func (failIncremental) upsert(map[netip.Addr]string, map[netip.Addr]bool) error { return unix.ENOBUFS }
func (failIncremental) remove([]netip.Addr) error                               { return unix.ENOBUFS }

// TestYieldingAgentLeavesAFailedWriteToItsSuccessor: the same for every
// backend, with a transient failure of the single-entry update (injected
// at the backend: no real one is known for ipset that a full write would
// survive). Before, the yielding agent rewrote the sets from its own
// stale picture and dropped the new agent's pods.
func TestYieldingAgentLeavesAFailedWriteToItsSuccessor(t *testing.T) {
	for _, bc := range backends() {
		t.Run(bc.name, func(t *testing.T) {
			tp := newTopo(t)
			other := netip.MustParseAddr("10.77.1.9")
			third := netip.MustParseAddr("10.77.1.3")
			old, neu, newReady := surgePair(t, bc.backend, tp)
			if err := old.Sync(map[string][]netip.Addr{"a": {podV4}, "b": {other}}); err != nil {
				t.Fatal(err)
			}
			if err := neu.Sync(map[string][]netip.Addr{"a": {podV4}, "b": {other}, "c": {third}}); err != nil {
				t.Fatal(err)
			}
			newReady.Store(true)
			old.be = failIncremental{old.be}
			if err := old.Remove("a", []netip.Addr{podV4}); err != nil {
				t.Fatal(err)
			}
			want := map[netip.Addr]string{podV4: "a", other: "b", third: "c"}
			if d, err := neu.be.check(context.Background(), want); err != nil || d != "" {
				t.Fatalf("after the yielding agent's failed removal: drift %q, %v (want the new agent's picture)", d, err)
			}
			if err := old.Add("d", []netip.Addr{netip.MustParseAddr("10.77.1.20")}); err != nil {
				t.Fatal(err)
			}
			if d, err := neu.be.check(context.Background(), want); err != nil || d != "" {
				t.Fatalf("after the yielding agent's failed add: drift %q, %v", d, err)
			}
		})
	}
}

// TestMiddleAgentSyncingBesideAReadySuccessor: three agents on a node (a
// rollout started during a surge). The middle one finishes its
// re-adoption after the newest is already ready: its Sync must not
// rewrite the sets from its picture, which lacks the pods the newest one
// enrolled since it took the plugin socket. Its later single-entry
// updates stay incremental (no first full write either).
func TestMiddleAgentSyncingBesideAReadySuccessor(t *testing.T) {
	for _, bc := range backends() {
		t.Run(bc.name, func(t *testing.T) {
			tp := newTopo(t)
			other := netip.MustParseAddr("10.77.1.9")
			third := netip.MustParseAddr("10.77.1.3")
			mid, newest, newestReady := surgePair(t, bc.backend, tp)
			if err := newest.Sync(map[string][]netip.Addr{"a": {podV4}, "b": {other}, "c": {third}}); err != nil {
				t.Fatal(err)
			}
			newestReady.Store(true)
			if err := mid.Sync(map[string][]netip.Addr{"a": {podV4}, "b": {other}}); err != nil {
				t.Fatal(err)
			}
			want := map[netip.Addr]string{podV4: "a", other: "b", third: "c"}
			if d, err := newest.be.check(context.Background(), want); err != nil || d != "" {
				t.Fatalf("after the middle agent's Sync: drift %q, %v (want the newest agent's picture)", d, err)
			}
			fourth := netip.MustParseAddr("10.77.1.20")
			if err := mid.Add("d", []netip.Addr{fourth}); err != nil {
				t.Fatal(err)
			}
			want[fourth] = "d"
			if d, err := newest.be.check(context.Background(), want); err != nil || d != "" {
				t.Fatalf("after the middle agent's Add: drift %q, %v (want the newest agent's picture and d)", d, err)
			}
		})
	}
}
