package readytaint

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/ambit-mesh/ambit/internal/testenv"
)

const node = "node-a"

var nodesGVR = schema.GroupVersionResource{Version: "v1", Resource: "nodes"}

// readyNow is closed: the agent is ready from the start.
var readyNow = func() <-chan struct{} { c := make(chan struct{}); close(c); return c }()

var (
	ours      = corev1.Taint{Key: DefaultKey, Effect: corev1.TaintEffectNoSchedule}
	oursExec  = corev1.Taint{Key: DefaultKey, Value: "x", Effect: corev1.TaintEffectNoExecute}
	notReady  = corev1.Taint{Key: "node.kubernetes.io/not-ready", Effect: corev1.TaintEffectNoSchedule}
	gpu       = corev1.Taint{Key: "example.com/gpu", Value: "true", Effect: corev1.TaintEffectNoSchedule}
	latecomer = corev1.Taint{Key: "example.com/drain", Effect: corev1.TaintEffectNoSchedule}
)

// api is a fake API server that keeps resourceVersions as the real one
// does: every write of a Node gives it a new one, and a write (update or
// merge patch) naming another one is refused with 409 Conflict. The fake
// clientset alone neither sets them nor checks them, and without that a
// patch that overwrote a concurrent change would pass unnoticed.
type api struct {
	t      *testing.T
	client *fake.Clientset
	rv     atomic.Int64

	mu sync.Mutex
	// beforePatch, if set, runs before the n-th (from 1) patch of a
	// Node is checked: a concurrent writer (through write) or a refusal.
	beforePatch func(n int) error
	patches     int
	conflicts   int
}

func newAPI(t *testing.T, nodes ...*corev1.Node) *api {
	t.Helper()
	a := &api{t: t}
	var objs []runtime.Object
	for _, n := range nodes {
		n = n.DeepCopy()
		n.ResourceVersion = a.nextRV()
		objs = append(objs, n)
	}
	a.client = fake.NewClientset(objs...)
	a.client.PrependReactor("update", "nodes", func(act k8stesting.Action) (bool, runtime.Object, error) {
		n := act.(k8stesting.UpdateAction).GetObject().(*corev1.Node).DeepCopy()
		return true, n, a.write(n)
	})
	a.client.PrependReactor("patch", "nodes", func(act k8stesting.Action) (bool, runtime.Object, error) {
		pa := act.(k8stesting.PatchAction)
		a.mu.Lock()
		a.patches++
		n, hook := a.patches, a.beforePatch
		a.mu.Unlock()
		if hook != nil {
			if err := hook(n); err != nil {
				return true, nil, err
			}
		}
		if pa.GetPatchType() != types.MergePatchType {
			t.Errorf("patch of type %s, want a merge patch", pa.GetPatchType())
			return true, nil, apierrors.NewBadRequest("unexpected patch type")
		}
		cur := a.get(pa.GetName())
		if cur == nil {
			return true, nil, apierrors.NewNotFound(schema.GroupResource{Resource: "nodes"}, pa.GetName())
		}
		old, _ := json.Marshal(cur)
		var doc, patch map[string]any
		_ = json.Unmarshal(old, &doc)
		if err := json.Unmarshal(pa.GetPatch(), &patch); err != nil {
			return true, nil, apierrors.NewBadRequest(err.Error())
		}
		merged, _ := json.Marshal(mergePatch(doc, patch))
		out := &corev1.Node{}
		if err := json.Unmarshal(merged, out); err != nil {
			return true, nil, apierrors.NewBadRequest(err.Error())
		}
		return true, out, a.write(out)
	})
	return a
}

func (a *api) nextRV() string { return strconv.FormatInt(a.rv.Add(1), 10) }

// write stores n as the API server would: a resourceVersion other than
// the stored one is a conflict; the stored object gets a new one.
func (a *api) write(n *corev1.Node) error {
	cur := a.get(n.Name)
	if cur == nil {
		return apierrors.NewNotFound(schema.GroupResource{Resource: "nodes"}, n.Name)
	}
	if n.ResourceVersion != "" && n.ResourceVersion != cur.ResourceVersion {
		a.mu.Lock()
		a.conflicts++
		a.mu.Unlock()
		return apierrors.NewConflict(schema.GroupResource{Resource: "nodes"}, n.Name,
			errorString("the object has been modified; please apply your changes to the latest version and try again"))
	}
	n.ResourceVersion = a.nextRV()
	return a.client.Tracker().Update(nodesGVR, n, "")
}

