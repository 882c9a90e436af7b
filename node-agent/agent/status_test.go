package agent

import (
	"context"
	"os"
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

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/kube"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
	"github.com/ambit-mesh/ambit/tunnel"
)

// statusAPI is a fake API server holding apps/<name> on the test node,
// and a kube.Source over it that the agent writes the pods' status
// through (the view stays the static inventory).
type statusAPI struct {
	client  *fake.Clientset
	src     *kube.Source
	patches atomic.Int64
	// fail makes that many next patches of pods fail like an API server
	// that timed out.
	fail atomic.Int64
}

func newStatusAPI(t *testing.T, names ...string) *statusAPI {
	t.Helper()
	var objs []runtime.Object
	for _, n := range names {
		objs = append(objs, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: "apps", Name: n, UID: types.UID("uid-" + n)},
			Spec:       corev1.PodSpec{NodeName: "node-a"},
			Status:     corev1.PodStatus{Phase: corev1.PodRunning},
		})
	}
	s := &statusAPI{client: fake.NewClientset(objs...)}
	s.client.PrependReactor("patch", "pods", func(k8stesting.Action) (bool, runtime.Object, error) {
		s.patches.Add(1)
		if s.fail.Load() > 0 {
			s.fail.Add(-1)
			return true, nil, apierrors.NewServerTimeout(corev1.Resource("pods"), "patch", 1)
		}
		return false, nil, nil
	})
	s.src, _ = syncedSource(t, s.client)
	return s
}

func (s *statusAPI) annotation(t testing.TB, name string) string {
	p, err := s.client.CoreV1().Pods("apps").Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return p.Annotations[kube.RedirectionAnnotation]
}

