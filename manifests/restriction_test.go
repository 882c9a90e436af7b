package manifests

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	jsonpatch "gopkg.in/evanphx/json-patch.v4"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/meta/testrestmapper"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/version"
	"k8s.io/apiserver/pkg/admission"
	plugincel "k8s.io/apiserver/pkg/admission/plugin/cel"
	"k8s.io/apiserver/pkg/admission/plugin/policy/validating"
	"k8s.io/apiserver/pkg/admission/plugin/webhook/matchconditions"
	"k8s.io/apiserver/pkg/authentication/user"
	"k8s.io/apiserver/pkg/authorization/authorizer"
	"k8s.io/apiserver/pkg/cel/environment"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/kubernetes/scheme"

	"github.com/ambit-mesh/ambit/node-agent/kube"
)

// The agent's node restriction (base/agent/restriction.yaml) is run here
// by the API server's own ValidatingAdmissionPolicy admission plugin
// (k8s.io/apiserver, the code kube-apiserver runs: matchConstraints,
// matchConditions, variables, CEL cost limits, failurePolicy, the
// binding's Deny), fed the objects an API server would hand it for the
// agent's real patches. What it cannot run is the API server's storage
// (strategies, managed fields); e2e/kube TestAgentNodeRestriction does
// that against kube-apiserver.

const (
	policyName = "ambit-agent-node-restriction"
	nodeExtra  = "authentication.kubernetes.io/node-name"
)

// admitter is the admission plugin loaded with one policy and binding.
type admitter struct {
	plugin *validating.Plugin
	oi     admission.ObjectInterfaces
}

type allowAll struct{}

func (allowAll) Authorize(context.Context, authorizer.Attributes) (authorizer.Decision, string, error) {
	return authorizer.DecisionAllow, "", nil
}

func newAdmitter(t testing.TB, objs ...runtime.Object) *admitter {
	t.Helper()
	client := fake.NewSimpleClientset(objs...)
	f := informers.NewSharedInformerFactory(client, 0)
	p, err := validating.NewPlugin(nil)
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	t.Cleanup(func() { close(stop) })
	p.SetExternalKubeInformerFactory(f)
	p.SetExternalKubeClientSet(client)
	p.SetDynamicClient(dynamicfake.NewSimpleDynamicClient(runtime.NewScheme()))
	p.SetRESTMapper(testrestmapper.TestOnlyStaticRESTMapper(scheme.Scheme))
	p.SetDrainedNotification(stop)
	p.SetUnconditionalAuthorizer(allowAll{})
	p.SetAPIServerID("manifests-test")
	if err := p.ValidateInitialization(); err != nil {
		t.Fatal(err)
	}
	f.Start(stop)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for !p.WaitForReady() {
		if ctx.Err() != nil {
			t.Fatal("admission plugin never synced its policies")
		}
	}
	return &admitter{plugin: p, oi: admission.NewObjectInterfacesFromScheme(scheme.Scheme)}
}

// update is one UPDATE (a patch, at admission) as the API server hands it
// to validating admission.
func (a *admitter) update(t testing.TB, u user.Info, resource, sub string, old, obj runtime.Object) error {
	t.Helper()
	m, err := meta.Accessor(obj)
	if err != nil {
		t.Fatal(err)
	}
	gvr := schema.GroupVersionResource{Version: "v1", Resource: resource}
	gvk := corev1.SchemeGroupVersion.WithKind(map[string]string{"nodes": "Node", "pods": "Pod"}[resource])
	attrs := admission.NewAttributesRecord(obj, old, gvk, m.GetNamespace(), m.GetName(), gvr, sub,
		admission.Update, &metav1.UpdateOptions{}, false, u)
	return a.plugin.Validate(context.Background(), attrs, a.oi)
}

func agentUser(node string) user.Info {
	u := &user.DefaultInfo{
		Name:   "system:serviceaccount:ambit-system:ambit-agent",
		Groups: []string{"system:serviceaccounts", "system:serviceaccounts:ambit-system", "system:authenticated"},
		Extra: map[string][]string{
			"authentication.kubernetes.io/pod-name": {"ambit-agent-x7k2p"},
			"authentication.kubernetes.io/pod-uid":  {"5d1b6a52-0000-4000-8000-000000000001"},
		},
	}
	if node != "" {
		u.Extra[nodeExtra] = []string{node}
	}
	return u
}

