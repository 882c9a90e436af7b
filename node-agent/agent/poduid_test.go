package agent

import (
	"context"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/admin"
	"github.com/ambit-mesh/ambit/node-agent/cluster"
	"github.com/ambit-mesh/ambit/node-agent/config"
	"github.com/ambit-mesh/ambit/node-agent/hostrules"
	"github.com/ambit-mesh/ambit/node-agent/inventory"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

// behindView is a cache-backed view (not static) whose apps/web is the
// previous pod of that name, UID uid-old, until it catches up: after
// behind of the first stale look (never when behind is 0), as an
// informer that has not yet seen the deletion. apps/web is not among
// the local pods, so the agent's own loop leaves it to the ADD.
type behindView struct {
	*inventory.Source
	behind time.Duration
	once   sync.Once
	fresh  atomic.Bool
	stale  atomic.Int64 // looks that gave uid-old
}

func (v *behindView) Static() bool { return false }

func (v *behindView) Pod(ctx context.Context, namespace, name string) (cluster.Pod, bool, error) {
	p, ok, err := v.Source.Pod(ctx, namespace, name)
	if ok && namespace+"/"+name == "apps/web" && !v.fresh.Load() {
		p.UID = "uid-old"
		v.stale.Add(1)
		if v.behind > 0 {
			v.once.Do(func() { time.AfterFunc(v.behind, func() { v.fresh.Store(true) }) })
		}
	}
	return p, ok, err
}

func (v *behindView) LocalPods() []cluster.Pod {
	return slices.DeleteFunc(v.Source.LocalPods(), func(p cluster.Pod) bool { return p.Namespace+"/"+p.Name == "apps/web" })
}

// uidStatus is the API server's side of the annotation for one pod of
// each name, UID uid-<name>: a write naming another UID is refused as the
// API server refuses the agent's UID-carrying patch (Invalid), which
// statussync takes as the pod gone.
type uidStatus struct {
	mu     sync.Mutex
	states map[string]string
	wrong  []string // UIDs refused
}

func (s *uidStatus) SetRedirection(_ context.Context, p cluster.Pod, st string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if p.UID != "" && p.UID != "uid-"+p.Name {
		s.wrong = append(s.wrong, p.UID)
		return apierrors.NewInvalid(corev1.SchemeGroupVersion.WithKind("Pod").GroupKind(), p.Name, nil)
	}
	if s.states == nil {
		s.states = map[string]string{}
	}
	s.states[p.Namespace+"/"+p.Name] = st
	return nil
}

func (s *uidStatus) Warn(context.Context, cluster.Pod, string, string) error { return nil }

func (s *uidStatus) state(key string) (string, []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.states[key], slices.Clone(s.wrong)
}

// TestAddWaitsForTheSandboxsPod: apps/web was deleted and made again on
// this node; the ADD of the new pod's sandbox (UID uid-web) comes while
// the view still holds the previous pod (uid-old) for 150 ms more. The
// sandbox is served as uid-web: its record, its namespace's claim, its
// host probe entry, and its annotation, which is written ("enabled").
// Before, the ADD decided on the view's pod: everything carried uid-old,
// and the annotation's write, refused for that UID, was dropped; the new
// pod was never annotated and other nodes sent it plaintext.
func TestAddWaitsForTheSandboxsPod(t *testing.T) {
	testenv.RequireRoot(t)
	hr, _ := testHostRules(t, hostrules.Config{})
	st := &uidStatus{}
	view := &behindView{behind: 150 * time.Millisecond}
	h := startAgent(t, "", invAmbient, func(o *Options) {
		view.Source = o.View.(*inventory.Source)
		o.View, o.Status, o.Host = view, st, hr
	})
	n := newNetns(t, "10.97.1.2/24")
	resp, err := h.call(cniproto.OpAdd, "apps", "web", "cid-web", n, "10.97.1.2/24")
	if err != nil || resp.Decision != cniproto.Enroll {
		t.Fatalf("ADD: %+v %v", resp, err)
	}
	if view.stale.Load() == 0 {
		t.Fatal("the view never gave the previous pod: the test tests nothing")
	}
	p := h.podNow("apps/web")
	if p == nil || !p.enrolled() {
		t.Fatalf("apps/web not served: %+v", p)
	}
	if p.rec.UID != "uid-web" {
		t.Errorf("served as UID %q, want the sandbox's uid-web", p.rec.UID)
	}
	recs, _ := h.a.store.List()
	for _, r := range recs {
		if r.Name == "web" && r.UID != "uid-web" {
			t.Errorf("record of %s has UID %q, want uid-web", r.ContainerID, r.UID)
		}
	}
	h.a.mu.Lock()
	claimUID := ""
	if p.claim != nil {
		claimUID = p.claim.uid
	}
	h.a.mu.Unlock()
	if claimUID != "uid-web" {
		t.Errorf("its namespace claimed for UID %q, want uid-web", claimUID)
	}
	if got, want := hr.Entries(), map[netip.Addr]string{netip.MustParseAddr("10.97.1.2"): "uid-web"}; !sameOwners(got, want) {
		t.Errorf("host entries %v, want %v", got, want)
	}
	eventually(t, "apps/web annotated enabled", func() bool { s, _ := st.state("apps/web"); return s == "enabled" })
	if _, wrong := st.state("apps/web"); len(wrong) > 0 {
		t.Errorf("annotation writes for the previous pod's UID: %v", wrong)
	}
}

// TestAddAnswersRetryWhenTheViewStaysBehind: the view never catches up
// within the request's time. The ADD is answered retryable (code 11),
// naming both UIDs, counted stale-view, and nothing is served, recorded
// or added to the host's rules. Before, the sandbox was served and
// recorded as uid-old, its host entry owned by uid-old.
func TestAddAnswersRetryWhenTheViewStaysBehind(t *testing.T) {
	testenv.RequireRoot(t)
	hr, _ := testHostRules(t, hostrules.Config{})
	view := &behindView{}
	h := startAgent(t, "", invAmbient, func(o *Options) {
		view.Source = o.View.(*inventory.Source)
		o.View, o.Host = view, hr
		o.Config.RequestTimeout = config.Duration{Duration: 2 * time.Second}
	})
	n := newNetns(t, "10.97.2.2/24")
	start := time.Now()
	resp, err := h.call(cniproto.OpAdd, "apps", "web", "cid-web", n, "10.97.2.2/24")
	took := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("answered after %v: %q", took.Round(time.Millisecond), resp.Error)
	if !resp.Retryable || !strings.Contains(resp.Error, "uid-old") || !strings.Contains(resp.Error, "uid-web") || !strings.Contains(resp.Error, "retry") {
		t.Errorf("answer %+v, want retryable naming uid-old and uid-web", resp)
	}
	if view.stale.Load() < 2 {
		t.Errorf("the view was looked at %d times, want it polled", view.stale.Load())
	}
	if n := h.tun.Live(); n != 0 {
		t.Errorf("%d servings, want none", n)
	}
	if p := h.podNow("apps/web"); p != nil {
		t.Errorf("apps/web known: %+v", p.rec)
	}
	if recs, _ := h.a.store.List(); len(recs) != 0 {
		t.Errorf("records: %+v", recs)
	}
	if e := hr.Entries(); len(e) != 0 {
		t.Errorf("host entries: %v", e)
	}
	if v := testutil.ToFloat64(h.a.m.failures.WithLabelValues(reasonStaleView)); v != 1 {
		t.Errorf("failures{reason=%q} = %v, want 1", reasonStaleView, v)
	}
}

// TestEvictingThePreviousPodKeepsTheNewPodsStatus: the previous apps/web
// (uid-old) was found by live enrollment in the namespace of the new
// pod's sandbox (the view named its IP, now the new sandbox's). The new
// pod's ADD (uid-web) takes the namespace and lets the old serving go.
// The name's status stays the new pod's: wanted "enabled", written for
// uid-web, status "enrolled". Before, the eviction set "failed" for
// uid-old, replacing the new pod's wanted "enabled" (one per name); that
// write was refused for its UID and dropped, so unless the "enabled"
// write had gone out first the new pod was never annotated.
func TestEvictingThePreviousPodKeepsTheNewPodsStatus(t *testing.T) {
	testenv.RequireRoot(t)
	st := &uidStatus{}
	ip := netip.MustParseAddr("10.97.3.2")
	var view *staleLocalView
	h := startAgent(t, "", invAmbient, func(o *Options) {
		view = &staleLocalView{Source: o.View.(*inventory.Source), name: "apps/web", uid: "uid-old"}
		o.View, o.Status = view, st
	})
	n := newNetns(t, "10.97.3.2/24")
	view.set(ip)
	h.a.Resync()
	if s := settled(t, h, "web"); s.State != admin.StateEnrolled {
		t.Fatalf("previous apps/web not found by live enrollment: %+v", s)
	}
	if p := h.podNow("apps/web"); p == nil || p.rec.UID != "uid-old" {
		t.Fatalf("found pod: %+v", p)
	}
	view.mu.Lock()
	view.uid = "uid-web"
	view.mu.Unlock()
	resp, err := h.call(cniproto.OpAdd, "apps", "web", "cid-web", n, "10.97.3.2/24")
	if err != nil || resp.Decision != cniproto.Enroll {
		t.Fatalf("ADD: %+v %v", resp, err)
	}
	eventually(t, "the previous pod's serving released", func() bool {
		h.a.mu.Lock()
		defer h.a.mu.Unlock()
		return h.a.byCID[foundPrefix+"apps/web"] == nil
	})
	eventually(t, "one serving", func() bool { return h.tun.Live() == 1 })
	// The eviction ran under the pod's lock: taken here, it is over.
	unlock := h.a.lock("apps", "web")
	unlock()
	if s, ok := h.a.statusSync.Wanted("apps", "web"); !ok || s != "enabled" {
		t.Errorf("wanted annotation of apps/web: %q (kept: %v), want enabled", s, ok)
	}
	eventually(t, "apps/web annotated enabled", func() bool { s, _ := st.state("apps/web"); return s == "enabled" })
	if s := adminPodOf(t, h, "web"); s.State != admin.StateEnrolled {
		t.Errorf("status of apps/web: %s %s %q, want enrolled", s.State, s.Reason, s.Message)
	}
	if p := h.podNow("apps/web"); p == nil || p.rec.UID != "uid-web" || !p.enrolled() {
		t.Errorf("apps/web after the ADD: %+v", p)
	}
}

// liveView is behindView, never caught up, over an API server that has
// the new pod (kube.Source.LivePod).
type liveView struct {
	*behindView
	live atomic.Int64
}

func (v *liveView) LivePod(ctx context.Context, namespace, name string) (cluster.Pod, bool, error) {
	v.live.Add(1)
	return v.Source.Pod(ctx, namespace, name)
}

// TestAddReadsTheSandboxsPodLive: with a view that can read past its
// cache, the ADD whose sandbox's UID the cache does not hold takes the
// pod from the API server at once, with one read, rather than waiting
// for an informer that may stay behind.
func TestAddReadsTheSandboxsPodLive(t *testing.T) {
	testenv.RequireRoot(t)
	view := &liveView{behindView: &behindView{}}
	h := startAgent(t, "", invAmbient, func(o *Options) {
		view.Source = o.View.(*inventory.Source)
		o.View = view
	})
	n := newNetns(t, "10.97.4.2/24")
	resp, err := h.call(cniproto.OpAdd, "apps", "web", "cid-web", n, "10.97.4.2/24")
	if err != nil || resp.Decision != cniproto.Enroll {
		t.Fatalf("ADD: %+v %v", resp, err)
	}
	if p := h.podNow("apps/web"); p == nil || p.rec.UID != "uid-web" {
		t.Errorf("apps/web: %+v, want served as uid-web", p)
	}
	if s, l := view.stale.Load(), view.live.Load(); s != 1 || l != 1 {
		t.Errorf("%d looks at the cache, %d live reads; want 1 and 1", s, l)
	}
}