type errorString string

func (e errorString) Error() string { return string(e) }

// mergePatch is RFC 7386, what the API server does with a merge patch.
func mergePatch(doc, patch map[string]any) map[string]any {
	for k, v := range patch {
		if v == nil {
			delete(doc, k)
			continue
		}
		pm, ok := v.(map[string]any)
		dm, ok2 := doc[k].(map[string]any)
		if ok && ok2 {
			doc[k] = mergePatch(dm, pm)
		} else if ok {
			doc[k] = mergePatch(map[string]any{}, pm)
		} else {
			doc[k] = v
		}
	}
	return doc
}

func (a *api) get(name string) *corev1.Node {
	o, err := a.client.Tracker().Get(nodesGVR, "", name)
	if err != nil {
		return nil
	}
	return o.(*corev1.Node).DeepCopy()
}

// setTaints is another writer (a person, a node pool reconciler) changing
// the Node's taints, with a fresh read.
func (a *api) setTaints(name string, ts ...corev1.Taint) {
	a.t.Helper()
	n := a.get(name)
	n.Spec.Taints = ts
	if err := a.write(n); err != nil {
		a.t.Fatal(err)
	}
}

func (a *api) patchCount() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.patches
}

func nodeWith(name string, ts ...corev1.Taint) *corev1.Node {
	return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: corev1.NodeSpec{Taints: ts}}
}

type run struct {
	reg  *prometheus.Registry
	logs *testenv.Buffer
	done chan error
}