// patched applies a JSON merge patch to obj the way the API server does
// before admission, and records the writer in managedFields (which the
// API server's field manager changes on every write).
func patched[T runtime.Object](t testing.TB, obj T, patch []byte) T {
	t.Helper()
	orig, err := json.Marshal(obj)
	if err != nil {
		t.Fatal(err)
	}
	out, err := jsonpatch.MergePatch(orig, patch)
	if err != nil {
		t.Fatal(err)
	}
	// A fresh object: Unmarshal into a copy would keep the map keys
	// the patch deleted.
	n := reflect.New(reflect.TypeOf(obj).Elem()).Interface().(T)
	if err := json.Unmarshal(out, n); err != nil {
		t.Fatal(err)
	}
	m, _ := meta.Accessor(n)
	m.SetManagedFields(append(m.GetManagedFields(), metav1.ManagedFieldsEntry{
		Manager: "ambit-agent", Operation: metav1.ManagedFieldsOperationUpdate, APIVersion: "v1",
		FieldsType: "FieldsV1", FieldsV1: &metav1.FieldsV1{Raw: []byte(`{"f:metadata":{}}`)},
	}))
	return n
}

func testNode(name string, taints ...corev1.Taint) *corev1.Node {
	n := &corev1.Node{
		TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "Node"},
		ObjectMeta: metav1.ObjectMeta{Name: name, ResourceVersion: "4711", UID: types.UID("uid-" + name),
			Labels:      map[string]string{"kubernetes.io/hostname": name, "topology.kubernetes.io/zone": "z1"},
			Annotations: map[string]string{"node.alpha.kubernetes.io/ttl": "0"},
			ManagedFields: []metav1.ManagedFieldsEntry{{Manager: "kubelet", Operation: metav1.ManagedFieldsOperationUpdate,
				APIVersion: "v1", FieldsType: "FieldsV1", FieldsV1: &metav1.FieldsV1{Raw: []byte(`{"f:spec":{}}`)}}}},
		Spec: corev1.NodeSpec{PodCIDR: "10.244.1.0/24", PodCIDRs: []string{"10.244.1.0/24"}, Taints: taints},
		Status: corev1.NodeStatus{
			Addresses:  []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "10.89.0.11"}},
			Conditions: []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue, LastHeartbeatTime: metav1.Unix(1700000000, 0)}},
		},
	}
	// A Node's status is most of its size (images): the expressions
	// compare it whole, within the CEL cost budget.
	for i := range 100 {
		n.Status.Images = append(n.Status.Images, corev1.ContainerImage{
			Names: []string{fmt.Sprintf("registry.example/team-%d/app@sha256:%064d", i, i), fmt.Sprintf("registry.example/team-%d/app:v%d", i, i)}, SizeBytes: 1 << 26})
	}
	return n
}

func testPod(ns, name, node string) *corev1.Pod {
	return &corev1.Pod{
		TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID("uid-" + name), ResourceVersion: "815",
			Labels:      map[string]string{"app": name},
			Annotations: map[string]string{"kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z"}},
		Spec: corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "app", Image: "registry.example/app:v1"}}},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.244.1.7", PodIPs: []corev1.PodIP{{IP: "10.244.1.7"}},
			Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionFalse}}},
	}
}

