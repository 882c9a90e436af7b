package agent

import (
	"context"
	"time"

	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

// A plugin request's deadline is the plugin's: what the agent has not
// done by then, the runtime counts as failed (ADD, CHECK) or as done (DEL,
// GC). These keep a request that waits within it, so its answer still
// reaches the plugin and its server slot is freed.

// loopCtx is the context of the rule work of the agent's own loops (live
// enrollment and unenrollment, the rule check and its repairs,
// re-adoption): no deadline, so each iptables run keeps its own bound
// (10 s), and the agent's stop does not cut it, since a removal or repair
// stopped half-way leaves the pod's traffic sent where nothing listens.
var loopCtx = context.Background()

// answerMargin is how long before the request's deadline a request that
// waits gives up: the server's write deadline on the connection is the
// request's deadline, so an answer written at the deadline never reaches
// the plugin, which then reports "closed the connection without
// answering" (ambit-cni's protocol error, 101) instead of what happened.
// A tenth of requestTimeout, at most 500 ms: writing the answer takes
// microseconds, but the agent may be starved of CPU.
func (a *Agent) answerMargin() time.Duration {
	return min(500*time.Millisecond, a.cfg.RequestTimeout.Duration/10)
}

// beforeAnswerDue is ctx ending answerMargin before its deadline, so what
// the request decides then still reaches the plugin; ctx itself when it
// has no deadline.
func (a *Agent) beforeAnswerDue(ctx context.Context) (context.Context, context.CancelFunc) {
	dl, ok := ctx.Deadline()
	if !ok {
		return ctx, func() {}
	}
	return context.WithDeadline(ctx, dl.Add(-a.answerMargin()))
}

// lockCtx is lock, giving up when ctx ends first, or answerMargin before
// its deadline: an ADD or CHECK whose plugin has given up (its deadline
// is the server's requestTimeout) does not wait on, and hold a server
// slot for, a pod lock held by a stuck or slow operation, and is told
// so. Done later, the enrollment would be for a sandbox the runtime
// already counts as failed and tears down.
func (a *Agent) lockCtx(ctx context.Context, namespace, name string) (func(), error) {
	m := a.stripe(namespace, name)
	if m.TryLock() {
		return m.Unlock, nil
	}
	ctx, cancel := a.beforeAnswerDue(ctx)
	defer cancel()
	if unlock, ok := a.lockWithin(ctx, namespace, name); ok {
		return unlock, nil
	}
	return nil, ctx.Err()
}

// detachable runs work, a DEL or a GC, and answers with its response;
// if the request's deadline comes first, work goes on without the
// request: its server slot is free for the next connection, and it is
// still a request in progress (done runs when it ends) for the
// plugin-requests check. Unlike an ADD, neither may be dropped: the
// plugin takes a DEL it got no answer to as done (teardown must not
// wedge), so a DEL dropped here would leave the pod's listeners, netns
// and record behind; a GC is idempotent.
//
// The request is answered as done: the agent does it (the stop waits
// for it), as when the plugin gets no answer. An error would fail the
// runtime's teardown, and libcni stops a chain's DEL at the first plugin
// that fails (this one, chained last, is asked first), leaving the pod's
// interface and IP to the kubelet's retry. Given up answerMargin before
// the deadline, so the answer gets through.
func (a *Agent) detachable(ctx context.Context, req *cniproto.Request, done func(), work func() *cniproto.Response) *cniproto.Response {
	ctx, cancel := a.beforeAnswerDue(ctx)
	defer cancel()
	answer := make(chan *cniproto.Response, 1)
	a.detached.Add(1)
	go func() {
		defer a.detached.Done()
		defer done()
		resp := work()
		a.countRequest(req, resp)
		answer <- resp
	}()
	select {
	case resp := <-answer:
		return resp
	case <-ctx.Done():
		a.log.Info("plugin request not done when it ended (deadline or stop); answered as done, the agent finishes it in the background",
			"op", req.Op, "pod", req.Pod.Namespace+"/"+req.Pod.Name, "containerID", req.Pod.ContainerID, "cause", context.Cause(ctx))
		return &cniproto.Response{Decision: cniproto.Skip}
	}
}
