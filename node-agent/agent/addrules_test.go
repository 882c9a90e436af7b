package agent

import (
	"context"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/admin"
	"github.com/ambit-mesh/ambit/node-agent/cluster"
	"github.com/ambit-mesh/ambit/node-agent/config"
	"github.com/ambit-mesh/ambit/node-agent/hostrules"
	"github.com/ambit-mesh/ambit/node-agent/inventory"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
	"github.com/ambit-mesh/ambit/plugin/redirect"
)

// TestAddHostRunBoundIsAHostRuleError: the host rules use
// iptables-legacy and must be rewritten while a run hangs past the
// tool's own bound (here 300 ms, the held xtables lock standing in for
// a hung iptables), with the request's deadline (4 s) still far off. That
// is a host-rule error like any other: the pod is enrolled and served,
// the error logged, and the reconcile loop writes its entry once
// iptables works again. Before, the run's error wrapped
// context.DeadlineExceeded and the ADD refused the pod as out of time
// (retryable, counted rules-deadline), as with a requestTimeout above
// the default 10 s bound. The request's own deadline still refuses it:
// TestAddWhileHostRulesWaitForXtablesLock.
func TestAddHostRunBoundIsAHostRuleError(t *testing.T) {
	testenv.RequireRoot(t)
	hr, hostNS := testHostRules(t, hostrules.Config{Backend: "iptables-legacy", RunTimeout: 300 * time.Millisecond})
	h := startAgent(t, "", invAmbient, func(o *Options) {
		o.Host = hr
		o.Config.RequestTimeout = config.Duration{Duration: 4 * time.Second}
	})
	n := newNetns(t, "10.95.5.2/24")
	run(t, "ip", "netns", "exec", hostNS.name, "iptables-legacy", "-t", "nat", "-F", "AMBIT-POSTRT")
	run(t, "ip", "netns", "exec", hostNS.name, "ipset", "destroy", "ambit-probes-v4")
	release := testenv.HoldXtablesLock(t)

	resp, err := h.call(cniproto.OpAdd, "apps", "web", "cid-web", n, "10.95.5.2/24")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("ADD while a host-rule run outlasts its own bound: %+v", resp)
	if resp.Error != "" || resp.Decision != cniproto.Enroll {
		t.Fatalf("answer %+v, want enrolled (the host-rule error logged)", resp)
	}
	if v := testutil.ToFloat64(h.a.m.failures.WithLabelValues("rules-deadline")); v != 0 {
		t.Errorf("enrollment failures for rules-deadline: %v, want 0", v)
	}
	if h.tun.Live() != 1 {
		t.Errorf("%d servings, want 1", h.tun.Live())
	}

	release()
	if err := hr.Reconcile(); err != nil {
		t.Fatalf("the reconcile loop's pass once iptables works: %v", err)
	}
	out, err := exec.Command("ip", "netns", "exec", hostNS.name, "ipset", "list", "ambit-probes-v4").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "10.95.5.2") {
		t.Errorf("the host's set after the repair: %v\n%s", err, out)
	}
}

// staleView is the cluster view with an API status that still names a
// previous sandbox's IPs for one pod (the view lags the runtime). The
// pod is not among the running pods the agent's own loop enrolls, as
// for a pod whose sandbox is being created, so the tests using it see
// the ADD alone (that loop refuses the other pod's netns now:
// TestLiveEnrollNeverTakesAnotherPodsNetns).
type staleView struct {
	*inventory.Source
	name string
	ips  []netip.Addr
}

func (v staleView) Pod(ctx context.Context, namespace, name string) (cluster.Pod, bool, error) {
	p, ok, err := v.Source.Pod(ctx, namespace, name)
	if ok && namespace+"/"+name == v.name {
		p.IPs = v.ips
	}
	return p, ok, err
}

func (v staleView) LocalPods() []cluster.Pod {
	return slices.DeleteFunc(v.Source.LocalPods(), func(p cluster.Pod) bool { return p.Namespace+"/"+p.Name == v.name })
}

