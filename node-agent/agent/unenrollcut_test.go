package agent

import (
	"context"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/state"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
	"github.com/ambit-mesh/ambit/plugin/redirect"
)

// TestUnenrollAllStopDoesNotCutARemoval: `ambit-agent uninstall
// --unenroll-all` gets SIGTERM (its context canceled) while it removes
// a pod's iptables-legacy rules and the restore waits for the host's
// xtables lock. The loop stops between pods, but the removal under way
// finishes once the lock is free: every rule and route of ours gone, the
// record unenrolled. Before, the cancel killed the restore half-way: the
// pod kept its capture rules with nothing listening any more (traffic
// refused) and its record still said enrolled.
func TestUnenrollAllStopDoesNotCutARemoval(t *testing.T) {
	testenv.RequireRoot(t)
	dir := agentDir(t)
	h := startAgent(t, dir, invAmbient)
	n := newNetns(t, "10.95.3.2/24")
	req := &cniproto.Request{Version: cniproto.Version, Op: cniproto.OpAdd, RuleBackend: redirect.IptablesLegacy,
		Pod: cniproto.Pod{Namespace: "apps", Name: "web", UID: "uid-web", ContainerID: "cid-web", Netns: n.path,
			IPs: []netip.Prefix{netip.MustParsePrefix("10.95.3.2/24")}}}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	resp, err := cniproto.Call(ctx, h.sock, req, n.file)
	cancel()
	if err != nil || resp.Decision != cniproto.Enroll {
		t.Fatalf("ADD with iptables-legacy: %+v %v", resp, err)
	}
	rulesBefore := ipRules(t, n)
	h.stop()

	release := testenv.HoldXtablesLock(t)
	uctx, stop := context.WithCancel(context.Background())
	defer stop()
	done := make(chan error, 1)
	go func() { done <- UnenrollAll(uctx, dir, "/proc", Rules{}, nil, quietLogger()) }()
	eventually(t, "the removal waiting for the xtables lock", func() bool {
		out, _ := exec.Command("pgrep", "-P", strconv.Itoa(os.Getpid()), "-f", "legacy-restore").Output()
		return len(out) > 0
	})
	stop() // SIGTERM
	select {
	case err := <-done:
		t.Fatalf("UnenrollAll returned while its removal waited for the xtables lock: %v", err)
	case <-time.After(time.Second):
	}
	release()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("UnenrollAll: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("UnenrollAll did not return once the lock was free")
	}
	if got := installed(t, n); len(got) != 0 {
		t.Errorf("rules left: %v", got)
	}
	if got := ipRules(t, n); len(got) >= len(rulesBefore) {
		t.Errorf("ip rules after the removal: %v (with the redirection: %v)", got, rulesBefore)
	}
	st, err := state.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	recs, _ := st.List()
	if len(recs) != 1 || recs[0].Enrolled {
		t.Errorf("records after the removal: %+v, want web unenrolled", recs)
	}
}

// ipRules lists n's IPv4 policy routing rules.
func ipRules(t *testing.T, n *testNetns) []string {
	t.Helper()
	out, err := exec.Command("ip", "-n", n.name, "-4", "rule", "show").CombinedOutput()
	if err != nil {
		t.Fatalf("ip rule: %v %s", err, out)
	}
	return strings.Split(strings.TrimSpace(string(out)), "\n")
}
