package kube

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"reflect"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/ambit-mesh/ambit/node-agent/enrollment"
)

func fullPod() *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: "web-1", Namespace: "shop", UID: "u-1", ResourceVersion: "42",
			Labels: map[string]string{"app": "web", DefaultLabelKey: "ambient"},
			Annotations: map[string]string{
				"kubectl.kubernetes.io/last-applied-configuration": strings.Repeat("x", 4096),
				RedirectionAnnotation:                              "enabled",
				"ambit.dev/bypass-inbound":                         "true",
			},
			ManagedFields:   []metav1.ManagedFieldsEntry{{Manager: "kubectl", Operation: "Apply"}},
			OwnerReferences: []metav1.OwnerReference{{Kind: "ReplicaSet", Name: "web-abc"}},
		},
		Spec: corev1.PodSpec{
			ServiceAccountName: "web-sa",
			NodeName:           "node-a",
			Containers: []corev1.Container{{
				Name: "app", Image: "registry/web:1", Env: []corev1.EnvVar{{Name: "A", Value: strings.Repeat("y", 1024)}},
			}},
		},
		Status: corev1.PodStatus{
			Phase:             corev1.PodRunning,
			PodIP:             "10.1.0.5",
			PodIPs:            []corev1.PodIP{{IP: "10.1.0.5"}, {IP: "fd00::5"}},
			Conditions:        []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}},
			ContainerStatuses: []corev1.ContainerStatus{{Name: "app", Ready: true, Image: "registry/web:1"}},
		},
	}
}

func TestTrimPodKeepsWhatTheMeshUsesAndDropsTheRest(t *testing.T) {
	full := fullPod()
	fullJSON, _ := json.Marshal(full)
	obj, err := TrimPod(full)
	if err != nil {
		t.Fatal(err)
	}
	tp := obj.(*corev1.Pod)
	if tp.ManagedFields != nil || tp.OwnerReferences != nil || len(tp.Spec.Containers) != 0 ||
		tp.Status.Conditions != nil || tp.Status.ContainerStatuses != nil {
		t.Fatalf("trim kept heavy fields: %+v", tp)
	}
	if _, ok := tp.Annotations["kubectl.kubernetes.io/last-applied-configuration"]; ok {
		t.Fatal("trim kept a foreign annotation")
	}
	if tp.Annotations[RedirectionAnnotation] != "enabled" {
		t.Fatalf("trim lost the redirection annotation: %v", tp.Annotations)
	}
	if len(tp.Annotations) != 1 {
		t.Fatalf("trim kept annotations nothing reads (every agent caches every pod): %v", tp.Annotations)
	}
	trimJSON, _ := json.Marshal(tp)
	if len(trimJSON)*4 > len(fullJSON) {
		t.Fatalf("trimmed pod is %d bytes, full %d: expected at least 4x smaller", len(trimJSON), len(fullJSON))
	}
	p := toPod(tp)
	want := []netip.Addr{netip.MustParseAddr("10.1.0.5"), netip.MustParseAddr("fd00::5")}
	if p.Name != "web-1" || p.Namespace != "shop" || p.UID != "u-1" || p.ServiceAccount != "web-sa" ||
		p.NodeName != "node-a" || p.Labels["app"] != "web" || p.Terminal || p.HostNetwork ||
		len(p.IPs) != 2 || p.IPs[0] != want[0] || p.IPs[1] != want[1] {
		t.Fatalf("toPod(trimmed) = %+v", p)
	}
	if tp.ResourceVersion != "42" {
		t.Fatal("trim must keep resourceVersion (informer bookkeeping)")
	}
}