// taintPatch is node-agent/readytaint's patch: spec.taints replaced by
// the taints kept, guarded by the resourceVersion read.
func taintPatch(t testing.TB, n *corev1.Node, key string) []byte {
	t.Helper()
	keep := []corev1.Taint{}
	for _, x := range n.Spec.Taints {
		if x.Key != key {
			keep = append(keep, x)
		}
	}
	b, err := json.Marshal(map[string]any{
		"metadata": map[string]any{"resourceVersion": n.ResourceVersion},
		"spec":     map[string]any{"taints": keep},
	})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func redirection(t testing.TB, p *corev1.Pod, state string) []byte {
	t.Helper()
	b, err := kube.RedirectionPatch(string(p.UID), state)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// The policy and binding as a kustomization renders them.
func restriction(t testing.TB, r *rendered) (*admissionregistrationv1.ValidatingAdmissionPolicy, *admissionregistrationv1.ValidatingAdmissionPolicyBinding) {
	t.Helper()
	return get[*admissionregistrationv1.ValidatingAdmissionPolicy](t, r, "ValidatingAdmissionPolicy", "", policyName),
		get[*admissionregistrationv1.ValidatingAdmissionPolicyBinding](t, r, "ValidatingAdmissionPolicyBinding", "", policyName)
}

// stored is the policy as the API server stores it: with its defaults
// (k8s.io/kubernetes pkg/apis/admissionregistration/v1/defaults.go,
// v1.36), which the admission plugin relies on (a nil selector refuses
// every request).
func stored(pol *admissionregistrationv1.ValidatingAdmissionPolicy) *admissionregistrationv1.ValidatingAdmissionPolicy {
	pol = pol.DeepCopy()
	s := &pol.Spec
	if s.FailurePolicy == nil {
		s.FailurePolicy = ptrTo(admissionregistrationv1.Fail)
	}
	if s.MatchConstraints != nil {
		m := s.MatchConstraints
		if m.MatchPolicy == nil {
			m.MatchPolicy = ptrTo(admissionregistrationv1.Equivalent)
		}
		if m.NamespaceSelector == nil {
			m.NamespaceSelector = &metav1.LabelSelector{}
		}
		if m.ObjectSelector == nil {
			m.ObjectSelector = &metav1.LabelSelector{}
		}
		for i := range m.ResourceRules {
			if m.ResourceRules[i].Scope == nil {
				m.ResourceRules[i].Scope = ptrTo(admissionregistrationv1.AllScopes)
			}
		}
	}
	return pol
}

func ptrTo[T any](v T) *T { return &v }

// TestAgentRestrictionRendered: every install (base, kind, uninstall: the
// uninstaller clears annotations with the same account, so it keeps the
// policy) has the policy, bound with Deny, failing closed, for exactly
// the agent's service account.
func TestAgentRestrictionRendered(t *testing.T) {
	for _, dir := range []string{".", "overlays/kind", "overlays/uninstall"} {
		r := render(t, filepath.Join(root(t), dir))
		pol, b := restriction(t, r)
		if b.Spec.PolicyName != pol.Name || len(b.Spec.ValidationActions) != 1 || b.Spec.ValidationActions[0] != admissionregistrationv1.Deny {
			t.Errorf("%s: binding %+v does not enforce %s with Deny", dir, b.Spec, pol.Name)
		}
		if b.Spec.MatchResources != nil || b.Spec.ParamRef != nil {
			t.Errorf("%s: binding narrows the policy: %+v", dir, b.Spec)
		}
		if fp := pol.Spec.FailurePolicy; fp == nil || *fp != admissionregistrationv1.Fail {
			t.Errorf("%s: failurePolicy %v, want Fail", dir, fp)
		}
		ds := get[*appsv1.DaemonSet](t, r, "DaemonSet", ns, "ambit-agent")
		sa := get[*corev1.ServiceAccount](t, r, "ServiceAccount", ns, ds.Spec.Template.Spec.ServiceAccountName)
		want := fmt.Sprintf("request.userInfo.username == 'system:serviceaccount:%s:%s'", sa.Namespace, sa.Name)
		if len(pol.Spec.MatchConditions) != 1 || pol.Spec.MatchConditions[0].Expression != want {
			t.Errorf("%s: matchConditions %+v, want the agent's account only: %s", dir, pol.Spec.MatchConditions, want)
		}
	}
}

// TestAgentRestriction: what a stolen agent token may still do, and that
// every write of the real agent (its own patches, built by its own code)
// passes.
func TestAgentRestriction(t *testing.T) {
	r := render(t, root(t))
	pol, b := restriction(t, r)
	readyKey := agentConfig(t, r).ReadyTaint
	startup := corev1.Taint{Key: readyKey, Effect: corev1.TaintEffectNoSchedule}
	other := corev1.Taint{Key: "e2e.ambit.dev/other-controller", Value: "keep", Effect: corev1.TaintEffectPreferNoSchedule}
	unreachable := corev1.Taint{Key: "node.kubernetes.io/unreachable", Effect: corev1.TaintEffectNoExecute, TimeAdded: &metav1.Time{Time: time.Unix(1700000000, 0)}}
	nsObj := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}}
	a := newAdmitter(t, stored(pol), b, nsObj)

	agent1, agent2, unbound := agentUser("node-1"), agentUser("node-2"), agentUser("")
	admin := &user.DefaultInfo{Name: "kubernetes-admin", Groups: []string{"system:masters", "system:authenticated"}}
	node1 := testNode("node-1", startup, other)
	node1both := testNode("node-1", startup, corev1.Taint{Key: readyKey, Effect: corev1.TaintEffectNoExecute}, unreachable)
	node2 := testNode("node-2", startup, other)
	pod1, pod2, pending := testPod("shop", "web-1", "node-1"), testPod("shop", "web-2", "node-2"), testPod("shop", "web-3", "")
	terminating := testPod("shop", "web-4", "node-1")
	terminating.DeletionTimestamp, terminating.DeletionGracePeriodSeconds = &metav1.Time{Time: time.Unix(1700000100, 0)}, new(int64)
	annotated := testPod("shop", "web-5", "node-1")
	annotated.Annotations[kube.RedirectionAnnotation] = "enabled"
	// Removing the only annotation or taint leaves the field out of the
	// object the expressions see.
	onlyAnnotated := testPod("shop", "web-6", "node-1")
	onlyAnnotated.Annotations = map[string]string{kube.RedirectionAnnotation: "enabled"}
	onlyTaint := testNode("node-1", startup)
	// An ambit.dev/ annotation that no agent writes (a user's, or a later
	// component's).
	foreign := testPod("shop", "web-7", "node-1")
	foreign.Annotations["ambit.dev/owner-note"] = "set by the team"
	moved := testPod("shop", "web-8", "node-2")
	// Tokens whose node-name extra is not one name.
	twoNodes, emptyNode := agentUser("node-1"), agentUser("")
	twoNodes.(*user.DefaultInfo).Extra[nodeExtra] = []string{"node-1", "node-2"}
	emptyNode.(*user.DefaultInfo).Extra[nodeExtra] = []string{""}

	// statusOnly: what the pods/status strategy keeps of a new pod: its
	// metadata and status, never its spec.
	statusOnly := func(old, n *corev1.Pod) *corev1.Pod { n.Spec = old.Spec; return n }
	// nodeUpdate: the nodes strategy keeps the status as stored.
	nodeUpdate := func(old, n *corev1.Node) *corev1.Node { n.Status = old.Status; return n }
	withLabel := func(n *corev1.Node) *corev1.Node {
		n = n.DeepCopy()
		n.Labels["node-role.kubernetes.io/control-plane"] = ""
		return n
	}

	type tc struct {
		name     string
		u        user.Info
		resource string
		sub      string
		old, new runtime.Object
		deny     string // "" admitted, else a part of the refusal
	}
	cases := []tc{
		// Nodes: the agent's own patch (readytaint), and what it is not.
		{"own node: the startup taint removed, other taints kept", agent1, "nodes", "", node1, nodeUpdate(node1, patched(t, node1, taintPatch(t, node1, readyKey))), ""},
		{"own node: every effect of the startup taint removed", agent1, "nodes", "", node1both, nodeUpdate(node1both, patched(t, node1both, taintPatch(t, node1both, readyKey))), ""},
		{"own node: its only taint removed", agent1, "nodes", "", onlyTaint, nodeUpdate(onlyTaint, patched(t, onlyTaint, taintPatch(t, onlyTaint, readyKey))), ""},
		{"own node: a patch that changes nothing", agent1, "nodes", "", node1, patched(t, node1, []byte(`{"metadata":{"resourceVersion":"4711"}}`)), ""},
		{"other node: the startup taint removed", agent1, "nodes", "", node2, patched(t, node2, taintPatch(t, node2, readyKey)), "may not write Node node-2: only its own"},
		{"other node: tainted NoExecute", agent1, "nodes", "", node2, patched(t, node2, []byte(`{"spec":{"taints":[{"key":"evil","effect":"NoExecute"}]}}`)), "may not write Node node-2"},
		{"other node: relabelled", agent1, "nodes", "", node2, withLabel(node2), "may not write Node node-2"},
		{"own node: relabelled", agent1, "nodes", "", node1, withLabel(node1), "may not change labels"},
		{"own node: annotated", agent1, "nodes", "", node1, patched(t, node1, []byte(`{"metadata":{"annotations":{"ambit.dev/x":"y"}}}`)), "may not change annotations of Nodes"},
		{"own node: another taint removed", agent1, "nodes", "", node1both, patched(t, node1both, taintPatch(t, node1both, unreachable.Key)), "may only remove its startup taint"},
		{"own node: a taint added", agent1, "nodes", "", node1, patched(t, node1, []byte(`{"spec":{"taints":[{"key":"`+readyKey+`","effect":"NoSchedule"},{"key":"e2e.ambit.dev/other-controller","value":"keep","effect":"PreferNoSchedule"},{"key":"evil","effect":"NoExecute"}]}}`)), "may only remove its startup taint"},
		{"own node: startup taint's effect changed to NoExecute", agent1, "nodes", "", node1, patched(t, node1, []byte(`{"spec":{"taints":[{"key":"`+readyKey+`","effect":"NoExecute"},{"key":"e2e.ambit.dev/other-controller","value":"keep","effect":"PreferNoSchedule"}]}}`)), "may only remove its startup taint"},
		{"own node: cordoned", agent1, "nodes", "", node1, patched(t, node1, []byte(`{"spec":{"unschedulable":true}}`)), "nothing in a Node's spec but its startup taint"},
		{"own node: a token bound to no pod", unbound, "nodes", "", node1, patched(t, node1, taintPatch(t, node1, readyKey)), "this token names no node"},
		{"the agent of node-2 on its own node", agent2, "nodes", "", node2, patched(t, node2, taintPatch(t, node2, readyKey)), ""},
		{"own node: an ambit.dev/ taint added NoExecute", agent1, "nodes", "", node1, patched(t, node1, []byte(`{"spec":{"taints":[{"key":"`+readyKey+`","effect":"NoSchedule"},{"key":"e2e.ambit.dev/other-controller","value":"keep","effect":"PreferNoSchedule"},{"key":"ambit.dev/evict","effect":"NoExecute"}]}}`)), "may only remove its startup taint"},
		{"own node: startup taint removed and put back with a value and timeAdded", agent1, "nodes", "", node1, patched(t, node1, []byte(`{"spec":{"taints":[{"key":"`+readyKey+`","value":"x","effect":"NoSchedule","timeAdded":"2026-01-01T00:00:00Z"},{"key":"e2e.ambit.dev/other-controller","value":"keep","effect":"PreferNoSchedule"}]}}`)), "may only remove its startup taint"},
		{"own node: a token naming two nodes", twoNodes, "nodes", "", node1, patched(t, node1, taintPatch(t, node1, readyKey)), "this token names no node"},
		{"own node: a token naming the empty node", emptyNode, "nodes", "", node1, patched(t, node1, taintPatch(t, node1, readyKey)), "this token names no node"},
		{"not the agent: an admin taints any node", admin, "nodes", "", node2, patched(t, node2, []byte(`{"spec":{"taints":[{"key":"evil","effect":"NoExecute"}]}}`)), ""},

		// Pods: the annotation through pods/status (kube.SetRedirection,
		// statussync; ClearRedirections at uninstall).
		{"own-node pod: redirection enabled", agent1, "pods", "status", pod1, statusOnly(pod1, patched(t, pod1, redirection(t, pod1, "enabled"))), ""},
		{"own-node pod: redirection failed", agent1, "pods", "status", annotated, statusOnly(annotated, patched(t, annotated, redirection(t, annotated, "failed"))), ""},
		{"own-node pod: redirection removed (uninstall)", agent1, "pods", "status", annotated, statusOnly(annotated, patched(t, annotated, redirection(t, annotated, ""))), ""},
		{"own-node pod: its only annotation removed", agent1, "pods", "status", onlyAnnotated, statusOnly(onlyAnnotated, patched(t, onlyAnnotated, redirection(t, onlyAnnotated, ""))), ""},
		{"own-node pod terminating: redirection removed", agent1, "pods", "status", terminating, statusOnly(terminating, patched(t, terminating, redirection(t, terminating, ""))), ""},
		{"own-node pod: through pods itself (agents before session 11)", agent1, "pods", "", pod1, patched(t, pod1, redirection(t, pod1, "enabled")), ""},
		{"other-node pod: redirection enabled", agent1, "pods", "status", pod2, statusOnly(pod2, patched(t, pod2, redirection(t, pod2, "enabled"))), "may not write pod shop/web-2 of node node-2: only pods of its own node"},
		{"other-node pod: through pods itself", agent1, "pods", "", pod2, patched(t, pod2, redirection(t, pod2, "enabled")), "may not write pod shop/web-2"},
		{"unscheduled pod", agent1, "pods", "status", pending, statusOnly(pending, patched(t, pending, redirection(t, pending, "enabled"))), "of node (none)"},
		{"own-node pod: made Ready", agent1, "pods", "status", pod1, statusOnly(pod1, patched(t, pod1, []byte(`{"status":{"conditions":[{"type":"Ready","status":"True"}]}}`))), "may not change the spec or status of pods"},
		{"own-node pod: pod IP changed", agent1, "pods", "status", pod1, statusOnly(pod1, patched(t, pod1, []byte(`{"status":{"podIP":"10.244.9.9","podIPs":[{"ip":"10.244.9.9"}]}}`))), "may not change the spec or status of pods"},
		{"own-node pod: relabelled", agent1, "pods", "status", pod1, statusOnly(pod1, patched(t, pod1, []byte(`{"metadata":{"labels":{"app":"other"}}}`))), "may not change labels"},
		{"own-node pod: label added beside the annotation", agent1, "pods", "status", pod1, statusOnly(pod1, patched(t, pod1, []byte(`{"metadata":{"labels":{"x":"y"},"annotations":{"ambit.dev/redirection":"enabled"}}}`))), "may not change labels"},
		{"own-node pod: another annotation changed", agent1, "pods", "status", pod1, statusOnly(pod1, patched(t, pod1, []byte(`{"metadata":{"annotations":{"kubectl.kubernetes.io/restartedAt":null}}}`))), "only the ambit.dev/redirection annotation of pods"},
		// ambit.dev/redirection is the one annotation the agent writes
		// (kube.SetRedirection: enabled, pending, failed or removed). Every
		// agent of the cluster keeps all ambit.dev/ annotations of every pod
		// in its cache (kube.TrimPod), so other keys or values let one
		// stolen token fill every agent's memory (256 KiB a pod).
		{"own-node pod: another ambit.dev/ annotation added", agent1, "pods", "status", pod1, statusOnly(pod1, patched(t, pod1, []byte(`{"metadata":{"annotations":{"ambit.dev/identity":"spiffe://cluster.local/ns/kube-system/sa/admin"}}}`))), "only the ambit.dev/redirection annotation of pods"},
		{"own-node pod: redirection set to 200 KiB", agent1, "pods", "status", pod1, statusOnly(pod1, patched(t, pod1, []byte(`{"metadata":{"annotations":{"ambit.dev/redirection":"enabled`+strings.Repeat(" ", 200<<10)+`"}}}`))), "only the ambit.dev/redirection annotation of pods"},
		{"own-node pod: redirection set to a state no agent writes", agent1, "pods", "status", pod1, statusOnly(pod1, patched(t, pod1, redirection(t, pod1, "Enabled"))), "only the ambit.dev/redirection annotation of pods"},
		{"own-node pod: someone else's ambit.dev/ annotation removed", agent1, "pods", "status", foreign, statusOnly(foreign, patched(t, foreign, []byte(`{"metadata":{"annotations":{"ambit.dev/owner-note":null}}}`))), "only the ambit.dev/redirection annotation of pods"},
		{"own-node pod with someone else's ambit.dev/ annotation: redirection enabled", agent1, "pods", "status", foreign, statusOnly(foreign, patched(t, foreign, redirection(t, foreign, "enabled"))), ""},
		{"own-node pod: a finalizer added through pods", agent1, "pods", "", pod1, patched(t, pod1, []byte(`{"metadata":{"finalizers":["ambit.dev/hold"]}}`)), "may not change labels or other metadata"},
		{"pod of node-2 shown as moved to node-1", agent1, "pods", "", moved, patched(t, moved, []byte(`{"spec":{"nodeName":"node-1"},"metadata":{"annotations":{"ambit.dev/redirection":"enabled"}}}`)), "may not write pod shop/web-8 of node node-2"},
		{"own-node pod: image changed through pods", agent1, "pods", "", pod1, patched(t, pod1, []byte(`{"spec":{"containers":[{"name":"app","image":"evil"}]}}`)), "may not change the spec or status of pods"},
		{"own-node pod: a token bound to no pod", unbound, "pods", "status", pod1, statusOnly(pod1, patched(t, pod1, redirection(t, pod1, "enabled"))), "this token names no node"},
		{"not the agent: an admin changes any pod's status", admin, "pods", "status", pod2, patched(t, pod2, []byte(`{"status":{"conditions":[{"type":"Ready","status":"True"}]}}`)), ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := a.update(t, c.u, c.resource, c.sub, c.old, c.new)
			switch {
			case c.deny == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case c.deny == "":
			case err == nil:
				t.Fatalf("admitted, want refused with %q", c.deny)
			case !apierrors.IsForbidden(err):
				// Forbidden, not Invalid: the agent's status writer reads
				// Invalid as "the pod was replaced" and drops the write.
				t.Fatalf("refused as %v, want Forbidden: %v", apierrors.ReasonForError(err), err)
			case !strings.Contains(err.Error(), "ValidatingAdmissionPolicy '"+policyName+"'") || !strings.Contains(err.Error(), c.deny):
				t.Fatalf("refused with %q, want the policy's %q", err, c.deny)
			}
		})
	}
}

