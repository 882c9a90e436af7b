package agent

import (
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/config"
	"github.com/ambit-mesh/ambit/node-agent/health"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

// liveHarness is an agent with its health server on loopback, the way
// ambit-agent run wires them.
type liveHarness struct {
	*harness
	reg  *prometheus.Registry
	base string
}

func startLiveAgent(t *testing.T, inv string, opts ...func(*Options)) *liveHarness {
	t.Helper()
	reg := prometheus.NewRegistry()
	hs := health.New(reg)
	reg.MustRegister(hs.Collector())
	hs.SetLogger(quietLogger())
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); hs.ServeListener(ctx, l) }()
	t.Cleanup(func() { cancel(); <-done })
	opts = append([]func(*Options){func(o *Options) { o.Health = hs; o.Registerer = reg }}, opts...)
	h := startAgent(t, "", inv, opts...)
	return &liveHarness{harness: h, reg: reg, base: "http://" + l.Addr().String()}
}

func (h *liveHarness) healthz(t *testing.T) (int, string) {
	t.Helper()
	c := &http.Client{Timeout: 5 * time.Second}
	r, err := c.Get(h.base + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Body.Close()
	b, _ := io.ReadAll(r.Body)
	return r.StatusCode, string(b)
}

// waitHealthz polls /healthz until it answers code with a body holding
// want, for at most 20 s (the bounds under test are far shorter).
func (h *liveHarness) waitHealthz(t *testing.T, code int, want string) string {
	t.Helper()
	var gotCode int
	var body string
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		gotCode, body = h.healthz(t)
		if gotCode == code && strings.Contains(body, want) {
			return body
		}
	}
	t.Fatalf("/healthz: %d %q, want %d with %q", gotCode, body, code, want)
	return ""
}

// holdLock takes a pod's lock until the returned func or the test's end
// (a failing test must not leave the agent's stop waiting on it).
func holdLock(t *testing.T, a *Agent, namespace, name string) func() {
	unlock := sync.OnceFunc(a.lock(namespace, name))
	t.Cleanup(unlock)
	return unlock
}

// shortBounds shortens the liveness bounds for one test.
func shortBounds(t *testing.T, grace, socketEvery, socketTimeout, socketGr, request time.Duration) {
	old := []time.Duration{loopGrace, socketCheckEvery, socketCheckTimeout, socketGrace, requestStallAfter}
	loopGrace, socketCheckEvery, socketCheckTimeout, socketGrace, requestStallAfter = grace, socketEvery, socketTimeout, socketGr, request
	t.Cleanup(func() {
		loopGrace, socketCheckEvery, socketCheckTimeout, socketGrace, requestStallAfter = old[0], old[1], old[2], old[3], old[4]
	})
}

