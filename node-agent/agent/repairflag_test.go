package agent

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/config"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
	"github.com/ambit-mesh/ambit/plugin/redirect"
)

// switchedInstalls fails every rule install while fail is set.
type switchedInstalls struct {
	Redirector
	fail atomic.Bool
}

func (r *switchedInstalls) Install(ctx context.Context, netns *os.File, b redirect.Backend, spec redirect.Spec) (string, error) {
	if r.fail.Load() {
		return "", errors.New("injected: rules could not be installed")
	}
	return r.Redirector.Install(ctx, netns, b, spec)
}

// TestRepairFailureReportedAfterReenrollment: a pod's rule repair fails
// (said once, counted once), the pod is unenrolled and enrolled again
// by its labels, with rules installed afresh. A later repair that fails
// is a new failure and must be said and counted again. Before, the
// re-enrollment kept the pod's "repair failing" flag: the new failure
// went to debug and was not counted (1 error, 1 count, want 2).
func TestRepairFailureReportedAfterReenrollment(t *testing.T) {
	testenv.RequireRoot(t)
	rules := &switchedInstalls{Redirector: Rules{}}
	var logs testenv.Buffer
	reg := prometheus.NewRegistry()
	h := startAgent(t, "", invAmbient, func(o *Options) {
		o.Rules = rules
		// Checks are run by the test, one at a time.
		o.Config.RuleCheckInterval = config.Duration{Duration: time.Hour}
		o.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
		o.Registerer = reg
	})
	pn, _ := newPair(t, "10.64.7.2", "10.64.7.1")
	if resp, err := h.call(cniproto.OpAdd, "apps", "web", "cid-flag", pn, "10.64.7.2/24"); err != nil || resp.Decision != cniproto.Enroll {
		t.Fatalf("ADD: %+v %v", resp, err)
	}
	// The pod's fields under its lock, as the agent reads them.
	enrolled := func() (*pod, bool) {
		unlock := h.a.lock("apps", "web")
		defer unlock()
		p := h.a.podByName("apps/web")
		return p, p != nil && p.enrolled()
	}
	failures := func() float64 {
		return testenv.Metric(t, reg, "ambit_agent_enrollment_failures_total", map[string]string{"reason": "redirect"})
	}
	breakAndCheck := func() {
		t.Helper()
		if err := (Rules{}).Uninstall(context.Background(), openFile(t, pn.path)); err != nil {
			t.Fatal(err)
		}
		rules.fail.Store(true)
		p, ok := enrolled()
		if !ok {
			t.Fatal("apps/web not enrolled")
		}
		h.a.verifyPod(p)
		rules.fail.Store(false)
	}
	breakAndCheck()
	if got := failures(); got != 1 {
		t.Fatalf("failures after the first failed repair: %v, want 1", got)
	}

	h.writeInventory(invAmbient + "    labels: {ambit.dev/dataplane-mode: none}\n")
	if err := h.inv.Reload(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "unenrolled", func() bool { p, ok := enrolled(); return p != nil && !ok })
	h.writeInventory(invAmbient)
	if err := h.inv.Reload(); err != nil {
		t.Fatal(err)
	}
	unlock := h.a.lock("apps", "web")
	spec := *h.a.podByName("apps/web").specCopy()
	unlock()
	eventually(t, "enrolled again, rules in", func() bool {
		_, ok := enrolled()
		return ok && (Rules{}).Verify(context.Background(), openFile(t, pn.path), spec) == nil
	})

	breakAndCheck()
	out := logs.String()
	if n := strings.Count(out, "repairing redirection failed"); n != 2 {
		t.Errorf("%d errors for two failed repairs around a re-enrollment, want 2:\n%s", n, out)
	}
	if got := failures(); got != 2 {
		t.Errorf("failures counted: %v, want 2", got)
	}
}