func TestTrimPodEdgeCases(t *testing.T) {
	// Tombstones and other objects pass through untouched.
	tomb := cache.DeletedFinalStateUnknown{Key: "a/b"}
	if out, err := TrimPod(tomb); err != nil || out != any(tomb) {
		t.Fatalf("tombstone changed: %v %v", out, err)
	}
	// Old API servers set only podIP; default service account; terminal.
	p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "a", Namespace: "n"},
		Status: corev1.PodStatus{PodIP: "10.0.0.9", Phase: corev1.PodSucceeded}}
	obj, _ := TrimPod(p)
	cp := toPod(obj.(*corev1.Pod))
	if len(cp.IPs) != 1 || cp.IPs[0] != netip.MustParseAddr("10.0.0.9") || cp.ServiceAccount != "default" || !cp.Terminal {
		t.Fatalf("got %+v", cp)
	}
	// A garbage IP is skipped, not fatal.
	p.Status.PodIPs = []corev1.PodIP{{IP: "not-an-ip"}, {IP: "10.0.0.10"}}
	if ips := podIPs(p); len(ips) != 1 || ips[0] != netip.MustParseAddr("10.0.0.10") {
		t.Fatalf("podIPs = %v", ips)
	}
}

func FuzzTrimPod(f *testing.F) {
	b, _ := json.Marshal(fullPod())
	f.Add(b)
	f.Add([]byte(`{"status":{"podIPs":[{"ip":"::ffff:10.0.0.1"},{"ip":""}],"podIP":"x"}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var p corev1.Pod
		if json.Unmarshal(data, &p) != nil {
			return
		}
		obj, err := TrimPod(&p)
		if err != nil {
			t.Fatal(err)
		}
		cp := toPod(obj.(*corev1.Pod))
		for _, ip := range cp.IPs {
			if !ip.IsValid() || ip.Is4In6() {
				t.Fatalf("bad IP %v from %s", ip, data)
			}
		}
	})
}

// Anyone who may edit a pod may give it annotations of up to 256 KiB,
// under our prefix too; every agent caches every pod, so the trim keeps
// only the status annotation, and that only at a size a status has.
func TestTrimPodBoundsWhatAPodOwnerCanMakeEveryAgentHold(t *testing.T) {
	full := fullPod()
	for i := 0; i < 8; i++ {
		full.Annotations[fmt.Sprintf("ambit.dev/filler-%d", i)] = strings.Repeat("z", 200<<10)
	}
	full.Annotations[RedirectionAnnotation] = strings.Repeat("e", 200<<10)
	obj, err := TrimPod(full)
	if err != nil {
		t.Fatal(err)
	}
	tp := obj.(*corev1.Pod)
	v, ok := tp.Annotations[RedirectionAnnotation]
	if !ok || v != "" || len(tp.Annotations) != 1 {
		t.Fatalf("trimmed annotations hold %d keys, redirection present=%v with %d bytes; want only an empty redirection", len(tp.Annotations), ok, len(v))
	}
	b, _ := json.Marshal(tp)
	if len(b) > 4096 {
		t.Fatalf("trimmed pod is %d bytes", len(b))
	}
}

// The enrollment decision reads Istio's annotations (enrollment.Annotations):
// the trim keeps them, as bounded as ours, so a pod owner still cannot make
// every agent hold more than a few bytes per pod.
func TestTrimPodKeepsWhatTheEnrollmentDecisionReads(t *testing.T) {
	full := fullPod()
	full.Annotations[enrollment.IstioSidecarAnnotation] = `{"initContainers":["istio-init"],"containers":["istio-proxy"],"volumes":["istio-envoy"],"revision":"default"}`
	full.Annotations[enrollment.IstioRedirectionAnnotation] = "pending"
	full.Annotations["sidecar.istio.io/inject"] = "true"
	tp, _ := TrimPod(full)
	want := map[string]string{RedirectionAnnotation: "enabled", enrollment.IstioSidecarAnnotation: "", enrollment.IstioRedirectionAnnotation: "pending"}
	if got := tp.(*corev1.Pod).Annotations; !reflect.DeepEqual(got, want) {
		t.Fatalf("trimmed annotations %v, want %v", got, want)
	}
	for _, k := range enrollment.Annotations {
		full.Annotations[k] = strings.Repeat("i", 200<<10)
	}
	tp, _ = TrimPod(full)
	for _, k := range enrollment.Annotations {
		if v, ok := tp.(*corev1.Pod).Annotations[k]; !ok || v != "" {
			t.Fatalf("%s: present=%v with %d bytes; want present and empty", k, ok, len(v))
		}
	}
	if b, _ := json.Marshal(tp); len(b) > 4096 {
		t.Fatalf("trimmed pod is %d bytes", len(b))
	}
}
