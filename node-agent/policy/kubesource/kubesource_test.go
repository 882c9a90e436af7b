package kubesource

import (
	"context"
	"io"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	k8stesting "k8s.io/client-go/testing"
	"sigs.k8s.io/yaml"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambit-mesh/ambit/node-agent/policy"
	"github.com/ambit-mesh/ambit/tunnel"
)

// These tests drive the source with client-go's in-memory dynamic client
// (object tracker, real informers, real status subresource calls). The
// same flow against a real API server is e2e/kube/policy_test.go.

var web = tunnel.Workload{UID: "u", Namespace: "shop", Name: "web-1", Labels: map[string]string{"app": "web"}}

func from(id string) tunnel.ConnInfo {
	return tunnel.ConnInfo{SrcIdentity: id, SrcIP: netip.MustParseAddr("10.1.0.5"), Dst: web, DstPort: 8080, Plaintext: id == ""}
}

func obj(t *testing.T, y string) *unstructured.Unstructured {
	t.Helper()
	js, err := yaml.YAMLToJSON([]byte(y))
	if err != nil {
		t.Fatal(err)
	}
	u := &unstructured.Unstructured{}
	if err := u.UnmarshalJSON(js); err != nil {
		t.Fatal(err)
	}
	return u
}

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func TestSourceEnforcesAndWritesStatus(t *testing.T) {
	good := obj(t, `
apiVersion: ambit.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {namespace: shop, name: allow-ui, generation: 3}
spec:
  rules:
  - from: {principals: ["cluster.local/ns/front/sa/ui"]}
`)
	bad := obj(t, `
apiVersion: ambit.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {namespace: bank, name: bad-selector, generation: 1}
spec:
  selector: {matchLabels: {"bad key!": x}}
`)
	client := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), map[schema.GroupVersionResource]string{
		AuthorizationPolicies: "AuthorizationPolicyList",
		InboundModes:          "InboundModeList",
	}, good, bad)
	e := policy.New(policy.Options{Logger: quiet()})
	s, err := New(Options{Client: client, Engine: e, Logger: quiet(), WriteStatus: true, Debounce: 5 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	wctx, wcancel := context.WithTimeout(ctx, 20*time.Second)
	defer wcancel()
	if err := s.WaitSynced(wctx); err != nil {
		t.Fatal(err)
	}

	if !e.Authorize(from("spiffe://cluster.local/ns/front/sa/ui")).Allow || e.Authorize(from("spiffe://cluster.local/ns/x/sa/y")).Allow {
		t.Fatal("cluster policy not enforced")
	}
	cond := func(gvr schema.GroupVersionResource, ns, name string) map[string]any {
		u, err := client.Resource(gvr).Namespace(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		conds, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
		for _, c := range conds {
			if m := c.(map[string]any); m["type"] == policy.ConditionAccepted {
				return m
			}
		}
		return nil
	}
	waitFor(t, "status written", func() bool {
		return cond(AuthorizationPolicies, "shop", "allow-ui") != nil && cond(AuthorizationPolicies, "bank", "bad-selector") != nil
	})
	if c := cond(AuthorizationPolicies, "shop", "allow-ui"); c["status"] != "True" || c["reason"] != policy.ReasonAccepted || c["observedGeneration"] != int64(3) {
		t.Errorf("good policy condition %v", c)
	}
	c := cond(AuthorizationPolicies, "bank", "bad-selector")
	if c["status"] != "False" || c["reason"] != policy.ReasonInvalid || !strings.Contains(c["message"].(string), "spec.selector.matchLabels[bad key!]") {
		t.Errorf("bad policy condition %v", c)
	}

	// The status writes come back as updates; they must not cause more
	// writes (every agent of the cluster would loop).
	writes := func() int {
		n := 0
		for _, a := range client.Actions() {
			if u, ok := a.(k8stesting.UpdateAction); ok && u.GetSubresource() == "status" {
				n++
			}
		}
		return n
	}
	w := writes()
	// A change: a STRICT mode for shop appears.
	mode := obj(t, `
apiVersion: ambit.dev/v1alpha1
kind: InboundMode
metadata: {namespace: shop, name: strict}
spec: {mode: STRICT}
`)
	if _, err := client.Resource(InboundModes).Namespace("shop").Create(ctx, mode, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "STRICT enforced", func() bool { return !e.Authorize(from("")).Allow && e.Authorize(from("")).Policy == "shop/strict" })
	waitFor(t, "mode status", func() bool { return cond(InboundModes, "shop", "strict") != nil })
	time.Sleep(100 * time.Millisecond) // let echoes of the writes arrive
	if got := writes(); got != w+1 {
		t.Errorf("status writes after one new object: %d, want %d", got, w+1)
	}

	// Deletion removes enforcement.
	if err := client.Resource(AuthorizationPolicies).Namespace("shop").Delete(ctx, "allow-ui", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "deleted policy gone", func() bool { return e.Authorize(from("spiffe://cluster.local/ns/x/sa/y")).Allow })
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
