package statussync

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/ambit-mesh/ambit/node-agent/cluster"
	"github.com/ambit-mesh/ambit/node-agent/kube"
)

const node = "node-a"

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func podObj(name string, annotations map[string]string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: name, UID: types.UID("uid-" + name), Annotations: annotations},
		Spec:       corev1.PodSpec{NodeName: node},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning},
	}
}

func cpod(name string) cluster.Pod {
	return cluster.Pod{Namespace: "shop", Name: name, UID: "uid-" + name}
}

// env is a fake API server, the agent's kube.Source over it (informer
// cache, the patch with the UID) and a Syncer writing through it.
type env struct {
	t       *testing.T
	client  *fake.Clientset
	src     *kube.Source
	s       *Syncer
	patches atomic.Int64
	// calls counts the Syncer's calls to its writer (which skips a
	// write the cache says is a no-op: two layers, each counted).
	calls atomic.Int64
	// patch, if set, answers a patch of the Syncer instead of the fake
	// (handled true).
	patch func(n int64, a k8stesting.PatchAction) (bool, runtime.Object, error)
}

type setup struct {
	opts   Options
	events bool // wire the informer's events to Changed
}

func newEnv(t *testing.T, st setup, objs ...runtime.Object) *env {
	t.Helper()
	e := &env{t: t, client: fake.NewClientset(objs...)}
	e.client.PrependReactor("patch", "pods", func(a k8stesting.Action) (bool, runtime.Object, error) {
		pa := a.(k8stesting.PatchAction)
		if pa.GetPatchType() != types.MergePatchType {
			return false, nil, nil
		}
		n := e.patches.Add(1)
		if e.patch != nil {
			return e.patch(n, pa)
		}
		return false, nil, nil
	})
	src, err := kube.New(kube.Config{Client: e.client, NodeName: node, Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() { cancel(); src.Close() })
	src.Start(ctx)
	if err := src.WaitSynced(ctx); err != nil {
		t.Fatal(err)
	}
	e.src = src
	o := st.opts
	o.Writer, o.Reader, o.Logger = countingWriter{src, &e.calls}, src, quiet()
	e.s, err = New(o)
	if err != nil {
		t.Fatal(err)
	}
	e.s.passesDone = make(chan struct{}, 1)
	if st.events {
		src.Subscribe(func(ev cluster.Event) {
			if ev.Kind == cluster.PodChanged {
				e.s.Changed(ev.Namespace, ev.Name)
			}
		})
	}
	done := make(chan struct{})
	go func() { defer close(done); e.s.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return e
}

type countingWriter struct {
	w Writer
	n *atomic.Int64
}

func (c countingWriter) SetRedirection(ctx context.Context, pod cluster.Pod, state string) error {
	c.n.Add(1)
	return c.w.SetRedirection(ctx, pod, state)
}

func (e *env) annotation(name string) string {
	e.t.Helper()
	p, err := e.client.CoreV1().Pods("shop").Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	return p.Annotations[kube.RedirectionAnnotation]
}

// byHand changes the annotation as someone else would (kubectl): not
// through the Syncer's writer, not counted.
func (e *env) byHand(name, state string) {
	e.t.Helper()
	if _, err := e.client.CoreV1().Pods("shop").Patch(context.Background(), name, types.JSONPatchType, jsonPatch(state), metav1.PatchOptions{}); err != nil {
		e.t.Fatal(err)
	}
}

func jsonPatch(state string) []byte {
	if state == "" {
		return []byte(`[{"op":"remove","path":"/metadata/annotations/ambit.dev~1redirection"}]`)
	}
	return fmt.Appendf(nil, `[{"op":"add","path":"/metadata/annotations","value":{"ambit.dev/redirection":%q}}]`, state)
}

// cached waits until the informer cache shows state for the pod.
func (e *env) cached(name, state string) {
	e.t.Helper()
	eventually(e.t, "the cache to show "+name+"="+state, func() bool {
		_, cur, found := e.src.Redirection("shop", name)
		return found && cur == state
	})
}

// passes waits for n periodic passes to end.
func (e *env) passes(n int) {
	e.t.Helper()
	for range n {
		select {
		case <-e.s.passesDone:
		case <-time.After(10 * time.Second):
			e.t.Fatal("no periodic pass within 10s")
		}
	}
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if cond() {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", what)
}

// TestFailingWriteRetried: the API server fails the first four writes
// (timeouts, 500s); the Syncer backs off and retries until the fifth
// goes through, then writes nothing more.
func TestFailingWriteRetried(t *testing.T) {
	// No periodic pass: the retries alone must get the write through.
	e := newEnv(t, setup{opts: Options{Interval: time.Hour, MinRetry: 10 * time.Millisecond, MaxRetry: 100 * time.Millisecond}, events: true},
		podObj("web", nil))
	e.patch = func(n int64, _ k8stesting.PatchAction) (bool, runtime.Object, error) {
		switch {
		case n <= 2:
			return true, nil, apierrors.NewServerTimeout(corev1.Resource("pods"), "patch", 1)
		case n <= 4:
			return true, nil, apierrors.NewInternalError(fmt.Errorf("etcdserver: request timed out"))
		}
		return false, nil, nil
	}
	e.s.Set(cpod("web"), kube.StateEnabled)
	eventually(t, "the annotation", func() bool { return e.annotation("web") == kube.StateEnabled })
	e.cached("web", kube.StateEnabled)
	time.Sleep(200 * time.Millisecond)
	if got := e.patches.Load(); got != 5 {
		t.Fatalf("%d patches for 4 failures and a success", got)
	}
}

// TestLostWriteRepairedByPeriodicPass: a write the API server
// acknowledged but that did not stick (here the answer is a success and
// the pod is unchanged, so no informer event follows either). Only the
// periodic pass, comparing the cache with the wanted state, sees it.
func TestLostWriteRepairedByPeriodicPass(t *testing.T) {
	e := newEnv(t, setup{opts: Options{Interval: 100 * time.Millisecond, Settle: 50 * time.Millisecond}, events: true},
		podObj("web", nil))
	e.patch = func(n int64, a k8stesting.PatchAction) (bool, runtime.Object, error) {
		if n == 1 {
			p, err := e.client.Tracker().Get(corev1.SchemeGroupVersion.WithResource("pods"), "shop", "web")
			return true, p, err
		}
		return false, nil, nil
	}
	e.s.Set(cpod("web"), kube.StateEnabled)
	eventually(t, "the first write", func() bool { return e.patches.Load() >= 1 })
	eventually(t, "the annotation", func() bool { return e.annotation("web") == kube.StateEnabled })
	e.cached("web", kube.StateEnabled)
	e.passes(3)
	if got := e.patches.Load(); got != 2 {
		t.Fatalf("%d patches (want 2: the lost one and its repair)", got)
	}
}

// TestRemovedByHandRestoredOnEvent: someone removes the annotation of a
// pod the agent serves; the informer's event brings it back (the
// periodic pass is an hour away here).
func TestRemovedByHandRestoredOnEvent(t *testing.T) {
	e := newEnv(t, setup{opts: Options{Interval: time.Hour, Settle: time.Millisecond}, events: true}, podObj("web", nil))
	e.s.Set(cpod("web"), kube.StateEnabled)
	e.cached("web", kube.StateEnabled)
	e.byHand("web", "")
	eventually(t, "the annotation back", func() bool { return e.annotation("web") == kube.StateEnabled })
	// Changed by hand to another value: back too.
	e.cached("web", kube.StateEnabled)
	e.byHand("web", kube.StateFailed)
	eventually(t, "enabled again", func() bool { return e.annotation("web") == kube.StateEnabled })
	if got := e.patches.Load(); got != 3 {
		t.Fatalf("%d patches (want 3: the first and two repairs)", got)
	}
}

// TestRemovedByHandRestoredByPeriodicPass: the same without informer
// events reaching the Syncer (the static inventory view, or an event lost
// while the wanted state was being set).
func TestRemovedByHandRestoredByPeriodicPass(t *testing.T) {
	e := newEnv(t, setup{opts: Options{Interval: 100 * time.Millisecond, Settle: 50 * time.Millisecond}}, podObj("web", nil))
	e.s.Set(cpod("web"), kube.StateEnabled)
	e.cached("web", kube.StateEnabled)
	e.byHand("web", "")
	eventually(t, "the annotation back", func() bool { return e.annotation("web") == kube.StateEnabled })
}

// TestNoWriteWhenRight: pods that already carry what is wanted (an agent
// restart re-asserting every adopted pod; a pod never annotated that is
// not meshed) cost no API call, on Set or on any pass.
func TestNoWriteWhenRight(t *testing.T) {
	e := newEnv(t, setup{opts: Options{Interval: 20 * time.Millisecond}, events: true},
		podObj("web", map[string]string{kube.RedirectionAnnotation: kube.StateEnabled}), podObj("plain", nil))
	e.s.Set(cpod("web"), kube.StateEnabled)
	e.s.Set(cpod("plain"), "")
	e.s.Changed("shop", "web")
	e.passes(5)
	if got, calls := e.patches.Load(), e.calls.Load(); got != 0 || calls != 0 {
		t.Fatalf("%d patches, %d writer calls for pods already right", got, calls)
	}
	if _, ok := e.s.Wanted("shop", "web"); !ok {
		t.Fatal("the meshed pod is no longer kept")
	}
}

// TestLastStateWins: while a write is in flight the agent changes its
// mind three times; the pod ends with the last state, in two writes
// (the one in flight and the last), not four.
func TestLastStateWins(t *testing.T) {
	e := newEnv(t, setup{opts: Options{Interval: time.Hour}, events: true}, podObj("web", nil))
	release := make(chan struct{})
	e.patch = func(n int64, _ k8stesting.PatchAction) (bool, runtime.Object, error) {
		if n == 1 {
			<-release
		}
		return false, nil, nil
	}
	e.s.Set(cpod("web"), kube.StateEnabled)
	eventually(t, "the first write in flight", func() bool { return e.patches.Load() == 1 })
	e.s.Set(cpod("web"), "")
	e.s.Set(cpod("web"), kube.StateFailed)
	e.s.Set(cpod("web"), kube.StateEnabled)
	e.s.Set(cpod("web"), "")
	close(release)
	eventually(t, "the last state", func() bool { return e.annotation("web") == "" })
	e.cached("web", "")
	time.Sleep(100 * time.Millisecond)
	if got := e.patches.Load(); got != 2 {
		t.Fatalf("%d patches (want 2)", got)
	}
}

// TestBurstOneWriteEach: 100 pods enrolled at once, each set twice (a
// CHECK, a re-adoption): one write per pod.
func TestBurstOneWriteEach(t *testing.T) {
	var objs []runtime.Object
	for i := range 100 {
		objs = append(objs, podObj(fmt.Sprintf("p%d", i), nil))
	}
	e := newEnv(t, setup{opts: Options{Interval: 50 * time.Millisecond}, events: true}, objs...)
	for range 2 {
		for i := range 100 {
			e.s.Set(cpod(fmt.Sprintf("p%d", i)), kube.StateEnabled)
		}
	}
	for i := range 100 {
		e.cached(fmt.Sprintf("p%d", i), kube.StateEnabled)
	}
	e.passes(3)
	if got := e.patches.Load(); got != 100 {
		t.Fatalf("%d patches for 100 pods", got)
	}
}

// TestGonePodDropped: the pod was deleted (404) or the name belongs to a
// new pod (the UID in the patch is refused): the Syncer stops, it does
// not retry forever.
func TestGonePodDropped(t *testing.T) {
	e := newEnv(t, setup{opts: Options{Interval: 20 * time.Millisecond, MinRetry: 5 * time.Millisecond}, events: true}, podObj("web", nil))
	e.patch = func(n int64, a k8stesting.PatchAction) (bool, runtime.Object, error) {
		if a.GetName() == "web" {
			return true, nil, apierrors.NewInvalid(corev1.SchemeGroupVersion.WithKind("Pod").GroupKind(), "web", nil)
		}
		return false, nil, nil
	}
	e.s.Set(cpod("deleted"), kube.StateEnabled)
	e.s.Set(cluster.Pod{Namespace: "shop", Name: "web", UID: "uid-old-web"}, kube.StateEnabled)
	eventually(t, "both dropped", func() bool {
		_, a := e.s.Wanted("shop", "deleted")
		_, b := e.s.Wanted("shop", "web")
		return !a && !b
	})
	e.passes(3)
	if got := e.patches.Load(); got != 2 {
		t.Fatalf("%d patches for two pods that are gone", got)
	}
}

// TestForgetStopsWrites: a pod forgotten (its sandbox deleted) is no
// longer kept; forgetting an older pod of the name keeps the newer one.
func TestForgetStopsWrites(t *testing.T) {
	e := newEnv(t, setup{opts: Options{Interval: 20 * time.Millisecond, Settle: time.Millisecond}}, podObj("web", nil))
	e.s.Set(cpod("web"), kube.StateEnabled)
	e.cached("web", kube.StateEnabled)
	e.s.Forget("shop", "web", "uid-older")
	if _, ok := e.s.Wanted("shop", "web"); !ok {
		t.Fatal("forgetting an older pod of the name forgot this one")
	}
	e.s.Forget("shop", "web", "uid-web")
	e.byHand("web", "")
	e.cached("web", "")
	e.passes(3)
	if got := e.annotation("web"); got != "" {
		t.Fatalf("a forgotten pod was annotated %q again", got)
	}
}

func (s *Syncer) tracked() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.want)
}

// TestChurnLeavesNothingTracked: weeks of pod churn in a few cycles.
// Pods wanted "enabled" then deleted from the API without the agent
// forgetting them (a DEL that never reached it), and pods wanted "" (not
// served) then deleted: the Syncer keeps nothing of them.
func TestChurnLeavesNothingTracked(t *testing.T) {
	e := newEnv(t, setup{opts: Options{Interval: 20 * time.Millisecond, Settle: time.Millisecond, MinRetry: time.Millisecond, MaxRetry: 5 * time.Millisecond}, events: true})
	const cycles, perCycle = 5, 40
	for c := range cycles {
		for i := range perCycle {
			name := fmt.Sprintf("c%d-p%d", c, i)
			if _, err := e.client.CoreV1().Pods("shop").Create(context.Background(), podObj(name, nil), metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
			st := kube.StateEnabled
			if i%2 == 1 {
				st = ""
			}
			e.s.Set(cpod(name), st)
		}
		for i := 0; i < perCycle; i += 2 {
			e.cached(fmt.Sprintf("c%d-p%d", c, i), kube.StateEnabled)
		}
		for i := range perCycle {
			if err := e.client.CoreV1().Pods("shop").Delete(context.Background(), fmt.Sprintf("c%d-p%d", c, i), metav1.DeleteOptions{}); err != nil {
				t.Fatal(err)
			}
		}
	}
	eventually(t, "nothing tracked", func() bool { return e.s.tracked() == 0 })
}