// TestAgentRestrictionCompilesForKubernetes130: we support Kubernetes ≥
// 1.30, whose API server checks a new policy's CEL against the
// libraries of 1.29 (its compatibility version): an expression using
// anything newer would make `kubectl apply -k manifests/` fail there.
func TestAgentRestrictionCompilesForKubernetes130(t *testing.T) {
	pol, _ := restriction(t, render(t, root(t)))
	c, err := plugincel.NewCompositedCompiler(environment.MustBaseEnvSet(version.MajorMinor(1, 29)))
	if err != nil {
		t.Fatal(err)
	}
	withAuthz := plugincel.OptionalVariableDeclarations{HasAuthorizer: true}
	check := func(what string, res plugincel.CompilationResult) {
		t.Helper()
		if res.Error != nil {
			t.Errorf("%s: %v", what, res.Error)
		}
	}
	for _, v := range pol.Spec.Variables {
		check("variable "+v.Name, c.CompileAndStoreVariable(&validating.Variable{Name: v.Name, Expression: v.Expression}, withAuthz, environment.NewExpressions))
	}
	for i := range pol.Spec.MatchConditions {
		check("matchCondition "+pol.Spec.MatchConditions[i].Name, c.CompileCELExpression((*matchconditions.MatchCondition)(&pol.Spec.MatchConditions[i]), withAuthz, environment.NewExpressions))
	}
	for i, v := range pol.Spec.Validations {
		check(fmt.Sprintf("validation %d", i), c.CompileCELExpression(&validating.ValidationCondition{Expression: v.Expression}, withAuthz, environment.NewExpressions))
		if v.MessageExpression != "" {
			check(fmt.Sprintf("validation %d messageExpression", i), c.CompileCELExpression(&validating.MessageExpressionCondition{MessageExpression: v.MessageExpression}, plugincel.OptionalVariableDeclarations{}, environment.NewExpressions))
		}
	}
}

// BenchmarkAgentRestriction: what the policy costs the API server per
// write of the agent (the admission plugin's evaluation, the Node with
// 100 images in its status, compared whole).
func BenchmarkAgentRestriction(b *testing.B) {
	r := render(b, root(b))
	pol, bind := restriction(b, r)
	a := newAdmitter(b, stored(pol), bind, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}})
	key := "ambit.dev/agent-not-ready"
	node := testNode("node-1", corev1.Taint{Key: key, Effect: corev1.TaintEffectNoSchedule})
	nodeNew := patched(b, node, taintPatch(b, node, key))
	pod := testPod("shop", "web-1", "node-1")
	podNew := patched(b, pod, redirection(b, pod, "enabled"))
	u := agentUser("node-1")
	for _, c := range []struct {
		name     string
		resource string
		sub      string
		old, new runtime.Object
	}{{"node taint removal", "nodes", "", node, nodeNew}, {"pod annotation", "pods", "status", pod, podNew}} {
		b.Run(c.name, func(b *testing.B) {
			for b.Loop() {
				if err := a.update(b, u, c.resource, c.sub, c.old, c.new); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
