package kube

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/util/retry"
)

// The agent's node restriction (manifests/base/agent/restriction.yaml).
const (
	restrictionPolicy = "ambit-agent-node-restriction"
	agentUser         = "system:serviceaccount:ambit-system:ambit-agent"
	nodeNameExtra     = "authentication.kubernetes.io/node-name"
	// An ambit.dev/ taint and annotation no agent manages: the policy lets
	// the agent remove the one but not write the other (only
	// ambit.dev/redirection; the real agent would race the test for its
	// own startup taint and that annotation; both are checked through it
	// below).
	restrictionTaint = "ambit.dev/e2e-restriction"
	restrictionAnnot = "ambit.dev/e2e-restriction"
)

// TestAgentNodeRestriction: the agent's token, stolen, reaches no further
// than its own node. Through the real API server, as the agent's service
// account (impersonated, with the node-name extra a pod-bound token
// carries): another Node's taints and labels, its own Node's labels,
// another node's pods and any pod's status conditions are refused with
// the policy's message; removing an ambit.dev/ taint from its own Node
// and ambit.dev/redirection on its own pods are allowed. The real
// agents, with their real tokens, still annotate their pods and remove
// the startup taint, never refused. Requests expected to be refused are
// dry runs (admission runs, nothing is stored), so a policy that failed
// to refuse leaves the cluster as it was.
func TestAgentNodeRestriction(t *testing.T) {
	c := need(t)
	r := track(t)
	c.installAmbit(t)
	ctx := context.Background()
	t.Cleanup(func() { c.setNodeTaints(t, node1, nil, []string{restrictionTaint, markerTaint, startupTaint}) })

	as := func(extra map[string][]string) kubernetes.Interface {
		cfg := rest.CopyConfig(c.rest)
		cfg.Impersonate = rest.ImpersonationConfig{UserName: agentUser,
			Groups: []string{"system:serviceaccounts", "system:serviceaccounts:ambit-system", "system:authenticated"},
			Extra:  extra}
		cl, err := kubernetes.NewForConfig(cfg)
		if err != nil {
			t.Fatal(err)
		}
		return cl
	}
	agent1 := as(map[string][]string{nodeNameExtra: {node1}})
	unbound := as(nil)
	dry := metav1.PatchOptions{DryRun: []string{metav1.DryRunAll}}
	patchNode := func(cl kubernetes.Interface, node, patch string, o metav1.PatchOptions) error {
		_, err := cl.CoreV1().Nodes().Patch(ctx, node, types.MergePatchType, []byte(patch), o)
		return err
	}
	patchPod := func(cl kubernetes.Interface, ns, pod, patch string, o metav1.PatchOptions, sub ...string) error {
		_, err := cl.CoreV1().Pods(ns).Patch(ctx, pod, types.MergePatchType, []byte(patch), o, sub...)
		return err
	}
	refused := func(what string, err error, want string) {
		t.Helper()
		switch {
		case err == nil:
			t.Errorf("%s: admitted, want refused by %s", what, restrictionPolicy)
		case !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), "ValidatingAdmissionPolicy '"+restrictionPolicy+"'") || !strings.Contains(err.Error(), want):
			t.Errorf("%s: %v; want Forbidden by %s: %q", what, err, restrictionPolicy, want)
		}
	}
	allowed := func(what string, err error) {
		t.Helper()
		if err != nil {
			t.Errorf("%s: %v, want allowed", what, err)
		}
	}

	// The API server picks up a new policy within a second or so of its
	// creation: wait for the first refusal rather than race it.
	taintNode2 := `{"spec":{"taints":[{"key":"e2e.ambit.dev/evil","effect":"NoExecute"}]}}`
	var err error
	pollOK(30*time.Second, func() (bool, error) {
		err = patchNode(agent1, node2, taintNode2, dry)
		return err != nil, nil
	})
	refused("agent of "+node1+": taint "+node2+" NoExecute", err, "may not write Node "+node2+": only its own")
	refused("agent of "+node1+": label "+node2, patchNode(agent1, node2, `{"metadata":{"labels":{"e2e.ambit.dev/evil":"x"}}}`, dry), "may not write Node "+node2)
	refused("agent of "+node1+": label its own Node", patchNode(agent1, node1, `{"metadata":{"labels":{"e2e.ambit.dev/evil":"x"}}}`, dry), "may not change labels")
	refused("agent of "+node1+": cordon its own Node", patchNode(agent1, node1, `{"spec":{"unschedulable":true}}`, dry), "nothing in a Node's spec but its startup taint")
	refused("token without a node: label its own Node", patchNode(unbound, node1, `{"metadata":{"labels":{"e2e.ambit.dev/evil":"x"}}}`, dry), "this token names no node")

	// Its own Node: an ambit.dev/ taint off (the agent's patch: the taints
	// kept, guarded by the resourceVersion read), another taint not.
	c.setNodeTaints(t, node1, []corev1.Taint{
		{Key: restrictionTaint, Effect: corev1.TaintEffectPreferNoSchedule},
		{Key: markerTaint, Value: "keep", Effect: corev1.TaintEffectPreferNoSchedule},
	}, nil)
	// Another controller's taint gone instead: refused.
	onlyOurs, _ := json.Marshal(map[string]any{"spec": map[string]any{"taints": []corev1.Taint{{Key: restrictionTaint, Effect: corev1.TaintEffectPreferNoSchedule}}}})
	refused("agent of "+node1+": remove "+markerTaint+" from its own Node", patchNode(agent1, node1, string(onlyOurs), dry), "may only remove its startup taint")
	// The agent's patch (node-agent/readytaint): the taints kept, guarded
	// by the resourceVersion read; re-read on a conflict (the kubelet
	// writes the Node too).
	allowed("agent of "+node1+": remove "+restrictionTaint+" from its own Node", retry.RetryOnConflict(retry.DefaultRetry, func() error {
		n, err := c.client.CoreV1().Nodes().Get(ctx, node1, metav1.GetOptions{})
		if err != nil {
			return err
		}
		keep := []corev1.Taint{}
		for _, x := range n.Spec.Taints {
			if x.Key != restrictionTaint {
				keep = append(keep, x)
			}
		}
		removal, _ := json.Marshal(map[string]any{"metadata": map[string]any{"resourceVersion": n.ResourceVersion}, "spec": map[string]any{"taints": keep}})
		return patchNode(agent1, node1, string(removal), metav1.PatchOptions{})
	}))
	if n, err := c.client.CoreV1().Nodes().Get(ctx, node1, metav1.GetOptions{}); err == nil && (hasTaint(n, restrictionTaint) || !hasTaint(n, markerTaint)) {
		t.Errorf("%s taints after the agent's allowed removal of %s: %+v", node1, restrictionTaint, n.Spec.Taints)
	}
	c.setNodeTaints(t, node1, nil, []string{markerTaint})

	// Pods: one meshed pod on each node. The real agents annotate them
	// (pods/status, their own tokens): never refused.
	mesh := c.namespace(t, "e2e-restrict", map[string]string{enrollLabel: "ambient"})
	p1 := c.runPod(t, podSpec{ns: mesh, name: "own", node: node1})
	p2 := c.runPod(t, podSpec{ns: mesh, name: "other", node: node2})
	c.waitAnnotation(t, mesh, p1.Name, "enabled", 60*time.Second)
	c.waitAnnotation(t, mesh, p2.Name, "enabled", 60*time.Second)

	annot := `{"metadata":{"annotations":{"` + restrictionAnnot + `":"x"}}}`
	refused("agent of "+node1+": annotate a pod of "+node2+" (pods/status)", patchPod(agent1, mesh, p2.Name, annot, dry, "status"),
		"may not write pod "+mesh+"/"+p2.Name+" of node "+node2)
	refused("agent of "+node1+": annotate a pod of "+node2+" (pods)", patchPod(agent1, mesh, p2.Name, annot, dry), "may not write pod")
	refused("agent of "+node1+": Ready=False on its own pod", patchPod(agent1, mesh, p1.Name,
		`{"status":{"conditions":[{"type":"Ready","status":"False","reason":"Evil"}]}}`, dry, "status"), "may not change the spec or status of pods")
	refused("agent of "+node1+": relabel its own pod", patchPod(agent1, mesh, p1.Name, `{"metadata":{"labels":{"e2e.ambit.dev/evil":"x"}}}`, dry, "status"), "may not change labels")
	refused("token without a node: annotate its own pod", patchPod(unbound, mesh, p1.Name, annot, dry, "status"), "this token names no node")
	refused("agent of "+node1+": another ambit.dev/ annotation on its own pod", patchPod(agent1, mesh, p1.Name, annot, dry, "status"),
		"only the ambit.dev/redirection annotation of pods")
	// The agent's own patch (kube.RedirectionPatch carries the pod's UID),
	// with the value the real agent keeps there: admission sees it even
	// though nothing changes in storage.
	own := `{"metadata":{"uid":"` + string(p1.UID) + `","annotations":{"` + redirectAnnot + `":"enabled"}}}`
	allowed("agent of "+node1+": ambit.dev/redirection on its own pod (pods/status)", patchPod(agent1, mesh, p1.Name, own, metav1.PatchOptions{}, "status"))
	if p, err := c.client.CoreV1().Pods(mesh).Get(ctx, p1.Name, metav1.GetOptions{}); err != nil || p.Annotations[redirectAnnot] != "enabled" {
		t.Errorf("own pod's %s after the allowed patch: %v %v", redirectAnnot, p.Annotations, err)
	}

	// The real agent and its startup taint: put back, removed again.
	t0 := time.Now()
	c.setNodeTaints(t, node1, []corev1.Taint{{Key: startupTaint, Effect: corev1.TaintEffectNoSchedule}}, nil)
	poll(t, 60*time.Second, "the agent on "+node1+" to remove "+startupTaint, func() (bool, error) {
		n, err := c.client.CoreV1().Nodes().Get(ctx, node1, metav1.GetOptions{})
		return err == nil && !hasTaint(n, startupTaint), nil
	})
	agent := c.agentPod(t, node1)
	for _, reason := range []string{"forbidden", "policy"} {
		if v := c.agentMetric(t, agent, "ambit_agent_ready_taint_errors_total", map[string]string{"reason": reason}); v != 0 {
			t.Errorf("the agent on %s was refused %v startup-taint removals (%s)", node1, v, reason)
		}
	}

	// kube-controller-manager type-checks the policy's CEL against the
	// real Node and Pod schemas: a field misspelt in an expression is a
	// warning there (and an error only when a request reaches it).
	vap := &admissionregistrationv1.ValidatingAdmissionPolicy{}
	if !pollOK(60*time.Second, func() (bool, error) {
		v, err := c.client.AdmissionregistrationV1().ValidatingAdmissionPolicies().Get(ctx, restrictionPolicy, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		vap = v
		return v.Status.ObservedGeneration == v.Generation && v.Status.TypeChecking != nil, nil
	}) {
		t.Errorf("%s not type-checked by kube-controller-manager within 60 s: status %+v", restrictionPolicy, vap.Status)
	} else if w := vap.Status.TypeChecking.ExpressionWarnings; len(w) != 0 {
		t.Errorf("%s: type-check warnings %+v", restrictionPolicy, w)
	}
	r.note("refusals carry the policy's message; real agents annotated their pods and removed the startup taint in %.1fs", time.Since(t0).Seconds())
}
