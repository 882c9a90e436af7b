package kube

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/client-go/tools/record"

	"github.com/ambit-mesh/ambit/node-agent/cluster"
)

func TestRedirectionPatch(t *testing.T) {
	b, err := RedirectionPatch("u-1", "enabled")
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]map[string]any
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	if got["metadata"]["uid"] != "u-1" || got["metadata"]["annotations"].(map[string]any)[RedirectionAnnotation] != "enabled" {
		t.Fatalf("patch = %s", b)
	}
	b, _ = RedirectionPatch("", "")
	if string(b) != `{"metadata":{"annotations":{"ambit.dev/redirection":null}}}` {
		t.Fatalf("removal patch = %s", b)
	}
}

func TestSetRedirectionPatchesAndSkipsNoOps(t *testing.T) {
	web := pod("shop", "web", "", "node-a", []string{"10.1.0.5"}, nil, map[string]string{"keep": "me"})
	client := fake.NewClientset(web)
	patches := 0
	client.PrependReactor("patch", "pods", func(a k8stesting.Action) (bool, runtime.Object, error) {
		patches++
		return statusOnly(a)
	})
	s, _ := startSource(t, client, Config{})
	ctx := context.Background()
	cp := toPod(web)
	for _, state := range []string{StatePending, StateEnabled} {
		if err := s.SetRedirection(ctx, cp, state); err != nil {
			t.Fatal(err)
		}
		got, _ := client.CoreV1().Pods("shop").Get(ctx, "web", metav1.GetOptions{})
		if got.Annotations[RedirectionAnnotation] != state || got.Annotations["keep"] != "me" {
			t.Fatalf("after %s: %v", state, got.Annotations)
		}
	}
	// Once the cache has seen "enabled", setting it again costs no call.
	eventually(t, "cache sees enabled", func() bool { v, _ := s.cachedAnnotation(cp); return v == StateEnabled })
	before := patches
	if err := s.SetRedirection(ctx, cp, StateEnabled); err != nil {
		t.Fatal(err)
	}
	if patches != before {
		t.Fatal("a no-op status write went to the API server")
	}
	if err := s.SetRedirection(ctx, cp, ""); err != nil {
		t.Fatal(err)
	}
	got, _ := client.CoreV1().Pods("shop").Get(ctx, "web", metav1.GetOptions{})
	if _, ok := got.Annotations[RedirectionAnnotation]; ok || got.Annotations["keep"] != "me" {
		t.Fatalf("after removal: %v", got.Annotations)
	}
	if err := s.SetRedirection(ctx, cp, "on"); err == nil || !strings.Contains(err.Error(), `"on"`) {
		t.Fatalf("bad state accepted: %v", err)
	}
	if err := s.SetRedirection(ctx, cluster.Pod{Namespace: "shop", Name: "gone"}, StateFailed); err == nil || !strings.Contains(err.Error(), "shop/gone") {
		t.Fatalf("patching a missing pod: %v", err)
	}
}

// statusOnly refuses a pod patch that is not on the pods/status
// subresource, as an API server does for the agent's ClusterRole
// (manifests/base/agent/rbac.yaml: patch on pods/status, not on pods).
func statusOnly(a k8stesting.Action) (bool, runtime.Object, error) {
	if a.GetSubresource() != "status" {
		return true, nil, apierrors.NewForbidden(schema.GroupResource{Resource: "pods"}, a.(k8stesting.PatchAction).GetName(), errors.New("patch only through pods/status"))
	}
	return false, nil, nil
}

func TestWarnRecordsEventWithReason(t *testing.T) {
	rec := record.NewFakeRecorder(10)
	s, _ := startSource(t, fake.NewClientset(), Config{Recorder: rec})
	p := cluster.Pod{Namespace: "shop", Name: "web", UID: "u"}
	if err := s.Warn(context.Background(), p, "RedirectionFailed", "nft: permission denied"); err != nil {
		t.Fatal(err)
	}
	if got := <-rec.Events; got != "Warning RedirectionFailed nft: permission denied" {
		t.Fatalf("event = %q", got)
	}
	if err := s.Warn(context.Background(), p, "", "x"); err == nil {
		t.Fatal("empty reason accepted")
	}
}

func TestWarnWritesKubernetesEventThroughClient(t *testing.T) {
	client := fake.NewClientset()
	s, err := New(Config{Client: client, NodeName: "node-a"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer func() { cancel(); s.Close() }()
	s.Start(ctx)
	p := cluster.Pod{Namespace: "shop", Name: "web", UID: "u"}
	if err := s.Warn(ctx, p, "ListenerFailed", "bind 15008: address in use"); err != nil {
		t.Fatal(err)
	}
	var ev corev1.Event
	eventually(t, "Event object", func() bool {
		l, _ := client.CoreV1().Events("shop").List(ctx, metav1.ListOptions{})
		if len(l.Items) == 0 {
			return false
		}
		ev = l.Items[0]
		return true
	})
	if ev.Reason != "ListenerFailed" || ev.Type != corev1.EventTypeWarning || ev.InvolvedObject.Name != "web" ||
		ev.InvolvedObject.Kind != "Pod" || ev.Source.Component != "ambit-agent" || ev.Source.Host != "node-a" {
		t.Fatalf("event = %+v", ev)
	}
}
