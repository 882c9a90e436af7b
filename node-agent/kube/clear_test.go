package kube

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

func TestClearRedirections(t *testing.T) {
	ctx := context.Background()
	client := fake.NewClientset(
		pod("shop", "web", "", "node-a", []string{"10.1.0.5"}, nil, map[string]string{RedirectionAnnotation: "enabled", "keep": "me"}),
		pod("shop", "db", "", "node-a", []string{"10.1.0.6"}, nil, map[string]string{RedirectionAnnotation: "failed"}),
		pod("shop", "plain", "", "node-a", []string{"10.1.0.7"}, nil, map[string]string{"keep": "me"}),
		pod("shop", "gone", "", "node-a", []string{"10.1.0.8"}, nil, enabled),
		pod("shop", "remote", "", "node-b", []string{"10.2.0.5"}, nil, enabled),
	)
	var patched []string
	client.PrependReactor("patch", "pods", func(a k8stesting.Action) (bool, runtime.Object, error) {
		name := a.(k8stesting.PatchAction).GetName()
		patched = append(patched, name)
		if name == "gone" {
			return true, nil, apierrors.NewNotFound(schema.GroupResource{Resource: "pods"}, name)
		}
		return statusOnly(a)
	})
	cleared, err := ClearRedirections(ctx, client, "node-a")
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(cleared)
	if !slices.Equal(cleared, []string{"shop/db", "shop/web"}) {
		t.Fatalf("cleared %v, want shop/db and shop/web", cleared)
	}
	if slices.Contains(patched, "plain") || slices.Contains(patched, "remote") {
		t.Fatalf("patched %v: a pod without the annotation, or another node's", patched)
	}
	for name, want := range map[string]string{"web": "", "db": "", "remote": "enabled"} {
		p, _ := client.CoreV1().Pods("shop").Get(ctx, name, metav1.GetOptions{})
		if got, ok := p.Annotations[RedirectionAnnotation]; got != want || (want == "" && ok) {
			t.Errorf("%s: annotation %q (present %v), want %q", name, got, ok, want)
		}
	}
	if p, _ := client.CoreV1().Pods("shop").Get(ctx, "web", metav1.GetOptions{}); p.Annotations["keep"] != "me" {
		t.Errorf("other annotations lost: %v", p.Annotations)
	}

	// A patch that fails is named; the rest are still cleared.
	c2 := fake.NewClientset(
		pod("shop", "a", "", "node-a", nil, nil, enabled),
		pod("shop", "b", "", "node-a", nil, nil, enabled),
	)
	c2.PrependReactor("patch", "pods", func(a k8stesting.Action) (bool, runtime.Object, error) {
		if a.(k8stesting.PatchAction).GetName() == "a" {
			return true, nil, apierrors.NewForbidden(schema.GroupResource{Resource: "pods"}, "a", errors.New("RBAC: no patch"))
		}
		return false, nil, nil
	})
	cleared, err = ClearRedirections(ctx, c2, "node-a")
	if err == nil || !strings.Contains(err.Error(), "shop/a") || !strings.Contains(err.Error(), "RBAC") || !slices.Equal(cleared, []string{"shop/b"}) {
		t.Fatalf("one forbidden patch: cleared %v, err %v", cleared, err)
	}

	// The API server cannot be reached: said so, nothing cleared.
	c3 := fake.NewClientset(pod("shop", "a", "", "node-a", nil, nil, enabled))
	c3.PrependReactor("list", "pods", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, errors.New("dial tcp 10.96.0.1:443: connect: connection refused")
	})
	cleared, err = ClearRedirections(ctx, c3, "node-a")
	if !errors.Is(err, ErrAPIUnreachable) || !strings.Contains(err.Error(), "connection refused") || len(cleared) != 0 {
		t.Fatalf("unreachable API: cleared %v, err %v", cleared, err)
	}
	if _, err := ClearRedirections(ctx, c3, ""); err == nil {
		t.Fatal("no node name accepted")
	}
}
