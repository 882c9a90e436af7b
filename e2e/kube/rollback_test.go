package kube

import (
	"context"
	"encoding/json"
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// A bad agent rollout, rolled back in the middle of its surge, the way a
// platform engineer does it: `kubectl rollout undo ds/ambit-agent` makes
// the old pod current again and the DaemonSet controller deletes the
// surge pod. The surge agent had taken the plugin socket's path
// (/var/run/ambit/cni.sock); once it stops, the old agent must serve the
// path again, or every ADD of an ambient pod on the node fails (closed)
// until the old agent restarts (fixed in b68081e).

// badKeeperProbe is the misconfiguration: the next version's manifest
// gives the keeper container a readiness probe on a health port this
// image's keeper does not serve (a manifest applied with the wrong image
// tag). The agent container starts, takes the plugin socket, re-adopts
// the node's pods and is ready; the pod never is, so the rollout stalls
// on the first node with the old pod kept, until someone rolls back.
const badKeeperProbe = `{"spec":{"template":{"spec":{"containers":[{"name":"keeper",` +
	`"readinessProbe":{"httpGet":{"path":"/readyz","port":15029},"periodSeconds":2,"failureThreshold":1}}]}}}}`

// badRolloutRolledBack is TestAmbitMesh's BadRolloutRolledBack: the bad
// rollout, the rollback, then a new ambient pod on that node must start
// and talk over the mesh, and traffic of the enrolled pods must not fail
// meanwhile.
func (c *cluster) badRolloutRolledBack(t *testing.T, r *caseResult, mesh string, srv *corev1.Pod) {
	ctx := context.Background()
	dsc := c.client.AppsV1().DaemonSets(ambitNS)
	ds, err := dsc.Get(ctx, "ambit-agent", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	orig := ds.Spec.Template.DeepCopy()
	// Whatever happens below, later cases (TestUninstall) need the
	// agents of the template they were installed with.
	t.Cleanup(func() { c.restoreAgentTemplate(t, orig) })

	before := map[types.UID]bool{}
	for _, n := range []string{node1, node2} {
		before[c.agentPod(t, n).UID] = true
	}

	res := c.load(mesh, "client", srv.Status.PodIP+":9000", 75*time.Second)
	time.Sleep(2 * time.Second)
	t0 := time.Now()
	c.mustKubectl(t, "", "-n", ambitNS, "patch", "ds/ambit-agent", "-p", badKeeperProbe)

	// The controller picks the node; the case follows it.
	surge := c.surgePod(t, "the surge agent pod of the bad rollout", before)
	node := surge.Spec.NodeName
	old := c.agentPodOtherThan(t, node, surge.UID)
	t.Logf("bad rollout: surge pod %s beside %s on %s", surge.Name, old.Name, node)

	// Its agent runs and is ready (it took the socket as it became
	// ready); the pod is not.
	poll(t, 90*time.Second, "the surge pod's agent container to be ready", func() (bool, error) {
		p, err := c.client.CoreV1().Pods(ambitNS).Get(ctx, surge.Name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		surge = p
		st := agentStatus(p)
		return st != nil && st.Ready, nil
	})
	// The readiness window of the old pod (3 × 2 s) and then some: the
	// rollout must stall with the old agent kept and serving.
	time.Sleep(10 * time.Second)
	if p, err := c.client.CoreV1().Pods(ambitNS).Get(ctx, surge.Name, metav1.GetOptions{}); err != nil {
		t.Fatalf("surge pod %s: %v", surge.Name, err)
	} else if podReady(p) {
		t.Fatalf("surge pod %s became ready: the misconfiguration did not keep the rollout from finishing", p.Name)
	}
	if p, err := c.client.CoreV1().Pods(ambitNS).Get(ctx, old.Name, metav1.GetOptions{}); err != nil || p.DeletionTimestamp != nil || !podReady(p) {
		t.Fatalf("the old agent pod %s on %s was not kept ready while the surge pod was unready (err %v): the DaemonSet controller deletes an old pod that is not ready", old.Name, node, err)
	}
	if out, err := c.exec(mesh, "client", 20*time.Second, "/kecho", "client", srv.Status.PodIP+":9000", "stalled"); err != nil {
		t.Fatalf("while the bad rollout stalls: %v %s", err, out)
	}
	stalled := time.Since(t0)

	t1 := time.Now()
	c.mustKubectl(t, "", "-n", ambitNS, "rollout", "undo", "ds/ambit-agent")
	if out, err := c.kubectl(ctx, "", "-n", ambitNS, "rollout", "status", "ds/ambit-agent", "--timeout=120s"); err != nil {
		t.Fatalf("rollout after undo: %v %s", err, out)
	}
	poll(t, 90*time.Second, "the surge pod "+surge.Name+" to be gone", func() (bool, error) {
		_, err := c.client.CoreV1().Pods(ambitNS).Get(ctx, surge.Name, metav1.GetOptions{})
		return apierrors.IsNotFound(err), nil
	})
	if p := c.agentPod(t, node); p.UID != old.UID {
		t.Fatalf("after the rollback %s runs agent pod %s, want the old one %s kept", node, p.Name, old.Name)
	}
	rolledBack := time.Since(t1)

	// A new ambient pod on that node: its ADD goes to the socket path.
	t2 := time.Now()
	name := "after-rollback"
	if _, err := c.client.CoreV1().Pods(mesh).Create(ctx, kechoPod(podSpec{ns: mesh, name: name, node: node}), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	pod := c.waitRunningWithin(t, mesh, name, 30*time.Second, " after the rollback on "+node+" (ADDs fail while nobody serves the plugin socket)")
	started := time.Since(t2)
	c.waitAnnotation(t, mesh, name, "enabled", 30*time.Second)
	want := fmt.Sprintf("peer=%s pod=server node=%s got=after-rollback", pod.Status.PodIP, node2)
	if out, err := c.exec(mesh, name, 30*time.Second, "/kecho", "client", srv.Status.PodIP+":9000", "after-rollback"); err != nil || strings.TrimSpace(out) != want {
		t.Fatalf("new pod → server after the rollback: %v %q, want %q", err, out, want)
	}

	// The old agent took the path back (the surge agent had it).
	takeovers := c.agentMetric(t, old, "ambit_agent_plugin_socket_takeovers_total", map[string]string{"result": "ok"})
	if takeovers < 1 {
		t.Errorf("the old agent %s counts %v plugin socket takeovers, want ≥ 1: the surge agent never had the path, so the case proved nothing", old.Name, takeovers)
	}

	lr := <-res
	r.note("bad rollout stalled on %s (checked %.0fs), rolled back in %.1fs, socket takeovers %v, new ambient pod running %.1fs after; load: %d ok, %d failed",
		node, stalled.Seconds(), rolledBack.Seconds(), takeovers, started.Seconds(), lr.OK, lr.failed())
	if lr.Other < 0 {
		t.Fatalf("load did not run: %v", lr.Errors)
	}
	if lr.failed() != 0 {
		t.Errorf("traffic of the enrolled pods during the bad rollout and its rollback: %+v; want no failure", lr)
	}
}

// podReady says whether the pod's Ready condition is true.
func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// agentPodOtherThan is the agent pod on node that is not uid.
func (c *cluster) agentPodOtherThan(t *testing.T, node string, uid types.UID) *corev1.Pod {
	t.Helper()
	pods, err := c.client.CoreV1().Pods(ambitNS).List(context.Background(), metav1.ListOptions{
		LabelSelector: "app.kubernetes.io/name=ambit-agent", FieldSelector: "spec.nodeName=" + node})
	if err != nil {
		t.Fatal(err)
	}
	for i := range pods.Items {
		if pods.Items[i].UID != uid && pods.Items[i].DeletionTimestamp == nil {
			return &pods.Items[i]
		}
	}
	t.Fatalf("no other agent pod on %s than the surge pod", node)
	return nil
}

// agentMetric sums a metric's samples with the given labels from the
// agent pod's /metrics (through the API server's pod proxy). The health
// port is shared during a surge: call it when the pod's agent is alone.
func (c *cluster) agentMetric(t *testing.T, p *corev1.Pod, metric string, labels map[string]string) float64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	raw, err := c.client.CoreV1().Pods(ambitNS).ProxyGet("http", p.Name, healthPort(p), "/metrics", nil).DoRaw(ctx)
	if err != nil {
		t.Fatalf("metrics of %s through the API server: %v", p.Name, err)
	}
	return sumCounter(string(raw), metric, labels, "")
}

// restoreAgentTemplate puts the DaemonSet's pod template back to orig if
// it differs (a failed case left it half rolled), and waits for the
// agents on every node.
func (c *cluster) restoreAgentTemplate(t *testing.T, orig *corev1.PodTemplateSpec) {
	ctx := context.Background()
	ds, err := c.client.AppsV1().DaemonSets(ambitNS).Get(ctx, "ambit-agent", metav1.GetOptions{})
	if err != nil {
		t.Errorf("restoring the agent DaemonSet: %v", err)
		return
	}
	if !reflect.DeepEqual(ds.Spec.Template.Spec, orig.Spec) {
		patch, _ := json.Marshal(map[string]any{"spec": map[string]any{"template": orig}})
		if _, err := c.client.AppsV1().DaemonSets(ambitNS).Patch(ctx, "ambit-agent", types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
			t.Errorf("restoring the agent DaemonSet's template: %v", err)
			return
		}
		t.Logf("agent DaemonSet template restored")
	}
	time.Sleep(2 * time.Second) // let the controller see the new generation
	if err := c.waitDaemonSet(ctx, ambitNS, "ambit-agent", 3*time.Minute); err != nil {
		t.Errorf("after the bad rollout: %v", err)
	}
}

// surgePod waits for the surge pod of a rollout: the first agent pod,
// scheduled to a node, that is not one of before.
func (c *cluster) surgePod(t *testing.T, what string, before map[types.UID]bool) *corev1.Pod {
	t.Helper()
	var surge *corev1.Pod
	poll(t, 60*time.Second, what, func() (bool, error) {
		pods, err := c.client.CoreV1().Pods(ambitNS).List(context.Background(), metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=ambit-agent"})
		if err != nil {
			return false, nil
		}
		for i := range pods.Items {
			if !before[pods.Items[i].UID] && pods.Items[i].Spec.NodeName != "" {
				surge = &pods.Items[i]
				return true, nil
			}
		}
		return false, nil
	})
	return surge
}
