package agent

import (
	"net/netip"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/netnsfind"
	"github.com/ambit-mesh/ambit/node-agent/state"
)

// TestRecordWithAPreviousPodsUIDStillFollowsLabels: an agent before
// session 25 recorded a sandbox with the UID its view held at the ADD,
// which for a pod made again under its name on this node (a StatefulSet's
// rolling update) was the previous pod's. Adopted by this agent, that
// record is the running pod's own sandbox (its netns holds the pod's IP)
// under another UID than the pod's: the pod labelled afterwards must be
// enrolled live, not left in plaintext as "another pod's sandbox".
func TestRecordWithAPreviousPodsUIDStillFollowsLabels(t *testing.T) {
	testenv.RequireRoot(t)
	dir := agentDir(t)
	n := newNetns(t, "10.74.1.2/24")
	ino, err := netnsfind.Inode(n.file)
	if err != nil {
		t.Fatal(err)
	}
	store, err := state.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := store.Put(state.Pod{Namespace: "apps", Name: "web", UID: "uid-web-previous", ContainerID: "cid-web",
		Netns: n.path, NetnsInode: ino, IPs: []netip.Addr{netip.MustParseAddr("10.74.1.2")}, Since: time.Now()}); err != nil {
		t.Fatal(err)
	}
	client := fake.NewClientset(
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "apps"}},
		&corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: "apps", Name: "web", UID: "uid-web"},
			Spec:       corev1.PodSpec{NodeName: "node-a", ServiceAccountName: "web-sa"},
			Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.74.1.2",
				PodIPs: []corev1.PodIP{{IP: "10.74.1.2"}}},
		})
	src, ctx := syncedSource(t, client)
	h := startAgent(t, dir, invPlain, func(o *Options) { o.View, o.Status = src, src })
	if p := h.a.podByName("apps/web"); p == nil || p.rec.UID != "uid-web-previous" || p.enrolled() {
		t.Fatalf("adopted apps/web: %+v, want its record, not enrolled", p)
	}

	pod, err := client.CoreV1().Pods("apps").Get(ctx, "web", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pod.Labels = map[string]string{"ambit.dev/dataplane-mode": "ambient"}
	if _, err := client.CoreV1().Pods("apps").Update(ctx, pod, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the view to hold the label", func() bool {
		p, found, _ := src.Pod(ctx, "apps", "web")
		return found && p.Labels["ambit.dev/dataplane-mode"] == "ambient"
	})
	// The pass the event asks for, run here so that what it did is
	// settled when looked at.
	h.a.reconcile(ctx, []key{{kind: keyPod, namespace: "apps", name: "web"}})
	if got := h.tun.Live(); got != 1 {
		t.Errorf("%d servings after the label, want 1: the labelled pod's own sandbox was left unenrolled", got)
	}
	if found, _ := (Rules{}).Installed(ctx, n.file); len(found) == 0 {
		t.Error("the labelled pod's sandbox has no redirection rules: its traffic goes out in plaintext")
	}

	// The label removed again: unenrolled.
	pod, err = client.CoreV1().Pods("apps").Get(ctx, "web", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pod.Labels = nil
	if _, err := client.CoreV1().Pods("apps").Update(ctx, pod, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the view to lose the label", func() bool {
		p, found, _ := src.Pod(ctx, "apps", "web")
		return found && p.Labels["ambit.dev/dataplane-mode"] == ""
	})
	h.a.reconcile(ctx, []key{{kind: keyPod, namespace: "apps", name: "web"}})
	if found, _ := (Rules{}).Installed(ctx, n.file); len(found) > 0 {
		t.Errorf("the unlabelled pod's sandbox kept redirection rules %v", found)
	}
}
