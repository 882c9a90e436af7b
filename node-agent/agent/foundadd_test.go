package agent

import (
	"errors"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/admin"
	"github.com/ambit-mesh/ambit/node-agent/hostrules"
	"github.com/ambit-mesh/ambit/node-agent/state"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

// agentHolds lists what the agent keeps of apps/web: its sandboxes
// (byCID), the namespaces it claims, and its records on disk.
func agentHolds(t *testing.T, h *harness) (cids []string, claims int, recs []string) {
	t.Helper()
	h.a.mu.Lock()
	for cid := range h.a.byCID {
		cids = append(cids, cid)
	}
	for _, cs := range h.a.claims {
		claims += len(cs)
	}
	h.a.mu.Unlock()
	stored, errs := h.a.store.List()
	for _, err := range errs {
		// A record removed between the listing and its read (a
		// release in the background): the callers poll again.
		if !errors.Is(err, os.ErrNotExist) {
			t.Fatal(err)
		}
	}
	for _, r := range stored {
		recs = append(recs, r.ContainerID)
	}
	return cids, claims, recs
}

// TestAddTakesOverItsPodsFoundSandbox: live enrollment found apps/web by
// its IP (found:apps/web) before its ADD came (the scan saw the IP
// between the IPAM plugin's work and ours). The ADD, of the same pod
// (same UID) in that same namespace, takes over: one serving, the
// ADD's, status enabled, the host entry kept. After the DEL nothing is
// left. Before, the found sandbox was served beside the ADD's (2
// servings; claimNetns let go only of other pods) and outlived the DEL
// in byCID, unnamed in byName and skipped by GC: its netns, listeners
// and claim held until the agent restarted.
func TestAddTakesOverItsPodsFoundSandbox(t *testing.T) {
	testenv.RequireRoot(t)
	hr, _ := testHostRules(t, hostrules.Config{})
	ip := netip.MustParseAddr("10.73.0.2")
	n := newNetns(t, "10.73.0.2/24")
	h := startAgent(t, "", invFound, func(o *Options) { o.Host = hr })
	waitFound(t, h)

	if resp, err := h.call(cniproto.OpAdd, "apps", "web", "cid-web", n, "10.73.0.2/24"); err != nil || resp.Decision != cniproto.Enroll {
		t.Fatalf("ADD apps/web: %+v %v", resp, err)
	}
	// Not fatal: what the DEL leaves is the leak.
	if !within(5*time.Second, func() bool {
		cids, claims, _ := agentHolds(t, h)
		return h.tun.Live() == 1 && len(cids) == 1 && claims == 1
	}) {
		cids, claims, _ := agentHolds(t, h)
		t.Errorf("after the ADD: %d servings, sandboxes %v, %d claims; want 1, [cid-web], 1", h.tun.Live(), cids, claims)
	}
	if p := served(h); p == nil || p.rec.ContainerID != "cid-web" || p.rec.NetnsInode != inodeOfNetns(t, n) {
		t.Errorf("apps/web served by %+v, want its ADD's sandbox cid-web", p)
	}
	if _, _, recs := agentHolds(t, h); len(recs) != 1 || recs[0] != "cid-web" {
		t.Errorf("records %v, want only cid-web", recs)
	}
	if _, err := h.a.store.Read(state.FileName(foundPrefix + "apps/web")); err == nil {
		t.Errorf("the found: record is still there")
	}
	if st := adminPodOf(t, h, "web"); st.State != admin.StateEnrolled || st.Reason != "" {
		t.Errorf("status of apps/web: %s %s %q; want enrolled, no failure", st.State, st.Reason, st.Message)
	}
	if got := testutil.ToFloat64(h.a.m.failures.WithLabelValues(reasonNetnsOwner)); got != 0 {
		t.Errorf("%v netns-owner failures counted for the pod's own sandbox", got)
	}
	if !sameOwners(hr.Entries(), map[netip.Addr]string{ip: "uid-web"}) {
		t.Errorf("host entries %v, want %v owned by uid-web (the release of the found sandbox must keep the ADD's)", hr.Entries(), ip)
	}
	if err := listenersAnswer(t, n); err != nil {
		t.Errorf("listeners after the ADD took over: %v", err)
	}

	delReq(t, h, "cid-web", n.path, n.file)
	if !within(5*time.Second, func() bool {
		cids, claims, recs := agentHolds(t, h)
		return h.tun.Live() == 0 && len(cids) == 0 && claims == 0 && len(recs) == 0
	}) {
		cids, claims, recs := agentHolds(t, h)
		t.Fatalf("after the DEL: %d servings, sandboxes %v, %d claims, records %v; want none", h.tun.Live(), cids, claims, recs)
	}
	if _, err := dialIn(n, "127.0.0.1:15001"); err == nil {
		t.Error("a listener is still open in the namespace after the DEL")
	}
	if e := hr.Entries(); len(e) != 0 {
		t.Errorf("host entries after the DEL: %v", e)
	}
}

// within polls cond until it holds (true) or d passes (false).
func within(d time.Duration, cond func() bool) bool {
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if cond() {
			return true
		}
	}
	return cond()
}
