package kube

// Unit tests of the harness's external-cluster plumbing (AMBIT_E2E_*):
// they need no cluster and run in every `go test`.

import (
	"context"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes/fake"
)

func TestSumCounter(t *testing.T) {
	const text = `# HELP ambit_tunnel_connections_opened_total Connections established through the tunnel.
# TYPE ambit_tunnel_connections_opened_total counter
ambit_tunnel_connections_opened_total{direction="inbound",dst_identity="spiffe://cluster.local/ns/m/sa/default",mode="hbone",src_identity="spiffe://cluster.local/ns/m/sa/default"} 3
ambit_tunnel_connections_opened_total{direction="inbound",dst_identity="unknown",mode="hbone",src_identity="spiffe://cluster.local/ns/m/sa/default"} 2
ambit_tunnel_connections_opened_total{direction="inbound",dst_identity="unknown",mode="passthrough",src_identity="spiffe://cluster.local/ns/m/sa/default"} 40
ambit_tunnel_connections_opened_total{direction="outbound",dst_identity="unknown",mode="hbone",src_identity="spiffe://cluster.local/ns/m/sa/default"} 50
ambit_tunnel_connections_opened_total{direction="inbound",dst_identity="unknown",mode="hbone",src_identity="spiffe://cluster.local/ns/mm/sa/default"} 600
ambit_tunnel_connections_closed_total{direction="inbound",dst_identity="unknown",mode="hbone",src_identity="spiffe://cluster.local/ns/m/sa/default"} 7000
# TYPE ambit_agent_ready_taint_removals_total counter
ambit_agent_ready_taint_removals_total 1
ambit_agent_ready_taint_removals_total_x 80000
`
	got := sumCounter(text, "ambit_tunnel_connections_opened_total",
		map[string]string{"direction": "inbound", "mode": "hbone"}, "/ns/m/sa/default")
	if got != 5 {
		t.Fatalf("sum %v, want 5 (inbound hbone from ns m only)", got)
	}
	if got := sumCounter(text, "ambit_agent_ready_taint_removals_total", nil, ""); got != 1 {
		t.Fatalf("a metric without labels: %v, want 1", got)
	}
	if got := sumCounter(text, "ambit_agent_ready_taint_removals_total", map[string]string{"reason": "x"}, ""); got != 0 {
		t.Fatalf("a metric without labels matched labels it lacks: %v", got)
	}
	if got := sumCounter("garbage\n{}\nambit_tunnel_connections_opened_total{x} y\n", "ambit_tunnel_connections_opened_total", nil, ""); got != 0 {
		t.Fatalf("garbage summed to %v", got)
	}
}

func TestHealthPort(t *testing.T) {
	named := &corev1.Pod{Spec: corev1.PodSpec{Containers: []corev1.Container{{
		Ports:          []corev1.ContainerPort{{Name: "http-health", ContainerPort: 15099}},
		ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Port: intstr.FromString("http-health")}}},
	}}}}
	if p := healthPort(named); p != "15099" {
		t.Errorf("named probe port resolved to %q", p)
	}
	num := &corev1.Pod{Spec: corev1.PodSpec{Containers: []corev1.Container{{
		ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Port: intstr.FromInt32(15021)}}},
	}}}}
	if p := healthPort(num); p != "15021" {
		t.Errorf("numeric probe port %q", p)
	}
	if p := healthPort(&corev1.Pod{}); p != "" {
		t.Errorf("no probe gave %q", p)
	}
}

func TestPickNodes(t *testing.T) {
	node := func(name string, ready bool, taint corev1.TaintEffect) *corev1.Node {
		n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}
		st := corev1.ConditionFalse
		if ready {
			st = corev1.ConditionTrue
		}
		n.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: st}}
		if taint != "" {
			n.Spec.Taints = []corev1.Taint{{Key: "node-role.kubernetes.io/control-plane", Effect: taint}}
		}
		return n
	}
	// A kind cluster: the control plane is tainted, one worker not Ready yet.
	cs := fake.NewClientset(
		node("k-control-plane", true, corev1.TaintEffectNoSchedule),
		node("k-worker3", false, ""),
		node("k-worker2", true, ""),
		node("k-worker", true, ""),
	)
	ctx := context.Background()
	got, err := pickNodes(ctx, cs, "")
	if err != nil || !slices.Equal(got, []string{"k-worker", "k-worker2"}) {
		t.Errorf("auto: %v %v, want the two Ready untainted workers", got, err)
	}
	if got, err := pickNodes(ctx, cs, "k-worker2,k-control-plane"); err != nil || got[0] != "k-worker2" {
		t.Errorf("explicit: %v %v", got, err)
	}
	for list, want := range map[string]string{
		"k-worker":          "two distinct",
		"k-worker,k-worker": "two distinct",
		"k-worker,nope":     "does not have",
	} {
		if _, err := pickNodes(ctx, cs, list); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("AMBIT_E2E_NODES=%q: %v, want an error saying %q", list, err, want)
		}
	}
	one := fake.NewClientset(node("solo", true, ""))
	if _, err := pickNodes(ctx, one, ""); err == nil || !strings.Contains(err.Error(), "two Ready") {
		t.Errorf("one node: %v", err)
	}
}

func TestInNodeExternal(t *testing.T) {
	saved1, saved2 := node1, node2
	t.Cleanup(func() { node1, node2 = saved1, saved2 })
	node1, node2 = "k-worker", "k-worker2"
	// echo stands in for `docker exec`: the command line it would run.
	c := &cluster{external: true, nodeExec: []string{"echo", "exec", "{node}"}}
	out, err := c.inNode(2, "sh", "-c", "true")
	if err != nil || strings.TrimSpace(out) != "exec k-worker2 sh -c true" {
		t.Errorf("inNode(2): %q %v", out, err)
	}
	if _, err := c.inNode(3, "true"); err == nil {
		t.Error("node 3 accepted")
	}
	c.nodeExec = nil
	if _, err := c.inNode(1, "true"); err == nil || !strings.Contains(err.Error(), "AMBIT_E2E_NODE_EXEC") {
		t.Errorf("without AMBIT_E2E_NODE_EXEC: %v", err)
	}
}
