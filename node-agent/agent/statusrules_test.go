package agent

import (
	"context"
	"os/exec"
	"slices"
	"testing"
	"time"

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

// TestStatusShowsChecksAtCheck: docs/agent.md says the RULES column
// shows the checks run at CHECK. Someone flushes a served pod's capture
// chain; the runtime's CHECK finds it (CodeCheck) and status must say
// failed, with what differs; a repeated ADD then reinstalls the rules
// and status says repaired. Before, both ran on the request's own netns
// file and their looks were filed under it, while status reads those of
// the file the agent serves the pod with: status kept saying ok, from
// the install at the first ADD.
func TestStatusShowsChecksAtCheck(t *testing.T) {
	testenv.RequireRoot(t)
	h := startAgent(t, "", invAmbient)
	n := newNetns(t, "10.95.1.2/24")
	enrollLikePlugin(t, h, "web", n, "10.95.1.2/24")
	if r := adminPodOf(t, h, "web").Rules; r == nil || r.Result != admin.RulesOK {
		t.Fatalf("after ADD: rules %+v, want ok", r)
	}
	if out, err := exec.Command("ip", "netns", "exec", n.name, "nft", "flush", "chain", "inet", redirect.TableName, "nat-prerouting").CombinedOutput(); err != nil {
		t.Fatalf("nft flush: %v %s", err, out)
	}
	checked := time.Now()
	resp := h.callV(2, "", cniproto.OpCheck, "apps", "web", n)
	if resp.Code != cniproto.CodeCheck {
		t.Fatalf("CHECK of a pod whose capture chain was flushed: %+v, want CodeCheck", resp)
	}
	r := adminPodOf(t, h, "web").Rules
	if r == nil || r.Result != admin.RulesFailed || r.Problem == "" || r.At.Before(checked) {
		t.Fatalf("after the failed CHECK: rules %+v, want failed since %v with what differs", r, checked.Format(time.RFC3339Nano))
	}
	if resp := h.callV(2, "", cniproto.OpAdd, "apps", "web", n); resp.Error != "" || resp.Decision != cniproto.Enroll {
		t.Fatalf("repeated ADD: %+v", resp)
	}
	r = adminPodOf(t, h, "web").Rules
	if r == nil || r.Result != admin.RulesRepaired || r.Problem == "" {
		t.Fatalf("after the repeated ADD reinstalled the rules: %+v, want repaired, with what the CHECK found", r)
	}
	if resp := h.callV(2, "", cniproto.OpCheck, "apps", "web", n); resp.Error != "" {
		t.Fatalf("CHECK after the repair: %+v", resp)
	}
	if r = adminPodOf(t, h, "web").Rules; r == nil || r.Result != admin.RulesOK {
		t.Fatalf("after a passing CHECK: %+v, want ok", r)
	}
}