// start runs Run until the test ends.
func start(t *testing.T, a *api, ready <-chan struct{}, key string) *run {
	t.Helper()
	r := &run{reg: prometheus.NewRegistry(), logs: &testenv.Buffer{}, done: make(chan error, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		r.done <- Run(ctx, Config{Client: a.client, NodeName: node, Key: key, Ready: ready,
			MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond,
			Registerer: r.reg, Logger: slog.New(slog.NewTextHandler(r.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-r.done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("Run did not return after its context ended")
		}
	})
	return r
}

func (r *run) counter(t *testing.T, name string, match map[string]string) float64 {
	t.Helper()
	return testenv.Metric(t, r.reg, name, match)
}

func waitTaints(t *testing.T, a *api, name string, want []corev1.Taint) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := a.get(name).Spec.Taints
		if reflect.DeepEqual(got, want) || len(got) == 0 && len(want) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("node %s taints %+v, want %+v", name, got, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Before Ready nothing is written; once Ready, every taint with the key
// goes (both effects), and every other taint stays as it was, in order,
// on this node; another node's taint with the key is not ours.
func TestRemovesOnlyItsTaintOnceReady(t *testing.T) {
	a := newAPI(t, nodeWith(node, notReady, ours, gpu, oursExec), nodeWith("node-b", ours))
	ready := make(chan struct{})
	r := start(t, a, ready, DefaultKey)

	time.Sleep(300 * time.Millisecond)
	if n := a.patchCount(); n != 0 {
		t.Fatalf("%d patches before the agent is ready, want 0", n)
	}
	if got := a.get(node).Spec.Taints; len(got) != 4 {
		t.Fatalf("taints changed before ready: %+v", got)
	}
	if !strings.Contains(r.logs.String(), "this node carries the startup taint") {
		t.Errorf("no log line saying what the tainted node waits for:\n%s", r.logs)
	}

	close(ready)
	waitTaints(t, a, node, []corev1.Taint{notReady, gpu})
	if got := a.get("node-b").Spec.Taints; !reflect.DeepEqual(got, []corev1.Taint{ours}) {
		t.Errorf("node-b's taints %+v: another node's taint was touched", got)
	}
	// The Node changes when the patch lands; the agent counts and logs
	// once its answer is back, a moment later.
	eventually(t, func() bool {
		return r.counter(t, "ambit_agent_ready_taint_removals_total", nil) == 1 &&
			strings.Contains(r.logs.String(), "removed the startup taint") && strings.Contains(r.logs.String(), "effects=NoSchedule,NoExecute")
	}, func() string {
		return fmt.Sprintf("ambit_agent_ready_taint_removals_total %v (want 1), or no log line for the removal naming both effects:\n%s",
			r.counter(t, "ambit_agent_ready_taint_removals_total", nil), r.logs)
	})
	if v := r.counter(t, "ambit_agent_ready_taint_removals_total", nil); v != 1 {
		t.Errorf("ambit_agent_ready_taint_removals_total %v, want 1", v)
	}
}

// eventually waits up to 10 s for cond, then fails with msg().
func eventually(t *testing.T, cond func() bool, msg func() string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal(msg())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A taint another controller adds between the agent's read and its patch
// survives: the patch names the resourceVersion read, the API server
// refuses it, and the retry reads the Node again.
func TestConflictRetriedKeepsConcurrentTaint(t *testing.T) {
	a := newAPI(t, nodeWith(node, ours, gpu))
	a.beforePatch = func(n int) error {
		if n == 1 {
			cur := a.get(node)
			cur.Spec.Taints = append(cur.Spec.Taints, latecomer)
			return a.write(cur)
		}
		return nil
	}
	r := start(t, a, readyNow, DefaultKey)

	waitTaints(t, a, node, []corev1.Taint{gpu, latecomer})
	a.mu.Lock()
	conflicts := a.conflicts
	a.mu.Unlock()
	if conflicts != 1 {
		t.Errorf("%d conflicts, want 1 (the first patch must carry the resourceVersion it read)", conflicts)
	}
	if v := r.counter(t, "ambit_agent_ready_taint_conflicts_total", nil); v != 1 {
		t.Errorf("ambit_agent_ready_taint_conflicts_total %v, want 1", v)
	}
	if v := r.counter(t, "ambit_agent_ready_taint_errors_total", nil); v != 0 {
		t.Errorf("ambit_agent_ready_taint_errors_total %v, want 0 (a conflict retried at once is no failure)", v)
	}
}

// While the agent runs, a taint put back (a node pool reconciler, a
// person) is removed again, from the watch, without a restart.
func TestReAddedTaintRemovedAgain(t *testing.T) {
	a := newAPI(t, nodeWith(node, ours))
	r := start(t, a, readyNow, DefaultKey)
	waitTaints(t, a, node, nil)

	for i := 0; i < 3; i++ {
		a.setTaints(node, gpu, ours)
		waitTaints(t, a, node, []corev1.Taint{gpu})
	}
	eventually(t, func() bool {
		return r.counter(t, "ambit_agent_ready_taint_removals_total", nil) == 4 &&
			strings.Contains(r.logs.String(), "removed the startup taint again")
	}, func() string {
		return fmt.Sprintf("ambit_agent_ready_taint_removals_total %v (want 4), or no log line for a removal of a re-added taint:\n%s",
			r.counter(t, "ambit_agent_ready_taint_removals_total", nil), r.logs)
	})
	if v := r.counter(t, "ambit_agent_ready_taint_removals_total", nil); v != 4 {
		t.Errorf("ambit_agent_ready_taint_removals_total %v, want 4", v)
	}
}

// An empty key: no read, no watch, no write, and Run returns at once.
func TestDisabledDoesNothing(t *testing.T) {
	a := newAPI(t, nodeWith(node, ours))
	err := Run(context.Background(), Config{Client: a.client, NodeName: node, Key: "", Ready: readyNow})
	if err != nil {
		t.Fatalf("Run with no key: %v", err)
	}
	if acts := a.client.Actions(); len(acts) != 0 {
		t.Errorf("%d API calls with the feature off, want 0: %v", len(acts), acts)
	}
	if got := a.get(node).Spec.Taints; !reflect.DeepEqual(got, []corev1.Taint{ours}) {
		t.Errorf("taints %+v, want the node untouched", got)
	}
}

// A node registered without the taint is read and watched, never written.
func TestUntaintedNodeNotPatched(t *testing.T) {
	a := newAPI(t, nodeWith(node, gpu))
	r := start(t, a, readyNow, DefaultKey)
	// The watch is up once the informer listed; give the loop time.
	deadline := time.Now().Add(5 * time.Second)
	for !hasAction(a, "watch") && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond)
	if n := a.patchCount(); n != 0 {
		t.Errorf("%d patches of an untainted node, want 0", n)
	}
	if strings.Contains(r.logs.String(), "startup taint") {
		t.Errorf("log mentions the startup taint on a node without it:\n%s", r.logs)
	}
}

func hasAction(a *api, verb string) bool {
	for _, act := range a.client.Actions() {
		if act.GetVerb() == verb {
			return true
		}
	}
	return false
}

// Forbidden (the ClusterRole without patch on nodes) is logged with what
// to do, counted and retried; it never ends Run, and once the permission
// is there the taint goes.
func TestForbiddenRetriedNotFatal(t *testing.T) {
	a := newAPI(t, nodeWith(node, ours, gpu))
	var allowed atomic.Bool
	a.beforePatch = func(int) error {
		if !allowed.Load() {
			return apierrors.NewForbidden(schema.GroupResource{Resource: "nodes"}, node,
				errorString(`User "system:serviceaccount:ambit-system:ambit-agent" cannot patch resource "nodes"`))
		}
		return nil
	}
	r := start(t, a, readyNow, DefaultKey)

	deadline := time.Now().Add(10 * time.Second)
	for r.counter(t, "ambit_agent_ready_taint_errors_total", map[string]string{"reason": "forbidden"}) < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("forbidden patches not retried: %v errors\n%s", r.counter(t, "ambit_agent_ready_taint_errors_total", nil), r.logs)
		}
		time.Sleep(5 * time.Millisecond)
	}
	select {
	case err := <-r.done:
		t.Fatalf("Run returned on a forbidden patch: %v", err)
	default:
	}
	if !strings.Contains(r.logs.String(), "lacks patch on nodes") {
		t.Errorf("the forbidden error does not say what to do:\n%s", r.logs)
	}
	allowed.Store(true)
	waitTaints(t, a, node, []corev1.Taint{gpu})
}

func TestTaintPatchIsGuarded(t *testing.T) {
	if _, err := taintPatch("", nil); err == nil {
		t.Error("a patch without resourceVersion was made")
	}
	b, err := taintPatch("42", nil)
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"metadata":{"resourceVersion":"42"},"spec":{"taints":[]}}`; string(b) != want {
		t.Errorf("patch %s, want %s", b, want)
	}
}

// A refusal by the admission policy that keeps the agent to its own Node
// is a 403 like RBAC's; telling the operator to grant patch on nodes
// (which the agent has) would send them the wrong way.
func TestPolicyRefusalNamedAsSuch(t *testing.T) {
	a := newAPI(t, nodeWith(node, ours, gpu))
	var allowed atomic.Bool
	a.beforePatch = func(int) error {
		if !allowed.Load() {
			// The API server's wording for a ValidatingAdmissionPolicy denial.
			return apierrors.NewForbidden(schema.GroupResource{Resource: "nodes"}, node,
				errorString(`ValidatingAdmissionPolicy 'ambit-agent-node-restriction' with binding 'ambit-agent-node-restriction' denied request: ambit-agent of node other may not write Node `+node+`: only its own`))
		}
		return nil
	}
	r := start(t, a, readyNow, DefaultKey)

	deadline := time.Now().Add(10 * time.Second)
	for r.counter(t, "ambit_agent_ready_taint_errors_total", map[string]string{"reason": "policy"}) < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("policy refusals not counted as such: %v errors\n%s", r.counter(t, "ambit_agent_ready_taint_errors_total", nil), r.logs)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if got := r.counter(t, "ambit_agent_ready_taint_errors_total", map[string]string{"reason": "forbidden"}); got != 0 {
		t.Errorf("policy refusals counted as RBAC's: forbidden=%v", got)
	}
	if strings.Contains(r.logs.String(), "lacks patch on nodes") || !strings.Contains(r.logs.String(), "ambit-agent-node-restriction") {
		t.Errorf("the log does not name the policy, or blames RBAC:\n%s", r.logs)
	}
	allowed.Store(true)
	waitTaints(t, a, node, []corev1.Taint{gpu})
}
