package kube

import (
	"context"
	"reflect"
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/ambit-mesh/ambit/node-agent/cluster"
	"github.com/ambit-mesh/ambit/node-agent/enrollment"
)

// TestIstioServedPodsThroughTheSource: the pods Istio serves are known by
// annotations the trim used to drop, so the decision enrolled them. Through
// the cache (ADD, live enrollment, adoption), the bounded GET (ADD of a pod
// the cache has not seen), the snapshot's opt-in namespaces (a sidecar pod
// opting in must not make the plugin fail its namespace's ADDs while the
// agent is down) and the events (istio-cni annotates a running pod).
func TestIstioServedPodsThroughTheSource(t *testing.T) {
	pol := enrollment.NewPolicy(DefaultLabelKey, []string{"kube-system"})
	decide := func(p cluster.Pod, ns cluster.Namespace) bool { return pol.Decide(p, &ns).Enroll }
	status := `{"initContainers":["istio-init"],"containers":["istio-proxy"],"volumes":["istio-envoy","istio-data"],"imagePullSecrets":null,"revision":"default"}`
	sidecar := func() map[string]string {
		return map[string]string{enrollment.IstioSidecarAnnotation: status, "kubectl.kubernetes.io/last-applied-configuration": strings.Repeat("x", 2048)}
	}
	client := fake.NewClientset(
		ns("mesh", map[string]string{DefaultLabelKey: "ambient"}),
		ns("moving", nil),
		pod("mesh", "sc", "", "node-a", []string{"10.1.0.1"}, map[string]string{"security.istio.io/tlsMode": "istio"}, sidecar()),
		pod("mesh", "zt", "", "node-a", []string{"10.1.0.2"}, nil, map[string]string{enrollment.IstioRedirectionAnnotation: "enabled"}),
		pod("mesh", "app", "", "node-a", []string{"10.1.0.3"}, nil, nil),
		// The only pod of its namespace that opts in is Istio's.
		pod("moving", "sc", "", "node-b", []string{"10.1.0.4"}, map[string]string{DefaultLabelKey: "ambient"}, sidecar()),
	)
	s, ev := startSource(t, client, Config{Decide: decide})
	ctx := context.Background()
	reason := func(ns, name string, live bool) string {
		t.Helper()
		get := s.Pod
		if live {
			get = s.LivePod
		}
		p, ok, err := get(ctx, ns, name)
		if err != nil || !ok {
			t.Fatalf("pod %s/%s: %v %v", ns, name, ok, err)
		}
		n, _ := s.Namespace(ns)
		return pol.Decide(p, &n).Reason
	}
	for _, live := range []bool{false, true} {
		for _, c := range []struct{ ns, name, want string }{
			{"mesh", "sc", enrollment.ReasonIstioSidecar},
			{"mesh", "zt", enrollment.ReasonIstioAmbient},
			{"mesh", "app", enrollment.ReasonNamespaceOptIn},
			{"moving", "sc", enrollment.ReasonIstioSidecar},
		} {
			if got := reason(c.ns, c.name, live); got != c.want {
				t.Errorf("%s/%s (live GET %v): reason %s, want %s", c.ns, c.name, live, got, c.want)
			}
		}
	}
	if got := s.OptInNamespaces(); len(got) != 0 {
		t.Errorf("OptInNamespaces = %v: a sidecar pod that opts in is not enrolled, its namespace's new pods need no agent", got)
	}
	if got := s.AmbientNamespaces(); !reflect.DeepEqual(got, []string{"mesh"}) {
		t.Errorf("AmbientNamespaces = %v", got)
	}
	if s.WouldEnroll(cluster.Pod{Namespace: "mesh", Name: "x", Annotations: map[string]string{enrollment.IstioSidecarAnnotation: ""}}) {
		t.Error("WouldEnroll enrolls a sidecar pod")
	}

	// istio-cni takes a running pod (a shared enrollLabel): an event, and
	// the decision flips, so the live reconcile gives it up.
	app, err := client.CoreV1().Pods("mesh").Get(ctx, "app", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	app.Annotations = map[string]string{enrollment.IstioRedirectionAnnotation: "enabled"}
	if _, err := client.CoreV1().Pods("mesh").Update(ctx, app, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "event for istio-cni's annotation", func() bool { return len(ev.list()) > 0 })
	if got := ev.list(); got[0] != (cluster.Event{Kind: cluster.PodChanged, Namespace: "mesh", Name: "app", UID: "uid-app"}) {
		t.Fatalf("events %+v", got)
	}
	if got := reason("mesh", "app", false); got != enrollment.ReasonIstioAmbient {
		t.Fatalf("after istio-cni's annotation: reason %s", got)
	}
}
