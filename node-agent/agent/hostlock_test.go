package agent

import (
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/config"
	"github.com/ambit-mesh/ambit/node-agent/hostrules"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

// TestAddWhileHostRulesWaitForXtablesLock: the host's probe SNAT rules
// use iptables-legacy (an agent on a host with iptables) and must be
// rewritten (someone flushed the chain and destroyed the set) while
// another program holds the host's xtables lock. A pod's ADD then waits
// on that lock for its host entry: the answer must reach the plugin by
// the request's deadline, retryable and naming the lock, with the pod's
// listeners released; once the lock is free the retried ADD enrolls
// the pod and its entry is in the host's set. Before, the host rules'
// iptables runs waited 5 s each whatever the request's deadline (2 s
// here): the answer came too late and the plugin got none.
func TestAddWhileHostRulesWaitForXtablesLock(t *testing.T) {
	testenv.RequireRoot(t)
	hr, hostNS := testHostRules(t, hostrules.Config{Backend: "iptables-legacy"})
	h := startAgent(t, "", invAmbient, func(o *Options) {
		o.Host = hr
		o.Config.RequestTimeout = config.Duration{Duration: 2 * time.Second}
	})
	n := newNetns(t, "10.95.4.2/24")
	run(t, "ip", "netns", "exec", hostNS.name, "iptables-legacy", "-t", "nat", "-F", "AMBIT-POSTRT")
	run(t, "ip", "netns", "exec", hostNS.name, "ipset", "destroy", "ambit-probes-v4")
	release := testenv.HoldXtablesLock(t)

	start := time.Now()
	resp, err := h.call(cniproto.OpAdd, "apps", "web", "cid-web", n, "10.95.4.2/24")
	took := time.Since(start)
	if err != nil {
		t.Fatalf("ADD while the host rules wait for the xtables lock: no answer after %v: %v", took.Round(time.Millisecond), err)
	}
	t.Logf("ADD while the host rules wait for the xtables lock: answered after %v: %+v", took.Round(time.Millisecond), resp)
	if !resp.Retryable || resp.Decision != "" {
		t.Errorf("answer %+v, want a retryable error", resp)
	}
	for _, want := range []string{"apps/web", "host's rules", "deadline", "xtables lock"} {
		if !strings.Contains(resp.Error, want) {
			t.Errorf("answer does not say %q: %s", want, resp.Error)
		}
	}
	eventually(t, "the pod's listeners released", func() bool { return h.tun.Live() == 0 })

	release()
	resp, err = h.call(cniproto.OpAdd, "apps", "web", "cid-web", n, "10.95.4.2/24")
	if err != nil || resp.Error != "" || resp.Decision != cniproto.Enroll {
		t.Fatalf("ADD retried once the lock is free: %+v %v", resp, err)
	}
	if owner := hr.Entries()[netip.MustParseAddr("10.95.4.2")]; owner != "uid-web" {
		t.Errorf("host entry of the pod's IP: owner %q, want uid-web", owner)
	}
	out, err := exec.Command("ip", "netns", "exec", hostNS.name, "ipset", "list", "ambit-probes-v4").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "10.95.4.2") {
		t.Errorf("the host's set after the retried ADD: %v\n%s", err, out)
	}
}