// A healthy agent at work (pods enrolled at ADD, reconcile passes, rule
// checks every 100 ms, the socket self-checked every 50 ms) answers 200
// on every probe, and names what it watches: each loop and when it last
// turned. Before, /healthz watched nothing (it answered "ok" alone).
func TestLivenessHealthyAgentStays200(t *testing.T) {
	testenv.RequireRoot(t)
	// Bounds short enough that a loop turning only now and then would
	// show, long enough for a loaded machine.
	shortBounds(t, 5*time.Second, 50*time.Millisecond, 5*time.Second, 5*time.Second, 10*time.Second)
	h := startLiveAgent(t, invAmbient, func(o *Options) {
		o.Config.RuleCheckInterval = config.Duration{Duration: 100 * time.Millisecond}
	})
	pods := enrollPods(t, h.harness, 5, "10.69.0")
	end := time.Now().Add(3 * time.Second)
	for i := 0; time.Now().Before(end); i++ {
		h.a.Resync()
		code, body := h.healthz(t)
		if code != 200 {
			t.Fatalf("probe %d of a healthy agent: %d %q", i, code, body)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if got := testutil.ToFloat64(h.a.m.enrolled); len(pods) != 5 || got != 5 {
		t.Fatalf("%v pods enrolled, want 5", got)
	}
	_, body := h.healthz(t)
	for _, name := range []string{checkReconcile, checkRules, checkSocket} {
		if !strings.Contains(body, name+": last turned ") {
			t.Errorf("/healthz does not show %s turning: %q", name, body)
		}
	}
	for _, name := range []string{checkReconcile, checkRules, checkSocket, checkRequests} {
		if v := testenv.Metric(t, h.reg, "ambit_agent_loop_stalled", map[string]string{"loop": name}); v != 0 {
			t.Errorf("ambit_agent_loop_stalled{loop=%q} = %v on a healthy agent", name, v)
		}
	}
	if v := testenv.Metric(t, h.reg, "ambit_agent_loop_last_turn_timestamp_seconds", map[string]string{"loop": checkSocket}); time.Since(time.Unix(int64(v), 0)) > 5*time.Second {
		t.Errorf("socket self-check last turned at %v", v)
	}
}

// The reconcile loop stuck on a pod's lock (a pass reaching a pod whose
// lock is never released) turns /healthz to 503 naming it within its
// bound, the metric shows it, and both recover once the loop turns again.
func TestLivenessReconcileStall(t *testing.T) {
	testenv.RequireRoot(t)
	shortBounds(t, 300*time.Millisecond, 50*time.Millisecond, 5*time.Second, 5*time.Second, time.Hour)
	h := startLiveAgent(t, invAmbient)
	eventually(t, "the reconcile loop to turn", func() bool { return !h.a.live.reconcile.LastTurn().IsZero() })

	unlock := holdLock(t, h.a, "apps", "stuck")
	h.a.queue.add(key{kind: keyPod, namespace: "apps", name: "stuck"})
	body := h.waitHealthz(t, 503, checkReconcile+": stalled: last turned")
	if strings.Contains(body, checkSocket) || strings.Contains(body, checkRules) {
		t.Errorf("only the reconcile loop stalled, /healthz says %q", body)
	}
	if v := testenv.Metric(t, h.reg, "ambit_agent_loop_stalled", map[string]string{"loop": checkReconcile}); v != 1 {
		t.Errorf("ambit_agent_loop_stalled{loop=reconcile} = %v while stalled", v)
	}
	unlock()
	h.waitHealthz(t, 200, "ok")
	if v := testenv.Metric(t, h.reg, "ambit_agent_loop_stalled", map[string]string{"loop": checkReconcile}); v != 0 {
		t.Errorf("ambit_agent_loop_stalled{loop=reconcile} = %v after it turned again", v)
	}
}

// The periodic rule check stuck on an enrolled pod's lock turns /healthz
// to 503 naming it, and 200 again once released.
func TestLivenessRuleCheckStall(t *testing.T) {
	testenv.RequireRoot(t)
	shortBounds(t, 300*time.Millisecond, 50*time.Millisecond, 5*time.Second, 5*time.Second, time.Hour)
	h := startLiveAgent(t, invAmbient, func(o *Options) {
		o.Config.RuleCheckInterval = config.Duration{Duration: 100 * time.Millisecond}
	})
	n := newNetns(t, "10.69.1.2/24")
	enrollLikePlugin(t, h.harness, "web", n, "10.69.1.2/24")
	eventually(t, "the rule check to turn", func() bool { return !h.a.live.rules.LastTurn().IsZero() })

	unlock := holdLock(t, h.a, "apps", "web")
	body := h.waitHealthz(t, 503, checkRules+": stalled: last turned")
	if strings.Contains(body, checkSocket) {
		t.Errorf("the plugin socket did not stall, /healthz says %q", body)
	}
	unlock()
	h.waitHealthz(t, 200, "ok")
}

// The plugin server stops accepting when every slot is held by a stuck
// exchange (here its one slot, maxConcurrentRequests: 1, by a DEL waiting
// on a pod lock nobody releases): /healthz turns 503 naming the socket
// and the stuck request, and 200 once the request finishes and the
// server accepts again. Without the self-check nothing noticed: new pods
// of the node failed at ADD while the agent reported itself alive.
func TestLivenessPluginSocketStall(t *testing.T) {
	testenv.RequireRoot(t)
	shortBounds(t, time.Hour, 50*time.Millisecond, 200*time.Millisecond, 500*time.Millisecond, 500*time.Millisecond)
	h := startLiveAgent(t, invAmbient, func(o *Options) { o.Config.MaxConcurrentRequests = 1 })
	eventually(t, "the socket self-check to answer", func() bool { return !h.a.live.socket.LastTurn().IsZero() })

	unlock := holdLock(t, h.a, "apps", "stuck")
	answered := stuckDel(t, h.a, h.sock)
	body := h.waitHealthz(t, 503, checkSocket+": stalled")
	if !strings.Contains(body, checkRequests+": stalled: del apps/stuck in progress") {
		t.Errorf("/healthz does not name the stuck request: %q", body)
	}
	if strings.Contains(body, checkReconcile) {
		t.Errorf("the reconcile loop did not stall, /healthz says %q", body)
	}
	h.freeStuckDel(t, unlock, answered)
}

// A plugin socket whose accept loop is gone (the listener closed, the
// file still at its path) fails the check too.
func TestLivenessPluginSocketClosed(t *testing.T) {
	testenv.RequireRoot(t)
	shortBounds(t, time.Hour, 50*time.Millisecond, 200*time.Millisecond, 300*time.Millisecond, time.Hour)
	h := startLiveAgent(t, invAmbient)
	eventually(t, "the socket self-check to answer", func() bool { return !h.a.live.socket.LastTurn().IsZero() })
	h.a.live.plugin.Load().sock.Listener.Close()
	h.waitHealthz(t, 503, checkSocket+": stalled")
}

// stuckDel sends a DEL of apps/stuck, whose lock the caller holds, and
// waits until the agent handles it: it holds one of the server's slots
// until the lock is free. The answer goes to the returned channel.
func stuckDel(t *testing.T, a *Agent, sock string) <-chan error {
	t.Helper()
	answered := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		req := &cniproto.Request{Version: cniproto.Version, Op: cniproto.OpDel, Pod: cniproto.Pod{Namespace: "apps", Name: "stuck", UID: "uid-stuck", ContainerID: "cid-stuck"}}
		_, err := cniproto.Call(ctx, sock, req, nil)
		answered <- err
	}()
	eventually(t, "the DEL to be handled", func() bool {
		a.live.mu.Lock()
		defer a.live.mu.Unlock()
		return len(a.live.inflight) == 1
	})
	return answered
}

// freeStuckDel lets the stuck DEL (answered, from stuckDel) have its
// lock, and fails the test unless the DEL is then answered and /healthz
// turns 200 again.
func (h *liveHarness) freeStuckDel(t *testing.T, unlock func(), answered <-chan error) {
	t.Helper()
	unlock()
	if err := <-answered; err != nil {
		t.Fatalf("the DEL once its lock was free: %v", err)
	}
	h.waitHealthz(t, 200, "ok")
}

// A plugin server that never accepts the self-check from the start (its
// one slot held by a DEL stuck on a pod lock since before the agent was
// ready) fails the socket check within its bound. Before, the check was
// due only after its first answer, so an accept loop broken from the
// start was never detected: /healthz answered 200 while every ADD of the
// node waited.
func TestLivenessPluginSocketStalledFromTheStart(t *testing.T) {
	testenv.RequireRoot(t)
	shortBounds(t, time.Hour, 50*time.Millisecond, 200*time.Millisecond, 500*time.Millisecond, time.Hour)
	var unlock func()
	var answered <-chan error
	adoptListed = func(a *Agent) { // serving, not yet ready
		unlock = sync.OnceFunc(a.lock("apps", "stuck"))
		answered = stuckDel(t, a, a.cfg.Socket)
	}
	defer func() { adoptListed = nil }()
	h := startLiveAgent(t, invAmbient, func(o *Options) {
		o.Config.MaxConcurrentRequests = 1
		// The DEL keeps its slot for the whole test.
		o.Config.RequestTimeout = config.Duration{Duration: time.Minute}
	})
	t.Cleanup(unlock) // before the agent's stop, which waits for the DEL
	body := h.waitHealthz(t, 503, checkSocket+": stalled: never turned")
	if strings.Contains(body, checkReconcile) {
		t.Errorf("the reconcile loop did not stall, /healthz says %q", body)
	}
	h.freeStuckDel(t, unlock, answered)
}

// After the agent takes the socket's path back from a newer agent that
// stopped, a new accept loop that never accepts (its one slot held by a
// stuck DEL at once) fails the check within its bound; while the newer
// agent owned the path the check was not due. Before, the check stayed
// off after the take-back until the new socket's first answer, which
// never came.
func TestLivenessPluginSocketDueAgainAfterTakeBack(t *testing.T) {
	testenv.RequireRoot(t)
	shortBounds(t, time.Hour, 300*time.Millisecond, 200*time.Millisecond, 500*time.Millisecond, time.Hour)
	var newest atomic.Bool
	h := startLiveAgent(t, invAmbient, func(o *Options) {
		o.Config.MaxConcurrentRequests = 1
		o.Config.RequestTimeout = config.Duration{Duration: time.Minute}
		o.Newest = newest.Load
	})
	eventually(t, "the socket self-check to answer", func() bool { return !h.a.live.socket.LastTurn().IsZero() })
	first := h.a.live.plugin.Load()

	taken := time.Now()
	newer, err := cniproto.OpenSocket(h.sock) // a newer agent takes the path; it never accepts
	if err != nil {
		t.Fatal(err)
	}
	defer newer.Close()
	// The check's next look finds the path not its own and rests.
	eventually(t, "the check to see the path taken", func() bool { return h.a.live.socket.LastTurn().After(taken) })
	for end := time.Now().Add(time.Second); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
		if code, body := h.healthz(t); code != 200 {
			t.Fatalf("while a newer agent owns the path: %d %q", code, body)
		}
	}

	unlock := holdLock(t, h.a, "apps", "stuck")
	newer.Close()
	newest.Store(true) // the newer agent stopped
	for h.a.live.plugin.Load() == first {
		time.Sleep(time.Millisecond)
	}
	answered := stuckDel(t, h.a, h.sock)
	h.waitHealthz(t, 503, checkSocket+": stalled")
	h.freeStuckDel(t, unlock, answered)
}

