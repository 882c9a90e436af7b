package agent

import (
	"context"
	"errors"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/admin"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
	"github.com/ambit-mesh/ambit/plugin/redirect"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// failingInstalls fails the first n rule installs, then installs for real.
type failingInstalls struct {
	Redirector
	left atomic.Int32
}

func (r *failingInstalls) Install(ctx context.Context, netns *os.File, b redirect.Backend, spec redirect.Spec) (string, error) {
	if r.left.Add(-1) >= 0 {
		return "", errors.New("injected: rules could not be installed")
	}
	return r.Redirector.Install(ctx, netns, b, spec)
}

// TestFailedLiveEnrollmentIsRetried: a running pod whose namespace turns
// ambient fails its live enrollment once (its rules), and nothing about
// the pod changes afterwards. It is tried again without an event of its
// own and ends enrolled, its traffic captured. Before, a failed live
// enrollment waited for the pod's next event or a resync (off in the kube
// view): the pod stayed outside the mesh, in plaintext, indefinitely.
func TestFailedLiveEnrollmentIsRetried(t *testing.T) {
	testenv.RequireRoot(t)
	rules := &failingInstalls{Redirector: Rules{}}
	rules.left.Store(1)
	h := startAgent(t, "", invPlain, func(o *Options) {
		o.Rules = rules
		o.LiveRetryEvery = 200 * time.Millisecond
	})
	pod, _ := newPair(t, "10.64.1.2", "10.64.1.1")
	if resp, err := h.call(cniproto.OpAdd, "apps", "web", "cid-live", pod, "10.64.1.2/24"); err != nil || resp.Decision != cniproto.Skip {
		t.Fatalf("ADD in a plain namespace: %+v %v", resp, err)
	}
	h.writeInventory(invAmbient)
	if err := h.inv.Reload(); err != nil {
		t.Fatal(err)
	}
	// The failure is counted; its status may already be overwritten by
	// the retry 200 ms later, so it is not what is waited for.
	eventually(t, "the first live enrollment failed", func() bool {
		return testutil.ToFloat64(h.a.m.failures.WithLabelValues("redirect")) >= 1
	})
	eventually(t, "apps/web enrolled by a retry, with no event of its own", func() bool {
		return adminPodOf(t, h, "web").State == admin.StateEnrolled
	})
	c, line, err := dialFrom(t, pod, "10.64.1.1:8080")
	if err != nil || line != "captured:15001" {
		t.Fatalf("after the retry: %q %v, want captured by 15001", line, err)
	}
	c.Close()
	h.a.mu.Lock()
	n := len(h.a.liveFailed)
	h.a.mu.Unlock()
	if n != 0 {
		t.Errorf("%d pods still marked for a retry after enrolling", n)
	}
}
