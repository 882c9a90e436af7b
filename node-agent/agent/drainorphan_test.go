package agent

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/netnsfind"
	"github.com/ambit-mesh/ambit/node-agent/state"
	"github.com/ambit-mesh/ambit/plugin/redirect"
)

const orphansRemoved = "ambit_agent_drain_guard_orphans_removed_total"

// recordedPod is a pod namespace (ip on lo) recorded in dir's records,
// enrolled (its rules installed) or not.
func recordedPod(t *testing.T, dir, name, ip string, enrolled bool) *testNetns {
	t.Helper()
	n := newNetns(t, ip+"/24")
	ino, err := netnsfind.Inode(n.file)
	if err != nil {
		t.Fatal(err)
	}
	store, err := state.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	rec := state.Pod{Namespace: "apps", Name: name, UID: "uid-" + name, ContainerID: "cid-" + name, Netns: n.path, NetnsInode: ino,
		IPs: []netip.Addr{netip.MustParseAddr(ip)}, Enrolled: enrolled, IPv4: true, Identity: "spiffe://cluster.local/ns/apps/sa/web-sa", Since: time.Now()}
	if enrolled {
		rec.Backend = string(redirect.Nftables)
		if _, err := (Rules{}).Install(context.Background(), n.file, redirect.Nftables, redirect.DefaultSpec()); err != nil {
			t.Fatal(err)
		}
	}
	if err := store.Put(rec); err != nil {
		t.Fatal(err)
	}
	return n
}

// guardedPod is recordedPod holding a drain guard added by the package's
// own function as an agent that died mid-drain left it: no drain of this
// process counts it.
func guardedPod(t *testing.T, dir, name, ip string, enrolled bool) *testNetns {
	t.Helper()
	n := recordedPod(t, dir, name, ip, enrolled)
	addGuard(t, n)
	return n
}

// addGuard adds a guard to n as an agent's drain does, counted by no
// drain of this process, and removes whatever is left at the end.
func addGuard(t *testing.T, n *testNetns) {
	t.Helper()
	if err := addDrainGuard(n.file, redirect.DefaultSpec()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { delDrainGuard(n.file) })
	if guardLeft(t, n) == "" {
		t.Fatal("no guard seen after adding it (the checks after would prove nothing)")
	}
}

// heldWithADeadAgent holds n's drain guard as this process's drain,
// shared with an entry another agent added and, dead, never released.
func heldWithADeadAgent(t *testing.T, n *testNetns) {
	t.Helper()
	t.Cleanup(func() { delDrainGuard(n.file) })
	if err := newDrainHolders().hold(n.file, redirect.DefaultSpec()); err != nil { // the old agent's, never released
		t.Fatal(err)
	}
	if err := holdDrainGuard(n.file, redirect.DefaultSpec()); err != nil {
		t.Fatal(err)
	}
}

// peeredAgent is an agent told another agent runs on the node for as
// long as peer holds (true at start); asked counts how often it asked.
type peeredAgent struct {
	reg   *prometheus.Registry
	peer  atomic.Bool
	asked atomic.Int64
}

func startPeeredAgent(t *testing.T, dir, inv string) *peeredAgent {
	t.Helper()
	p := &peeredAgent{reg: prometheus.NewRegistry()}
	p.peer.Store(true)
	startAgent(t, dir, inv, func(o *Options) {
		o.Registerer = p.reg
		o.Peers = func() bool { p.asked.Add(1); return p.peer.Load() }
	})
	return p
}

// askedAgain waits until the agent's loops asked a few more times
// whether another agent runs (the audit loop and the record follower,
// each second): what they would remove by then they have.
func (p *peeredAgent) askedAgain(t *testing.T) {
	t.Helper()
	n := p.asked.Load()
	eventually(t, "the agent asking again whether another agent runs", func() bool { return p.asked.Load() >= n+4 })
}