// A pod lock held for good (a stuck operation) no longer takes the
// plugin server's slots with it: an ADD waiting on it gives up at the
// request's deadline (requestTimeout), a DEL goes on detached from its
// slot, and the next request is served. The DEL is not dropped: it is
// still in progress for the plugin-requests check, and once the lock is
// free it releases the pod. Before, each held its slot until the lock
// was free, here the only one (maxConcurrentRequests: 1), so no other
// request was answered.
func TestStuckLockFreesServerSlot(t *testing.T) {
	testenv.RequireRoot(t)
	shortBounds(t, time.Hour, time.Hour, 5*time.Second, time.Hour, time.Second)
	h := startLiveAgent(t, invAmbient, func(o *Options) {
		o.Config.MaxConcurrentRequests = 1
		o.Config.RequestTimeout = config.Duration{Duration: 300 * time.Millisecond}
	})
	pods := enrollPods(t, h.harness, 1, "10.69.2")
	other := func(what string) {
		t.Helper()
		resp, err := h.call(cniproto.OpDel, "apps", "other", "cid-other", nil)
		if err != nil || resp.Error != "" {
			t.Fatalf("%s: a DEL of another pod: %+v %v (its slot still held?)", what, resp, err)
		}
	}
	unlock := holdLock(t, h.a, "apps", "web-0")

	// An ADD of a new sandbox of the pod waits on its lock.
	n := newNetns(t, "10.69.2.9/24")
	added := make(chan struct{})
	go func() { defer close(added); h.call(cniproto.OpAdd, "apps", "web-0", "cid-web-0b", n, "10.69.2.9/24") }()
	time.Sleep(100 * time.Millisecond) // its connection first in line
	other("after an ADD stuck on a lock")
	<-added
	if v := testutil.ToFloat64(h.a.m.failures.WithLabelValues("lock-wait")); v != 1 {
		t.Errorf("enrollment failures for lock-wait: %v, want 1", v)
	}

	// The DEL of the enrolled sandbox waits on the same lock.
	deleted := make(chan struct{})
	go func() { defer close(deleted); h.call(cniproto.OpDel, "apps", "web-0", "cid-web-0", pods[0]) }()
	time.Sleep(100 * time.Millisecond)
	other("after a DEL stuck on a lock")
	<-deleted
	body := h.waitHealthz(t, 503, checkRequests+": stalled: del apps/web-0 in progress")
	if strings.Contains(body, checkSocket) {
		t.Errorf("the server accepts, /healthz says %q", body)
	}
	if got := testutil.ToFloat64(h.a.m.enrolled); got != 1 {
		t.Fatalf("%v pods enrolled while the DEL waits, want 1", got)
	}
	unlock()
	eventually(t, "the detached DEL to release the pod", func() bool { return testutil.ToFloat64(h.a.m.enrolled) == 0 })
	h.waitHealthz(t, 200, "ok")
}

