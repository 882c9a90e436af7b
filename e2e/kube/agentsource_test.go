package kube

// The agent's Kubernetes source (node-agent/kube) against the real API
// server: the node field selector, the trimmed cluster-wide pod directory
// with real pod IPs, a Service with a named target port resolved through
// the real EndpointSlice controller, events, the redirection annotation
// (including the UID precondition a fake cannot check) and Kubernetes
// Events. Added by the owner of node-agent/kube.

import (
	"context"
	"net/netip"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	agentcluster "github.com/ambit-mesh/ambit/node-agent/cluster"
	agentkube "github.com/ambit-mesh/ambit/node-agent/kube"
)

func TestAgentKubeSource(t *testing.T) {
	c := need(t)
	track(t)
	// A label key of its own, so an installed Ambit agent never acts on
	// these pods and this case does not depend on the mesh cases.
	const key = "e2e.ambit.dev/mode"
	ns := c.namespace(t, "e2e-src", nil)
	optNS := c.namespace(t, "e2e-src-opt", nil)

	src, err := agentkube.New(agentkube.Config{
		Client: c.client, NodeName: node1, TrustDomain: "cluster.local",
		Decide: agentkube.LabelDecider(key), GetTimeout: 5 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var events []agentcluster.Event
	src.Subscribe(func(ev agentcluster.Event) {
		if ev.Namespace == ns || ev.Namespace == optNS {
			mu.Lock()
			events = append(events, ev)
			mu.Unlock()
		}
	})
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() { cancel(); src.Close() })
	src.Start(ctx)
	sctx, scancel := context.WithTimeout(ctx, time.Minute)
	defer scancel()
	if err := src.WaitSynced(sctx); err != nil {
		t.Fatal(err)
	}

	web := c.runPod(t, podSpec{ns: ns, name: "web", node: node1, sa: "default", labels: map[string]string{"app": "web"}})
	far := c.runPod(t, podSpec{ns: optNS, name: "far", node: node2, sa: "default", labels: map[string]string{"app": "far"}})
	webIP := netip.MustParseAddr(web.Status.PodIP)
	farIP := netip.MustParseAddr(far.Status.PodIP)

	// Directory: both pods, identities, not meshed (no annotation).
	poll(t, 30*time.Second, "both pods in the directory", func() (bool, error) {
		w, ok1 := src.WorkloadByIP(webIP)
		f, ok2 := src.WorkloadByIP(farIP)
		return ok1 && ok2 && w.Name == "web" && f.Name == "far", nil
	})
	w, _ := src.WorkloadByIP(webIP)
	if w.Identity != "spiffe://cluster.local/ns/"+ns+"/sa/default" || w.Meshed || w.UID != string(web.UID) || w.Labels["app"] != "web" {
		t.Fatalf("web in the directory: %+v", w)
	}
	// The field selector: only node-1's pods are local.
	for _, p := range src.LocalPods() {
		if p.NodeName != node1 {
			t.Fatalf("LocalPods has %s/%s of %s", p.Namespace, p.Name, p.NodeName)
		}
	}
	found := false
	for _, p := range src.LocalPods() {
		found = found || (p.Namespace == ns && p.Name == "web")
	}
	if !found {
		t.Fatal("LocalPods lacks web")
	}

	// A Service whose target port is named: the EndpointSlice controller
	// resolves "http" to 8080 from the pod's container port.
	svc, err := c.client.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": "web"},
			Ports:    []corev1.ServicePort{{Name: "web", Port: 80, TargetPort: intstr.FromString("http")}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	vip := netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIP), 80)
	want := []netip.AddrPort{netip.AddrPortFrom(webIP, 8080)}
	poll(t, 60*time.Second, "Service endpoints", func() (bool, error) {
		eps, ok := src.ServiceEndpoints(vip)
		return ok && reflect.DeepEqual(eps, want), nil
	})

	// Status: the annotation, then Meshed in the directory through the watch.
	webPod := agentcluster.Pod{Namespace: ns, Name: "web", UID: string(web.UID)}
	if err := src.SetRedirection(ctx, webPod, agentkube.StateEnabled); err != nil {
		t.Fatal(err)
	}
	poll(t, 30*time.Second, "web meshed", func() (bool, error) {
		w, ok := src.WorkloadByIP(webIP)
		return ok && w.Meshed, nil
	})
	// The UID in the patch is a precondition: a replaced pod of the same
	// name is never annotated with the old pod's state.
	stale := webPod
	stale.UID = "00000000-0000-0000-0000-000000000000"
	if err := src.SetRedirection(ctx, stale, agentkube.StateFailed); err == nil {
		t.Fatal("a patch with another pod's UID was accepted")
	}
	got, err := c.client.CoreV1().Pods(ns).Get(ctx, "web", metav1.GetOptions{})
	if err != nil || got.Annotations[agentkube.RedirectionAnnotation] != agentkube.StateEnabled {
		t.Fatalf("annotation after the stale patch: %v %v", got.Annotations, err)
	}

	// A Kubernetes Event with our reason.
	if err := src.Warn(ctx, webPod, "RedirectionFailed", "e2e: injected failure"); err != nil {
		t.Fatal(err)
	}
	poll(t, 30*time.Second, "the Warning event", func() (bool, error) {
		l, err := c.client.CoreV1().Events(ns).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=web,reason=RedirectionFailed"})
		return err == nil && len(l.Items) > 0 && l.Items[0].Type == corev1.EventTypeWarning, err
	})

	// Events: a label change on the local pod is one; the remote pod's is not.
	patch := []byte(`{"metadata":{"labels":{"` + key + `":"ambient"}}}`)
	for _, p := range []struct{ ns, name string }{{optNS, "far"}, {ns, "web"}} {
		if _, err := c.client.CoreV1().Pods(p.ns).Patch(ctx, p.name, "application/merge-patch+json", patch, metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	poll(t, 30*time.Second, "PodChanged for web", func() (bool, error) {
		mu.Lock()
		defer mu.Unlock()
		for _, ev := range events {
			if ev.Kind == agentcluster.PodChanged && ev.Name == "web" {
				return true, nil
			}
		}
		return false, nil
	})
	mu.Lock()
	for _, ev := range events {
		if ev.Name == "far" {
			t.Errorf("event for a pod of another node: %+v", ev)
		}
	}
	mu.Unlock()
	// The remote pod's opt-in label makes its namespace an opt-in one.
	poll(t, 30*time.Second, "opt-in namespaces", func() (bool, error) {
		return strings.Contains(strings.Join(src.OptInNamespaces(), ","), optNS), nil
	})

	// The direct GET fallback for a pod the cache may not hold yet.
	if _, ok, err := src.Pod(ctx, ns, "no-such-pod"); ok || err != nil {
		t.Fatalf("missing pod: %v %v", ok, err)
	}
	if p, ok, err := src.Pod(ctx, optNS, "far"); !ok || err != nil || p.NodeName != node2 {
		t.Fatalf("far: %+v %v %v", p, ok, err)
	}
}
