package kube

import (
	"context"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
)

// TestLivePodReadsPastTheCache: the pod was deleted and made again under
// its name while the informer missed it (stopped here; behind, in a
// cluster). Pod answers from the cache, the previous UID; LivePod
// answers the API server's pod, the new UID, and not found for a name
// the API server does not have.
func TestLivePodReadsPastTheCache(t *testing.T) {
	pod := func(uid string) *corev1.Pod {
		return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "apps", Name: "web", UID: types.UID(uid)},
			Spec: corev1.PodSpec{NodeName: "node-a"}, Status: corev1.PodStatus{Phase: corev1.PodRunning}}
	}
	client := fake.NewClientset(pod("uid-old"))
	s, err := New(Config{Client: client, NodeName: "node-a"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s.Start(ctx)
	if err := s.WaitSynced(ctx); err != nil {
		t.Fatal(err)
	}
	cancel() // the informers stop: the cache keeps uid-old
	bg := context.Background()
	if err := client.CoreV1().Pods("apps").Delete(bg, "web", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := client.CoreV1().Pods("apps").Create(bg, pod("uid-new"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if p, ok, err := s.Pod(bg, "apps", "web"); err != nil || !ok || p.UID != "uid-old" {
		t.Fatalf("Pod: %+v %v %v, want the cached uid-old", p, ok, err)
	}
	if p, ok, err := s.LivePod(bg, "apps", "web"); err != nil || !ok || p.UID != "uid-new" {
		t.Errorf("LivePod: %+v %v %v, want uid-new", p, ok, err)
	}
	if p, ok, err := s.LivePod(bg, "apps", "gone"); err != nil || ok {
		t.Errorf("LivePod of a missing pod: %+v %v %v, want not found", p, ok, err)
	}
}