// BenchmarkRequestTracking is what recording a plugin request in
// progress adds to each one, against the lookup of the pod's lock stripe
// every request already pays (same loop).
func BenchmarkRequestTracking(b *testing.B) {
	l := newLiveness(0)
	a := &Agent{}
	req := &cniproto.Request{Op: cniproto.OpAdd, Pod: cniproto.Pod{Namespace: "apps", Name: "web-1"}}
	b.Run("lock", func(b *testing.B) {
		for b.Loop() {
			a.lock("apps", "web-1")()
		}
	})
	b.Run("track", func(b *testing.B) {
		for b.Loop() {
			l.startRequest(req)()
		}
	})
}

// BenchmarkSocketSelfCheck is one self-check of a serving plugin socket
// (made every socketCheckEvery), against one real exchange (a DEL of an
// unknown pod) on the same server.
func BenchmarkSocketSelfCheck(b *testing.B) {
	path := b.TempDir() + "/cni.sock"
	s, err := cniproto.OpenSocket(path)
	if err != nil {
		b.Fatal(err)
	}
	srv := &cniproto.Server{Handler: func(context.Context, *cniproto.Request, *os.File) *cniproto.Response {
		return &cniproto.Response{Decision: cniproto.Skip}
	}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); srv.Serve(ctx, s.Listener) }()
	defer func() { cancel(); <-done }()
	req := &cniproto.Request{Version: cniproto.Version, Op: cniproto.OpDel, Pod: cniproto.Pod{Namespace: "apps", Name: "web", UID: "u", ContainerID: "c"}}
	b.Run("del", func(b *testing.B) {
		for b.Loop() {
			c, cancel := context.WithTimeout(ctx, 5*time.Second)
			if _, err := cniproto.Call(c, path, req, nil); err != nil {
				b.Fatal(err)
			}
			cancel()
		}
	})
	b.Run("selfcheck", func(b *testing.B) {
		for b.Loop() {
			if err := socketAnswers(ctx, path, 5*time.Second); err != nil {
				b.Fatal(err)
			}
		}
	})
}
