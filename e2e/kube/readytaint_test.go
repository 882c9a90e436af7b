package kube

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
)

// The startup taint (config readyTaint; node-agent/readytaint): nodes
// registered with it take no pod before their agent can enroll it, and the
// agent takes it off once its CNI entry is written and its socket serves.
const (
	startupTaint = "ambit.dev/agent-not-ready"
	// markerTaint is another controller's taint on the same node, which
	// the agent must leave alone. PreferNoSchedule: it steers nothing
	// away from the node.
	markerTaint = "e2e.ambit.dev/other-controller"
)

// TestStartupTaint: (1) the taint put back on a node whose agent runs is
// removed again, another controller's taint staying; (2) a node without
// an agent (the DaemonSet kept off it, as on a node that just joined),
// tainted: an ambient pod pinned to it stays unscheduled; once the agent
// is let back on the node it removes the taint, and the pod is scheduled,
// starts and is enrolled at its CNI ADD (not live, later).
func TestStartupTaint(t *testing.T) {
	c := need(t)
	r := track(t)
	c.installAmbit(t)
	ctx := context.Background()
	t.Cleanup(func() { c.setNodeTaints(t, node2, nil, []string{startupTaint, markerTaint}) })

	t.Run("PutBackWhileReady", func(t *testing.T) {
		t0 := time.Now()
		c.setNodeTaints(t, node2, []corev1.Taint{
			{Key: startupTaint, Effect: corev1.TaintEffectNoSchedule},
			{Key: markerTaint, Value: "keep", Effect: corev1.TaintEffectPreferNoSchedule},
		}, nil)
		poll(t, 60*time.Second, "the agent on "+node2+" to remove "+startupTaint, func() (bool, error) {
			n, err := c.client.CoreV1().Nodes().Get(ctx, node2, metav1.GetOptions{})
			if err != nil {
				return false, nil
			}
			return !hasTaint(n, startupTaint), nil
		})
		took := time.Since(t0)
		n, err := c.client.CoreV1().Nodes().Get(ctx, node2, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if !slices.ContainsFunc(n.Spec.Taints, func(x corev1.Taint) bool {
			return x.Key == markerTaint && x.Value == "keep" && x.Effect == corev1.TaintEffectPreferNoSchedule
		}) {
			t.Errorf("another controller's taint %s went with the startup taint: %+v", markerTaint, n.Spec.Taints)
		}
		agent := c.agentPod(t, node2)
		if v := c.agentMetric(t, agent, "ambit_agent_ready_taint_removals_total", nil); v < 1 {
			t.Errorf("ambit_agent_ready_taint_removals_total on %s = %v, want ≥ 1", agent.Name, v)
		}
		r.note("put back: removed in %.1fs, other taint kept", took.Seconds())
		c.setNodeTaints(t, node2, nil, []string{markerTaint})
	})

	t.Run("NodeWithoutAgent", func(t *testing.T) {
		dsc := c.client.AppsV1().DaemonSets(ambitNS)
		ds, err := dsc.Get(ctx, "ambit-agent", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		orig := ds.Spec.Template.DeepCopy()
		// Whatever happens below, later cases need the agents as
		// installed, on every node.
		t.Cleanup(func() {
			c.putAgentTemplate(t, orig)
			time.Sleep(2 * time.Second) // let the controller see the new generation
			if err := c.waitDaemonSet(ctx, ambitNS, "ambit-agent", 4*time.Minute); err != nil {
				t.Errorf("agents back on every node: %v", err)
			}
		})

		// Keep the agent off node2: its pod goes, as on a node whose
		// agent has not started yet (the CNI entry the last agent wrote
		// stays; with no agent ambit-cni fails ambient pods closed).
		t0 := time.Now()
		tmpl := orig.DeepCopy()
		tmpl.Spec.Affinity = &corev1.Affinity{NodeAffinity: &corev1.NodeAffinity{
			RequiredDuringSchedulingIgnoredDuringExecution: &corev1.NodeSelector{NodeSelectorTerms: []corev1.NodeSelectorTerm{{
				MatchExpressions: []corev1.NodeSelectorRequirement{{Key: "kubernetes.io/hostname", Operator: corev1.NodeSelectorOpNotIn, Values: []string{node2}}},
			}}},
		}}
		c.putAgentTemplate(t, tmpl)
		poll(t, 3*time.Minute, "no agent pod left on "+node2, func() (bool, error) {
			pods, err := c.client.CoreV1().Pods(ambitNS).List(ctx, metav1.ListOptions{
				LabelSelector: "app.kubernetes.io/name=ambit-agent", FieldSelector: "spec.nodeName=" + node2})
			return err == nil && len(pods.Items) == 0, nil
		})
		r.note("agent off %s in %.1fs", node2, time.Since(t0).Seconds())

		c.setNodeTaints(t, node2, []corev1.Taint{{Key: startupTaint, Effect: corev1.TaintEffectNoSchedule}}, nil)
		mesh := c.namespace(t, "e2e-taint", map[string]string{enrollLabel: "ambient"})
		if _, err := c.client.CoreV1().Pods(mesh).Create(ctx, kechoPod(podSpec{ns: mesh, name: "late", node: node2}), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		// The scheduler has looked at it and turned it away...
		var why string
		poll(t, 60*time.Second, "the scheduler to turn the pod away from the tainted node", func() (bool, error) {
			p, err := c.client.CoreV1().Pods(mesh).Get(ctx, "late", metav1.GetOptions{})
			if err != nil {
				return false, nil
			}
			if p.Spec.NodeName != "" {
				return false, fmt.Errorf("pod scheduled to %s while %s carries %s and runs no agent", p.Spec.NodeName, node2, startupTaint)
			}
			for _, cd := range p.Status.Conditions {
				if cd.Type == corev1.PodScheduled && cd.Status == corev1.ConditionFalse {
					why = cd.Message
					return true, nil
				}
			}
			return false, nil
		})
		// v1.36 does not name the taint: "1 node(s) had untolerated
		// taint(s)"; node2 carries no other NoSchedule taint.
		if !strings.Contains(why, "untolerated taint") {
			t.Errorf("pod unschedulable for %q, want an untolerated taint", why)
		}
		// ...and keeps it away while no agent runs there.
		time.Sleep(5 * time.Second)
		if p, err := c.client.CoreV1().Pods(mesh).Get(ctx, "late", metav1.GetOptions{}); err != nil || p.Spec.NodeName != "" {
			t.Fatalf("pod scheduled (%v) to a tainted node without its agent", err)
		}

		// The agent comes to node2, as to a node that joined.
		t1 := time.Now()
		c.putAgentTemplate(t, orig)
		var removed time.Time
		poll(t, 3*time.Minute, "the new agent on "+node2+" to remove "+startupTaint, func() (bool, error) {
			n, err := c.client.CoreV1().Nodes().Get(ctx, node2, metav1.GetOptions{})
			if err != nil || hasTaint(n, startupTaint) {
				return false, nil
			}
			removed = time.Now()
			return true, nil
		})
		agent := c.agentPod(t, node2)
		pod := c.waitRunningWithin(t, mesh, "late", 2*time.Minute, " after the startup taint was removed")
		c.waitAnnotation(t, mesh, "late", "enabled", 60*time.Second)

		// Scheduled only after the agent's pod existed, and enrolled by
		// ambit-cni at its ADD: this agent counted an ADD enrollment.
		var scheduled time.Time
		for _, cd := range pod.Status.Conditions {
			if cd.Type == corev1.PodScheduled && cd.Status == corev1.ConditionTrue {
				scheduled = cd.LastTransitionTime.Time
			}
		}
		if scheduled.Before(agent.CreationTimestamp.Time) {
			t.Errorf("pod scheduled at %v, before the agent pod %s was created at %v", scheduled, agent.Name, agent.CreationTimestamp.Time)
		}
		add := c.agentMetric(t, agent, "ambit_agent_enrollment_duration_seconds_count", map[string]string{"path": "add"})
		live := c.agentMetric(t, agent, "ambit_agent_enrollment_duration_seconds_count", map[string]string{"path": "live"})
		if add < 1 {
			t.Errorf("the agent on %s enrolled %v pods at ADD (%v live), want the new pod at its ADD", node2, add, live)
		}
		if v := c.agentMetric(t, agent, "ambit_agent_ready_taint_removals_total", nil); v != 1 {
			t.Errorf("ambit_agent_ready_taint_removals_total on %s = %v, want 1", agent.Name, v)
		}
		logs, _ := c.kubectl(ctx, "", "-n", ambitNS, "logs", agent.Name, "-c", "agent")
		if !strings.Contains(logs, "removed the startup taint") {
			t.Errorf("the agent's log has no line for the removal")
		}
		r.note("new agent: taint removed %.1fs after the agent was let on the node (%.0fs after its pod was created), pod enrolled at ADD (%v add, %v live)",
			removed.Sub(t1).Seconds(), removed.Sub(agent.CreationTimestamp.Time).Seconds(), add, live)
	})
}

func hasTaint(n *corev1.Node, key string) bool {
	return slices.ContainsFunc(n.Spec.Taints, func(x corev1.Taint) bool { return x.Key == key })
}

// setNodeTaints adds taints to a Node and removes the ones with the keys
// in drop, keeping every other taint (retried on conflict: the kubelet
// and the agent write the Node too).
func (c *cluster) setNodeTaints(t *testing.T, node string, add []corev1.Taint, drop []string) {
	t.Helper()
	ctx := context.Background()
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		n, err := c.client.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
		if err != nil {
			return err
		}
		var ts []corev1.Taint
		for _, x := range n.Spec.Taints {
			if !slices.Contains(drop, x.Key) && !slices.ContainsFunc(add, func(a corev1.Taint) bool { return a.Key == x.Key && a.Effect == x.Effect }) {
				ts = append(ts, x)
			}
		}
		ts = append(ts, add...)
		if slices.EqualFunc(ts, n.Spec.Taints, func(a, b corev1.Taint) bool { return a.MatchTaint(&b) && a.Value == b.Value }) {
			return nil
		}
		n.Spec.Taints = ts
		_, err = c.client.CoreV1().Nodes().Update(ctx, n, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		t.Errorf("taints of %s: %v", node, err)
	}
}

// putAgentTemplate makes the agent DaemonSet's pod template exactly tmpl
// (a field tmpl lacks is removed, which a merge patch would keep), if it
// differs. It does not wait for the rollout.
func (c *cluster) putAgentTemplate(t *testing.T, tmpl *corev1.PodTemplateSpec) {
	t.Helper()
	ctx := context.Background()
	dsc := c.client.AppsV1().DaemonSets(ambitNS)
	changed := false
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		ds, err := dsc.Get(ctx, "ambit-agent", metav1.GetOptions{})
		if err != nil {
			return err
		}
		a, _ := json.Marshal(ds.Spec.Template)
		b, _ := json.Marshal(tmpl)
		if string(a) == string(b) {
			return nil
		}
		ds.Spec.Template = *tmpl.DeepCopy()
		_, err = dsc.Update(ctx, ds, metav1.UpdateOptions{})
		changed = err == nil
		return err
	})
	if err != nil {
		t.Errorf("agent DaemonSet template: %v", err)
		return
	}
	if changed {
		t.Logf("agent DaemonSet template replaced (affinity %v)", tmpl.Spec.Affinity != nil)
	}
}