// TestOrphanedDrainGuardRemovedAtAdoption: an agent killed mid-drain
// left its guard in the pod; the next agent, alone on the node, adopts
// the pod's record and removes the guard, whatever the pod is now: out
// of the mesh (the record written before the crash), unlabelled while
// no agent ran (the crash came before the record), or enrolled again.
// Before, it stayed until the pod's next unenrollment or deletion. A
// guard a drain of this process holds is left to that drain.
func TestOrphanedDrainGuardRemovedAtAdoption(t *testing.T) {
	testenv.RequireRoot(t)
	for i, c := range []struct {
		name     string
		enrolled bool
		inv      string
		served   bool
	}{
		{"unenrolled", false, invAmbient + "    labels: {ambit.dev/dataplane-mode: none}\n", false},
		{"unlabelled-while-away", true, invAmbient + "    labels: {ambit.dev/dataplane-mode: none}\n", false},
		{"enrolled-again", true, invAmbient, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := agentDir(t)
			pod := guardedPod(t, dir, "web", fmt.Sprintf("10.95.%d.2", i), c.enrolled)
			reg := prometheus.NewRegistry()
			h := startAgent(t, dir, c.inv, func(o *Options) {
				o.Registerer = reg
				o.Peers = func() bool { return false }
			})
			// Adoption ends before the agent is ready.
			if left := guardLeft(t, pod); left != "" {
				t.Fatalf("the adopting agent, alone on the node, left the dead agent's guard:\n%s", left)
			}
			if n := testenv.Metric(t, reg, orphansRemoved, nil); n != 1 {
				t.Fatalf("%s = %v, want 1", orphansRemoved, n)
			}
			unlock := h.a.lock("apps", "web")
			p := h.a.podByName("apps/web")
			served := p != nil && p.enrolled()
			unlock()
			if served != c.served {
				t.Fatalf("pod served: %v, want %v", served, c.served)
			}
			installed, err := (Rules{}).Installed(context.Background(), pod.file)
			if err != nil {
				t.Fatal(err)
			}
			if (len(installed) > 0) != c.served {
				t.Fatalf("rules in the pod: %v, want some: %v", installed, c.served)
			}
		})
	}
	t.Run("held-by-a-drain-of-this-process", func(t *testing.T) {
		dir := agentDir(t)
		pod := guardedPod(t, dir, "web", "10.95.9.2", false)
		if err := holdDrainGuard(pod.file, redirect.DefaultSpec()); err != nil {
			t.Fatal(err)
		}
		reg := prometheus.NewRegistry()
		startAgent(t, dir, invAmbient+"    labels: {ambit.dev/dataplane-mode: none}\n", func(o *Options) { o.Registerer = reg })
		if guardLeft(t, pod) == "" {
			releaseDrainGuard(pod.file)
			t.Fatal("adoption removed the guard a drain of this process holds")
		}
		if err := releaseDrainGuard(pod.file); err != nil {
			t.Fatal(err)
		}
		if left := guardLeft(t, pod); left != "" {
			t.Fatalf("after the drain the pod still holds:\n%s", left)
		}
		if n := testenv.Metric(t, reg, orphansRemoved, nil); n != 0 {
			t.Fatalf("%s = %v, want 0", orphansRemoved, n)
		}
	})
}

// TestDrainGuardLeftWhileAnotherAgentRuns: during a surge upgrade the
// old agent may be draining a pod the new one adopts, through a guard
// that looks like a dead agent's; the new agent leaves it while another
// agent runs, and once none does removes it, and the guard of a pod it
// met while the other ran (that agent unenrolled it later, and died
// mid-drain) too.
func TestDrainGuardLeftWhileAnotherAgentRuns(t *testing.T) {
	testenv.RequireRoot(t)
	dir := agentDir(t)
	before := guardedPod(t, dir, "web", "10.95.20.2", false)
	later := recordedPod(t, dir, "api", "10.95.21.2", false)
	ag := startPeeredAgent(t, dir, invAmbient+"    labels: {ambit.dev/dataplane-mode: none}\n")
	if guardLeft(t, before) == "" {
		t.Fatal("the guard of a pod another agent of the node may be draining was removed at adoption")
	}
	addGuard(t, later) // the other agent unenrolls api, then dies
	ag.askedAgain(t)
	if guardLeft(t, before) == "" || guardLeft(t, later) == "" {
		t.Fatal("a guard removed while another agent runs")
	}
	if n := testenv.Metric(t, ag.reg, orphansRemoved, nil); n != 0 {
		t.Fatalf("%s = %v while another agent runs, want 0", orphansRemoved, n)
	}
	ag.peer.Store(false)
	eventually(t, "both guards removed once no other agent runs", func() bool {
		return guardLeft(t, before) == "" && guardLeft(t, later) == ""
	})
	if n := testenv.Metric(t, ag.reg, orphansRemoved, nil); n != 2 {
		t.Fatalf("%s = %v, want 2", orphansRemoved, n)
	}
}