// TestCutAddReleasesWhatItAdded: apps/web's ADD brings its sandbox's IP
// (10.95.6.2) while the view still names 10.95.6.3, a previous
// sandbox's, given since to apps/other, enrolled on this node. The ADD
// is cut at its deadline (its iptables-legacy rules wait on the held
// xtables lock) after its host probe entry went in. The release must
// take back exactly that entry and leave apps/other's: the host's
// entries are then apps/other's alone, in the Manager and in the
// kernel, and the retried ADD adds web's own IP. Before, the ADD added
// the view's IP, taking apps/other's entry over (owner uid-web), and
// the release removed the request's IP, which was never added: the
// entry stayed under web's UID, and web's own IP had none.
func TestCutAddReleasesWhatItAdded(t *testing.T) {
	testenv.RequireRoot(t)
	hr, hostNS := testHostRules(t, hostrules.Config{})
	web, other := netip.MustParseAddr("10.95.6.2"), netip.MustParseAddr("10.95.6.3")
	h := startAgent(t, "", invAmbient, func(o *Options) {
		o.Host = hr
		o.View = staleView{Source: o.View.(*inventory.Source), name: "apps/web", ips: []netip.Addr{other}}
		o.Config.RequestTimeout = config.Duration{Duration: 2 * time.Second}
	})
	on := newNetns(t, "10.95.6.3/24")
	if resp, err := h.call(cniproto.OpAdd, "apps", "other", "cid-other", on, "10.95.6.3/24"); err != nil || resp.Decision != cniproto.Enroll {
		t.Fatalf("ADD apps/other: %+v %v", resp, err)
	}
	n := newNetns(t, "10.95.6.2/24")
	release := testenv.HoldXtablesLock(t)
	add := func() (*cniproto.Response, error) {
		return h.callBackend(redirect.IptablesLegacy, cniproto.OpAdd, "apps", "web", "cid-web", n, "10.95.6.2/24")
	}
	resp, err := add()
	if err != nil || !resp.Retryable {
		t.Fatalf("ADD cut by the xtables lock: %+v %v, want a retryable error", resp, err)
	}
	eventually(t, "web's listeners released", func() bool { return h.tun.Live() == 1 })
	want := map[netip.Addr]string{other: "uid-other"}
	// The release runs in the background: waited for, up to 15 s.
	for end := time.Now().Add(15 * time.Second); !sameOwners(hr.Entries(), want) && time.Now().Before(end); {
		time.Sleep(20 * time.Millisecond)
	}
	if got := hr.Entries(); !sameOwners(got, want) {
		t.Fatalf("host entries after the cut ADD's release: %v, want %v", got, want)
	}
	set := hostSet(t, hostNS)
	if !strings.Contains(set, other.String()) || strings.Contains(set, web.String()) {
		t.Errorf("the host's set after the cut ADD's release: want %s and not %s:\n%s", other, web, set)
	}

	release()
	if resp, err := add(); err != nil || resp.Error != "" || resp.Decision != cniproto.Enroll {
		t.Fatalf("ADD retried once the lock is free: %+v %v", resp, err)
	}
	want[web] = "uid-web"
	if got := hr.Entries(); !sameOwners(got, want) {
		t.Errorf("host entries after the retried ADD: %v, want %v", got, want)
	}
}

func sameOwners(a, b map[netip.Addr]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// hostSet is the nftables host rules' table as nft lists it in hostNS.
func hostSet(t *testing.T, hostNS *testNetns) string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "exec", hostNS.name, "nft", "list", "table", "inet", "ambit-host").CombinedOutput()
	if err != nil {
		t.Fatalf("nft list table: %v\n%s", err, out)
	}
	return string(out)
}

// TestCheckReadoptionRecordsBackend: a CHECK re-adopts a pod whose
// iptables-legacy rules are in while no agent has its record (enrolled
// by an agent whose state is gone). Status names the engine holding its
// rules, and so does the record after a restart. Before, the
// re-adoption recorded none: BACKEND showed `-` until a repair.
func TestCheckReadoptionRecordsBackend(t *testing.T) {
	testenv.RequireRoot(t)
	n := newNetns(t, "10.95.7.2/24")
	call := func(h *harness, op cniproto.Op, backend redirect.Backend) *cniproto.Response {
		t.Helper()
		resp, err := h.callBackend(backend, op, "apps", "web", "cid-web", n, "10.95.7.2/24")
		if err != nil || resp.Error != "" || resp.Decision != cniproto.Enroll {
			t.Fatalf("%s: %+v %v", op, resp, err)
		}
		return resp
	}
	h1 := startAgent(t, "", invAmbient)
	call(h1, cniproto.OpAdd, redirect.IptablesLegacy)
	h1.stop()

	dir := agentDir(t)
	h := startAgent(t, dir, invAmbient)
	call(h, cniproto.OpCheck, "")
	if p := adminPodOf(t, h, "web"); p.Backend != string(redirect.IptablesLegacy) {
		t.Errorf("after the CHECK's re-adoption: backend %q, want %s", p.Backend, redirect.IptablesLegacy)
	}
	h.stop()
	h2 := startAgent(t, dir, invAmbient)
	if p := adminPodOf(t, h2, "web"); p.State != admin.StateEnrolled || p.Backend != string(redirect.IptablesLegacy) {
		t.Errorf("after a restart: %s, backend %q; want enrolled, %s (recorded)", p.State, p.Backend, redirect.IptablesLegacy)
	}
}
