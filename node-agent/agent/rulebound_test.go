package agent

import (
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/admin"
	"github.com/ambit-mesh/ambit/node-agent/config"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
	"github.com/ambit-mesh/ambit/plugin/redirect"
)

// TestAddRuleRunBoundIsARuleFailure: the pod's iptables-legacy restore
// hangs (the held xtables lock standing in for a hung tool) past the
// run's own bound (300 ms here, 10 s by default) while the request's
// deadline (4 s, as with a requestTimeout above 10 s) is far off. That is
// the rule install failing: a non-retryable answer with the redirect
// code, counted redirect, the pod's status failed, its listeners
// released. Before, redirect's error for its own bound wrapped
// context.DeadlineExceeded and the ADD answered "did not finish by this
// request's deadline; retry", counted rules-deadline. The request's own
// deadline is still a retry: TestAddWhileXtablesLockHeld.
func TestAddRuleRunBoundIsARuleFailure(t *testing.T) {
	testenv.RequireRoot(t)
	h := startAgent(t, "", invAmbient, func(o *Options) {
		o.Rules = Rules{Backend: redirect.IptablesLegacy, RunTimeout: 300 * time.Millisecond}
		o.Config.RequestTimeout = config.Duration{Duration: 4 * time.Second}
	})
	n := newNetns(t, "10.89.1.2/24")
	testenv.HoldXtablesLock(t)
	resp, err := h.callBackend(redirect.IptablesLegacy, cniproto.OpAdd, "apps", "web", "cid-web", n, "10.89.1.2/24")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("ADD while the pod's restore outlasts its own bound: %+v", resp)
	if resp.Error == "" || resp.Retryable || resp.Code != cniproto.CodeRedirect {
		t.Errorf("answer %+v: want a non-retryable error with code %d (redirect)", resp, cniproto.CodeRedirect)
	}
	if strings.Contains(resp.Error, "deadline; retry") || !strings.Contains(resp.Error, "at its own 300ms bound") {
		t.Errorf("answer's error does not say the run's own bound stopped it: %s", resp.Error)
	}
	if v := testutil.ToFloat64(h.a.m.failures.WithLabelValues("rules-deadline")); v != 0 {
		t.Errorf("enrollment failures for rules-deadline: %v, want 0", v)
	}
	if v := testutil.ToFloat64(h.a.m.failures.WithLabelValues("redirect")); v != 1 {
		t.Errorf("enrollment failures for redirect: %v, want 1", v)
	}
	if p := adminPodOf(t, h, "web"); p.State != admin.StateFailed || !strings.Contains(p.Message, "own 300ms bound") {
		t.Errorf("status: %s %s %q; want failed, naming the run's bound", p.State, p.Reason, p.Message)
	}
	eventually(t, "the pod's listeners released", func() bool { return h.tun.Live() == 0 })
}