// TestDrainGuardFailureCounted: a hold that cannot add the guard (here:
// no namespace to add it to) is an unenrollment whose connections are
// cut, counted; a hold that succeeds is not.
func TestDrainGuardFailureCounted(t *testing.T) {
	testenv.RequireRoot(t)
	const name = "ambit_agent_drain_guard_failures_total"
	reg := prometheus.NewRegistry()
	newMetrics(reg)
	base := testenv.Metric(t, reg, name, nil)
	pod := newNetns(t, "10.95.30.2/24")
	if err := holdDrainGuard(pod.file, redirect.DefaultSpec()); err != nil {
		t.Fatal(err)
	}
	if err := releaseDrainGuard(pod.file); err != nil {
		t.Fatal(err)
	}
	if n := testenv.Metric(t, reg, name, nil); n != base {
		t.Fatalf("%s = %v after a guard held, want %v", name, n, base)
	}
	notNetns, err := os.Create(filepath.Join(t.TempDir(), "not-a-netns"))
	if err != nil {
		t.Fatal(err)
	}
	defer notNetns.Close()
	if err := holdDrainGuard(notNetns, redirect.DefaultSpec()); err == nil {
		releaseDrainGuard(notNetns)
		t.Fatal("a guard held in a file that is no namespace")
	}
	if n := testenv.Metric(t, reg, name, nil); n != base+1 {
		t.Fatalf("%s = %v after a failed guard, want %v", name, n, base+1)
	}
}

// TestDrainGuardLeftToADeadAgentSwept: the new agent adopted a pod while
// the old one ran, and unenrolled it again while the old one drained it;
// the old agent died mid-drain, its entry left in the guard, so the new
// agent's drain ends without removing the guard (the entry may be a live
// agent's, as far as the guard tells). The namespace stays remembered
// while the new agent's drain holds it, and once no other agent runs and
// the drain ended the guard is removed. Before, the sweep that came
// while the drain held the guard forgot the namespace, and the guard
// stayed.
func TestDrainGuardLeftToADeadAgentSwept(t *testing.T) {
	testenv.RequireRoot(t)
	dir := agentDir(t)
	pod := recordedPod(t, dir, "web", "10.95.40.2", false)
	ag := startPeeredAgent(t, dir, invAmbient+"    labels: {ambit.dev/dataplane-mode: none}\n")
	heldWithADeadAgent(t, pod)
	released := false
	defer func() {
		if !released {
			releaseDrainGuard(pod.file)
		}
	}()
	ag.peer.Store(false) // the old agent died
	ag.askedAgain(t)
	if guardLeft(t, pod) == "" {
		t.Fatal("the guard a drain of this process holds was removed")
	}
	released = true
	if err := releaseDrainGuard(pod.file); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the guard left to the dead agent's entry removed", func() bool { return guardLeft(t, pod) == "" })
	if n := testenv.Metric(t, ag.reg, orphansRemoved, nil); n != 1 {
		t.Fatalf("%s = %v, want 1", orphansRemoved, n)
	}
}

// TestDrainGuardLeftToADeadAgentSweptUnadopted: as
// TestDrainGuardLeftToADeadAgentSwept, for a pod this agent never met by
// adoption (it served the pod's ADD itself, or enrolled it live), so no
// sweep remembered its namespace. The old agent's entry outlived it, and
// this agent's drain ended without removing the guard; nothing
// remembered the namespace, so the guard stayed for as long as the pod,
// and each later drain of this agent shared it with the dead entry and
// left it again. Now a release that leaves the guard to other entries
// remembers the namespace for the sweep.
func TestDrainGuardLeftToADeadAgentSweptUnadopted(t *testing.T) {
	testenv.RequireRoot(t)
	dir := agentDir(t)
	pod := newNetns(t, "10.95.41.2/24")
	ag := startPeeredAgent(t, dir, invAmbient)
	heldWithADeadAgent(t, pod)
	if err := releaseDrainGuard(pod.file); err != nil {
		t.Fatal(err)
	}
	if guardLeft(t, pod) == "" {
		t.Fatal("the guard was removed while the other agent's entry named it (the check below would prove nothing)")
	}
	ag.peer.Store(false) // the old agent died
	eventually(t, "the guard left to the dead agent's entry removed", func() bool { return guardLeft(t, pod) == "" })
	if n := testenv.Metric(t, ag.reg, orphansRemoved, nil); n != 1 {
		t.Fatalf("%s = %v, want 1", orphansRemoved, n)
	}
}
