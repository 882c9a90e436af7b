package agent

import (
	"context"
	"slices"
	"testing"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/admin"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
	"github.com/ambit-mesh/ambit/plugin/redirect"
)

// adminPodOf is apps/name as h's agent answers `ambit-agent status`.
func adminPodOf(t *testing.T, h *harness, name string) admin.Pod {
	t.Helper()
	for _, p := range h.a.AdminPods(context.Background()) {
		if p.Namespace == "apps" && p.Name == name {
			return p
		}
	}
	t.Fatalf("apps/%s not in the status", name)
	return admin.Pod{}
}

// TestStatusBackendAtAddSurvivesRestart: status names the rule engine
// holding a pod's redirection (BACKEND) from what the agent recorded, so
// a restarted agent still names it. A pod enrolled at ADD, its rules
// switched to iptables-legacy by a repeated ADD (the conflist's backend
// changed), then the agent restarted: BACKEND says iptables-legacy
// throughout. Before, the ADD paths dropped the backend the install
// returned: after the repeated ADD status still said nftables (what the
// first install's look remembered), and after the restart "" (shown
// `-`) until a repair.
func TestStatusBackendAtAddSurvivesRestart(t *testing.T) {
	testenv.RequireRoot(t)
	dir := agentDir(t)
	h := startAgent(t, dir, invAmbient)
	n := newNetns(t, "10.95.0.2/24")
	enrollLikePlugin(t, h, "web", n, "10.95.0.2/24")
	if p := adminPodOf(t, h, "web"); p.Backend != string(redirect.Nftables) {
		t.Fatalf("after ADD: backend %q, want %s", p.Backend, redirect.Nftables)
	}
	if resp := h.callV(2, redirect.IptablesLegacy, cniproto.OpAdd, "apps", "web", n); resp.Error != "" || resp.Decision != cniproto.Enroll {
		t.Fatalf("repeated ADD with iptables-legacy: %+v", resp)
	}
	if got := installed(t, n); !slices.Equal(got, []redirect.Backend{redirect.IptablesLegacy}) {
		t.Fatalf("backends in the pod after the repeated ADD: %v", got)
	}
	if p := adminPodOf(t, h, "web"); p.Backend != string(redirect.IptablesLegacy) {
		t.Errorf("after the repeated ADD: backend %q, want %s (the rules' engine)", p.Backend, redirect.IptablesLegacy)
	}
	h.stop()
	h2 := startAgent(t, dir, invAmbient)
	p := adminPodOf(t, h2, "web")
	if p.State != admin.StateEnrolled || p.Backend != string(redirect.IptablesLegacy) {
		t.Errorf("after a restart: %s, backend %q; want enrolled, %s", p.State, p.Backend, redirect.IptablesLegacy)
	}
}
