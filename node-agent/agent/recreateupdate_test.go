package agent

import (
	"context"
	"encoding/json"
	"net/netip"
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
)

// TestRecreatedPodSeenAsUpdateDoesNotTakeTheOldSandbox: apps/web (UID
// uid-web, not enrolled: no label) runs in one sandbox; it is force-deleted
// and made again under its name with the enrollment label (a StatefulSet
// whose template gained the label), while the agent's watch was down. The
// relist reports it as an UPDATE uid-web → uid-web-2, before the kubelet's
// DEL of the old sandbox and before the new pod has a sandbox or an IP.
// The reconcile of that event must not take the old pod's sandbox for the
// new pod's: before, it enrolled the old sandbox live (rules and listeners
// in the deleted pod's namespace, served as uid-web-2's identity) and
// annotated the new pod "enabled" while nothing of it was served. The new
// pod is enrolled by its own ADD; the old sandbox's DEL leaves nothing.
func TestRecreatedPodSeenAsUpdateDoesNotTakeTheOldSandbox(t *testing.T) {
	testenv.RequireRoot(t)
	old := newNetns(t, "10.74.0.2/24")
	client := fake.NewClientset(
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "apps"}},
		&corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: "apps", Name: "web", UID: "uid-web"},
			Spec:       corev1.PodSpec{NodeName: "node-a", ServiceAccountName: "web-sa"},
			Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.74.0.2",
				PodIPs: []corev1.PodIP{{IP: "10.74.0.2"}}},
		})
	// The API server refuses the agent's UID-carrying patch on another
	// pod of the name (metadata.uid is immutable); the fake would apply
	// it and turn the new pod back into the old one.
	client.PrependReactor("patch", "pods", func(action k8stesting.Action) (bool, runtime.Object, error) {
		pa := action.(k8stesting.PatchAction)
		var patch struct {
			Metadata struct {
				UID types.UID `json:"uid"`
			} `json:"metadata"`
		}
		if err := json.Unmarshal(pa.GetPatch(), &patch); err != nil || patch.Metadata.UID == "" {
			return false, nil, nil
		}
		cur, err := client.Tracker().Get(corev1.SchemeGroupVersion.WithResource("pods"), pa.GetNamespace(), pa.GetName())
		if err != nil {
			return false, nil, nil
		}
		if cur.(*corev1.Pod).UID != patch.Metadata.UID {
			return true, nil, apierrors.NewInvalid(corev1.SchemeGroupVersion.WithKind("Pod").GroupKind(), pa.GetName(), nil)
		}
		return false, nil, nil
	})
	src, ctx := syncedSource(t, client)
	h := startAgent(t, "", invPlain, func(o *Options) { o.View, o.Status = src, src })
	addOf := func(uid, cid string, n *testNetns, ip string) *cniproto.Response {
		t.Helper()
		req := &cniproto.Request{Version: cniproto.Version, Op: cniproto.OpAdd,
			Pod: cniproto.Pod{Namespace: "apps", Name: "web", UID: uid, ContainerID: cid, Netns: n.path,
				IPs: []netip.Prefix{netip.MustParsePrefix(ip)}}}
		c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		resp, err := cniproto.Call(c, h.sock, req, n.file)
		if err != nil || resp.Error != "" {
			t.Fatalf("ADD %s: %+v %v", cid, resp, err)
		}
		return resp
	}
	if resp := addOf("uid-web", "cid-old", old, "10.74.0.2/24"); resp.Decision != cniproto.Skip {
		t.Fatalf("ADD of the unlabelled pod: %+v", resp)
	}

	// What the relist hands the informer: the same key, another UID.
	recreated := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "apps", Name: "web", UID: "uid-web-2",
			Labels: map[string]string{"ambit.dev/dataplane-mode": "ambient"}},
		Spec:   corev1.PodSpec{NodeName: "node-a", ServiceAccountName: "web-sa"},
		Status: corev1.PodStatus{Phase: corev1.PodPending},
	}
	if _, err := client.CoreV1().Pods("apps").Update(ctx, recreated, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the view to hold the recreated pod", func() bool {
		p, found, _ := src.Pod(ctx, "apps", "web")
		return found && p.UID == "uid-web-2"
	})
	// The pass the event asks for, run here so that what it did is
	// settled when looked at (the loop's own pass does the same).
	h.a.reconcile(ctx, []key{{kind: keyPod, namespace: "apps", name: "web"}})
	if got := h.tun.Live(); got != 0 {
		t.Errorf("%d servings after the UPDATE, want 0: the old pod's sandbox was served as the new pod", got)
	}
	if found, _ := (Rules{}).Installed(ctx, old.file); len(found) > 0 {
		t.Errorf("the old pod's sandbox got redirection rules %v from the new pod's UPDATE", found)
	}
	if w, ok := h.a.statusSync.Wanted("apps", "web"); ok && w == kube.StateEnabled {
		t.Errorf("the new pod is wanted %q before any sandbox of it is served", w)
	}

	// The new pod's own ADD enrolls it; the old sandbox's DEL follows.
	n := newNetns(t, "10.74.0.3/24")
	if resp := addOf("uid-web-2", "cid-new", n, "10.74.0.3/24"); resp.Decision != cniproto.Enroll {
		t.Fatalf("ADD of the recreated pod: %+v", resp)
	}
	req := &cniproto.Request{Version: cniproto.Version, Op: cniproto.OpDel,
		Pod: cniproto.Pod{Namespace: "apps", Name: "web", UID: "uid-web", ContainerID: "cid-old", Netns: old.path}}
	c, cancelDel := context.WithTimeout(ctx, 10*time.Second)
	resp, err := cniproto.Call(c, h.sock, req, old.file)
	cancelDel()
	if err != nil || resp.Error != "" {
		t.Fatalf("DEL of the old sandbox: %+v %v", resp, err)
	}
	if !within(5*time.Second, func() bool {
		cids, claims, recs := agentHolds(t, h)
		return h.tun.Live() == 1 && len(cids) == 1 && claims == 1 && len(recs) == 1
	}) {
		cids, claims, recs := agentHolds(t, h)
		t.Errorf("after the new ADD and the old DEL: %d servings, sandboxes %v, %d claims, records %v; want 1, [cid-new], 1, 1", h.tun.Live(), cids, claims, recs)
	}
	if p := served(h); p == nil || p.rec.ContainerID != "cid-new" || p.rec.UID != "uid-web-2" {
		t.Errorf("apps/web served by %+v, want cid-new as uid-web-2", p)
	}
	if err := listenersAnswer(t, n); err != nil {
		t.Errorf("the new sandbox's listeners: %v", err)
	}
	eventually(t, "the new pod's annotation", func() bool {
		p, err := client.CoreV1().Pods("apps").Get(ctx, "web", metav1.GetOptions{})
		return err == nil && p.UID == types.UID("uid-web-2") && p.Annotations[kube.RedirectionAnnotation] == kube.StateEnabled
	})
}
