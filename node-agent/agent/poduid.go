package agent

import (
	"context"
	"time"

	"github.com/ambit-mesh/ambit/node-agent/cluster"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

// reasonStaleView counts ADDs and CHECKs answered "retry" because the
// agent's view of the pod's name still held another pod (UID) when the
// wait for it ended.
const reasonStaleView = "stale-view"

// livePodReader is implemented by views that can read a pod past their
// cache (kube.Source.LivePod).
type livePodReader interface {
	LivePod(ctx context.Context, namespace, name string) (cluster.Pod, bool, error)
}

// staleViewPoll bounds the pause between two looks at the view while an
// ADD waits for it to hold the sandbox's pod.
const staleViewPoll = 200 * time.Millisecond

// podOfSandbox returns the pod a request's sandbox is for, when the view
// looked up by name gave cp, another UID than the runtime's (K8S_POD_UID,
// the sandbox's own): the pod was deleted and made again under its name
// on this node (a StatefulSet's rolling update, a bare pod applied again)
// and the informer has not seen the deletion yet. Decided on cp, the
// sandbox would be served, recorded, claim its namespace, own its host
// probe entry and have its annotation written under the previous pod's
// UID: that write, UID-preconditioned, is refused, so the new pod never
// gets ambit.dev/redirection and other nodes reach it in plaintext.
//
// It reads the pod past the cache once when the view can, then looks at
// the view again until it holds the sandbox's UID, for at most half the
// time left before the answer is due (the enrollment after it needs the
// rest). ok false: not caught up, and resp says "retry", naming both
// UIDs. A static inventory's uid is text in a file, not a pod that
// catches up: there the runtime's UID is taken.
func (a *Agent) podOfSandbox(ctx context.Context, rp cniproto.Pod, cp cluster.Pod) (cluster.Pod, *cniproto.Response) {
	if a.static {
		cp.UID = rp.UID
		return cp, nil
	}
	ours := func(p cluster.Pod, found bool, err error) bool {
		return err == nil && found && (p.SandboxUID(rp.UID) || p.UID == "")
	}
	ctx, cancel := a.beforeAnswerDue(ctx)
	defer cancel()
	wait := a.cfg.RequestTimeout.Duration / 2
	if dl, ok := ctx.Deadline(); ok {
		wait = time.Until(dl) / 2
	}
	ctx, cancelWait := context.WithTimeout(ctx, wait)
	defer cancelWait()
	start := time.Now()
	if lr, ok := a.view.(livePodReader); ok {
		if p, found, err := lr.LivePod(ctx, rp.Namespace, rp.Name); ours(p, found, err) {
			return a.caughtUp(rp, cp, p, start), nil
		}
	}
	pause := 10 * time.Millisecond
	t := time.NewTimer(pause)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			a.m.failures.WithLabelValues(reasonStaleView).Inc()
			a.log.Warn("ADD: the agent's view still has the previous pod of this name; answered retry", "pod", rp.Namespace+"/"+rp.Name,
				"viewUID", cp.UID, "sandboxUID", rp.UID, "waited", time.Since(start).Round(time.Millisecond))
			return cp, errResp(true, "ambit-agent: pod %s/%s: the agent's view still has the previous pod of this name (UID %s), not the sandbox's (UID %s), after %v; retry",
				rp.Namespace, rp.Name, cp.UID, rp.UID, time.Since(start).Round(time.Millisecond))
		case <-t.C:
		}
		if p, found, err := a.view.Pod(ctx, rp.Namespace, rp.Name); ours(p, found, err) {
			return a.caughtUp(rp, cp, p, start), nil
		}
		pause = min(2*pause, staleViewPoll)
		t.Reset(pause)
	}
}

func (a *Agent) caughtUp(rp cniproto.Pod, stale, p cluster.Pod, start time.Time) cluster.Pod {
	a.log.Info("ADD: the agent's view had the previous pod of this name; deciding on the sandbox's", "pod", rp.Namespace+"/"+rp.Name,
		"viewUID", stale.UID, "sandboxUID", rp.UID, "waited", time.Since(start).Round(time.Microsecond))
	if p.UID == "" {
		p.UID = rp.UID
	}
	return p
}
