package agent

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/config"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
	"github.com/ambit-mesh/ambit/plugin/redirect"
)

// TestNoEngineForIPv6LogsOnce: a node without ip6tables whose kernel has
// no nf_tables, and an agent with ipv6 not off. An IPv4-only pod
// enrolled with iptables-legacy (an agent before session 16, or ipv6:
// off then) cannot be widened to both families by any engine. The rule
// check (here every 100 ms) must say so once, count the failure once,
// and leave the pod's IPv4 capture as it was. Before, every check (1 m)
// logged "redirection differs" and "repairing redirection failed" and
// counted an enrollment failure again.
func TestNoEngineForIPv6LogsOnce(t *testing.T) {
	testenv.RequireRoot(t)
	dir := agentDir(t)
	h1 := startAgent(t, dir, invAmbient, func(o *Options) { o.Config.IPv6 = "off" })
	leg := newNetns(t, "10.89.14.2/24")
	if resp, err := h1.callBackend(redirect.IptablesLegacy, cniproto.OpAdd, "apps", "leg", "cid-leg", leg, "10.89.14.2/24"); err != nil || resp.Decision != cniproto.Enroll {
		t.Fatalf("ADD with ruleBackend iptables-legacy: %+v %v", resp, err)
	}
	h1.stop()

	testenv.PathWithoutIp6tables(t)
	var logs testenv.Buffer
	reg := prometheus.NewRegistry()
	h := startAgent(t, dir, invAmbient, func(o *Options) {
		o.Config.RuleCheckInterval = config.Duration{Duration: 100 * time.Millisecond}
		o.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
		o.Registerer = reg
		o.Rules = noNftables{}
	})
	p := h.podNow("apps/leg")
	if p == nil || !p.enrolled() {
		t.Fatalf("apps/leg not re-adopted: %+v", p)
	}
	// Enough checks to have logged many times over.
	eventually(t, "ten rule checks", func() bool { return rulePasses(t, reg) >= 10 })
	out := logs.String()
	if n := strings.Count(out, "repairing redirection failed"); n != 1 {
		t.Errorf("%d logs of the failed repair, want 1:\n%s", n, out)
	}
	if n := strings.Count(out, "redirection differs from what it should be"); n != 1 {
		t.Errorf("%d logs of the differing redirection, want 1", n)
	}
	if got := testenv.Metric(t, reg, "ambit_agent_enrollment_failures_total", map[string]string{"reason": "redirect"}); got != 1 {
		t.Errorf("enrollment failures (redirect) after ten checks: %v, want 1", got)
	}
	v4 := redirect.DefaultSpec()
	v4.IPv6 = false
	if err := (Rules{}).Verify(context.Background(), leg.file, v4); err != nil {
		t.Errorf("the pod's IPv4 capture after the failed repairs: %v, want it intact", err)
	}
}

// noNftables is the Redirector of a node whose kernel has no nf_tables:
// an nftables install fails, and auto resolves to iptables-legacy as
// redirect's resolve does there.
type noNftables struct{ Rules }

func (r noNftables) Install(ctx context.Context, f *os.File, b redirect.Backend, spec redirect.Spec) (string, error) {
	switch b {
	case redirect.Nftables:
		return "", errors.New("installing redirection with nftables: kernel does not answer nf_tables requests (test)")
	case "", redirect.Auto:
		b = redirect.IptablesLegacy
	}
	return r.Rules.Install(ctx, f, b, spec)
}

// rulePasses is the number of rule check passes so far.
func rulePasses(t *testing.T, g prometheus.Gatherer) uint64 {
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "ambit_agent_rule_check_duration_seconds" && len(mf.GetMetric()) == 1 {
			return mf.GetMetric()[0].GetHistogram().GetSampleCount()
		}
	}
	return 0
}