// setByHand patches the annotation as someone else would (not counted
// as the agent's).
func (s *statusAPI) setByHand(t testing.TB, name, state string) {
	t.Helper()
	patch, _ := kube.RedirectionPatch("", state)
	if _, err := s.client.CoreV1().Pods("apps").Patch(context.Background(), name, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	s.patches.Add(-1)
}

// TestFailedStatusWriteIsRetried: the API server fails the first writes
// of the "enabled" annotation after an ADD. Other nodes' agents send
// HBONE to the pod only once they see it, so a write given up after one
// error leaves a meshed pod reached in plaintext (or refused, strict)
// for its whole life. The agent retries until the annotation is there,
// then writes nothing more.
func TestFailedStatusWriteIsRetried(t *testing.T) {
	testenv.RequireRoot(t)
	api := newStatusAPI(t, "web")
	api.fail.Store(3)
	h := startAgent(t, "", invAmbient, func(o *Options) { o.Status = api.src })
	n := newNetns(t, "10.86.0.2/24")
	enrollLikePlugin(t, h, "web", n, "10.86.0.2/24")
	eventually(t, "the annotation after 3 failed writes", func() bool { return api.annotation(t, "web") == kube.StateEnabled })
	if got := api.patches.Load(); got != 4 {
		t.Errorf("%d patches for 3 failures and a success", got)
	}
	time.Sleep(time.Second)
	if got := api.patches.Load(); got != 4 {
		t.Errorf("%d patches once the annotation is right (want 4: no write when nothing differs)", got)
	}
}

// TestRemovedAnnotationRestored: someone removes the annotation of a pod
// the agent serves (kubectl annotate ambit.dev/redirection-, a controller
// replacing the pod's metadata): the agent writes it again.
func TestRemovedAnnotationRestored(t *testing.T) {
	testenv.RequireRoot(t)
	api := newStatusAPI(t, "web")
	h := startAgent(t, "", invAmbient, func(o *Options) { o.Status = api.src })
	n := newNetns(t, "10.86.1.2/24")
	enrollLikePlugin(t, h, "web", n, "10.86.1.2/24")
	eventually(t, "the annotation after ADD", func() bool { return api.annotation(t, "web") == kube.StateEnabled })
	api.setByHand(t, "web", "")
	if api.annotation(t, "web") != "" {
		t.Fatal("the test did not remove the annotation")
	}
	eventually(t, "the removed annotation back", func() bool { return api.annotation(t, "web") == kube.StateEnabled })
}

// TestAdoptedPodAnnotationRestored: the agent enrolled a pod at ADD but
// its annotation write was lost (it failed, or the agent died before it
// ran). The next agent re-adopts the pod and writes the annotation:
// nothing else would ever write it.
func TestAdoptedPodAnnotationRestored(t *testing.T) {
	testenv.RequireRoot(t)
	dir, _ := os.MkdirTemp("", "amb-agt-")
	t.Cleanup(func() { os.RemoveAll(dir) })
	api := newStatusAPI(t, "web")
	api.fail.Store(1 << 30) // the first agent never gets a write through
	h := startAgent(t, dir, invAmbient, func(o *Options) { o.Status = api.src })
	n := newNetns(t, "10.86.2.2/24")
	enrollLikePlugin(t, h, "web", n, "10.86.2.2/24")
	eventually(t, "a write attempt", func() bool { return api.patches.Load() > 0 })
	h.stop()
	api.fail.Store(0)
	startAgent(t, dir, invAmbient, func(o *Options) { o.Status = api.src })
	eventually(t, "the re-adopted pod's annotation", func() bool { return api.annotation(t, "web") == kube.StateEnabled })
}

// TestUnenrolledPodAnnotationCleared: a pod unenrolled while running
// (its namespace left the mesh) loses the annotation, even when the
// first attempts to remove it fail.
func TestUnenrolledPodAnnotationCleared(t *testing.T) {
	testenv.RequireRoot(t)
	api := newStatusAPI(t, "web")
	h := startAgent(t, "", invAmbient, func(o *Options) { o.Status = api.src })
	n := newNetns(t, "10.86.3.2/24")
	enrollLikePlugin(t, h, "web", n, "10.86.3.2/24")
	eventually(t, "the annotation after ADD", func() bool { return api.annotation(t, "web") == kube.StateEnabled })
	api.fail.Store(2)
	h.writeInventory(invPlain)
	if err := h.inv.Reload(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the annotation removed", func() bool { return api.annotation(t, "web") == "" })
	if resp, err := h.call(cniproto.OpDel, "apps", "web", "cid-web", n); err != nil || resp.Error != "" {
		t.Fatalf("DEL: %+v %v", resp, err)
	}
}

// TestLostRemovalRepairedAfterRestart: a pod unenrolled while running
// (its namespace left the mesh) whose removal of the annotation never got
// through before the agent stopped. The next agent finds the pod not
// enrolled (its record says so) and must still want no annotation:
// otherwise "enabled" stays for the pod's life and other nodes send HBONE
// to a port 15008 nothing serves (every connection refused).
func TestLostRemovalRepairedAfterRestart(t *testing.T) {
	testenv.RequireRoot(t)
	dir, _ := os.MkdirTemp("", "amb-agt-")
	t.Cleanup(func() { os.RemoveAll(dir) })
	api := newStatusAPI(t, "web")
	h := startAgent(t, dir, invAmbient, func(o *Options) { o.Status = api.src })
	n := newNetns(t, "10.86.4.2/24")
	enrollLikePlugin(t, h, "web", n, "10.86.4.2/24")
	eventually(t, "the annotation after ADD", func() bool { return api.annotation(t, "web") == kube.StateEnabled })
	before := api.patches.Load()
	api.fail.Store(1 << 30) // the removal never gets through
	h.writeInventory(invPlain)
	if err := h.inv.Reload(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a removal attempt", func() bool { return api.patches.Load() > before })
	h.stop()
	api.fail.Store(0)
	startAgent(t, dir, invPlain, func(o *Options) { o.Status = api.src })
	eventually(t, "the annotation removed by the next agent", func() bool { return api.annotation(t, "web") == "" })
}

// closeAtDeadline serves like echoTunnel but its Close takes until ctx
// ends, as a drain with a connection that never finishes does.
type closeAtDeadline struct{ echoTunnel }

type slowServing struct{ Serving }

func (c *closeAtDeadline) Serve(p tunnel.Pod) (Serving, error) {
	s, err := c.echoTunnel.Serve(p)
	if err != nil {
		return nil, err
	}
	return slowServing{s}, nil
}

func (s slowServing) Close(ctx context.Context) error {
	err := s.Serving.Close(ctx)
	<-ctx.Done()
	return err
}

// TestStoppingAgentLeavesAnnotations: an agent told to stop (SIGTERM, a
// surge upgrade) drains for up to drainTimeout, and meanwhile the newer
// agent of the node acts: here it enrolls again a pod the old one had
// unenrolled, and writes "enabled". The old agent's wishes are frozen
// from before (its reconcile loop has stopped), so it must not write
// them any more: before, it removed the new agent's "enabled" on its
// next pass, and other nodes sent plaintext to a pod that redirects
// (accepted without identity, or reset under strict) until it exited.
func TestStoppingAgentLeavesAnnotations(t *testing.T) {
	testenv.RequireRoot(t)
	api := newStatusAPI(t, "web")
	h := startAgent(t, "", invAmbient, func(o *Options) {
		o.Status = api.src
		o.Tunnel = &closeAtDeadline{}
		o.Config.DrainTimeout.Duration = 9 * time.Second
	})
	n := newNetns(t, "10.86.5.2/24")
	enrollLikePlugin(t, h, "web", n, "10.86.5.2/24")
	eventually(t, "the annotation after ADD", func() bool { return api.annotation(t, "web") == kube.StateEnabled })
	h.writeInventory(invPlain)
	if err := h.inv.Reload(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the annotation removed on unenrollment", func() bool { return api.annotation(t, "web") == "" })
	// Stop: the unenrolled pod's drain holds the agent for 9 s.
	cancel := h.cancel
	h.cancel = nil
	cancel()
	time.Sleep(100 * time.Millisecond)
	api.setByHand(t, "web", kube.StateEnabled) // the newer agent
	time.Sleep(6 * time.Second)                // more than a periodic pass
	if got := api.annotation(t, "web"); got != kube.StateEnabled {
		t.Errorf("a stopping agent rewrote the annotation to %q", got)
	}
	if err := <-h.done; err != nil {
		t.Error(err)
	}
}
