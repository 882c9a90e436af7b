package kube

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/record"

	"github.com/ambit-mesh/ambit/node-agent/cluster"
)

var eventScheme = scheme.Scheme

// Redirection states of the contract.
const (
	StateEnabled = "enabled"
	StatePending = "pending"
	StateFailed  = "failed"
)

// SetRedirection sets (or with "" removes) the ambit.dev/redirection
// annotation with a JSON merge patch. The patch carries the pod's UID, so
// it fails instead of touching a same-named pod that replaced this one:
// the API server answers `metadata.uid: Invalid value: …: field is
// immutable` (checked against kube-apiserver v1.36.3). A write that would
// not change the cached value is skipped.
//
// The patch goes through the pods/status subresource, as istio-cni's
// does: the API server takes metadata from it but never the spec, so the
// agent's RBAC needs patch on pods/status only, not on pods (with which a
// stolen agent token could rewrite any pod's containers).
func (s *Source) SetRedirection(ctx context.Context, pod cluster.Pod, state string) error {
	switch state {
	case "", StateEnabled, StatePending, StateFailed:
	default:
		return fmt.Errorf("kube: redirection state %q is not enabled, pending, failed or empty", state)
	}
	if pod.Namespace == "" || pod.Name == "" {
		return errors.New("kube: SetRedirection needs the pod's namespace and name")
	}
	if cur, ok := s.cachedAnnotation(pod); ok && cur == state {
		return nil
	}
	patch, err := RedirectionPatch(pod.UID, state)
	if err != nil {
		return err
	}
	_, err = s.cfg.Client.CoreV1().Pods(pod.Namespace).Patch(ctx, pod.Name, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: s.cfg.Component}, "status")
	if err != nil {
		return fmt.Errorf("kube: annotate pod %s/%s %s=%q: %w", pod.Namespace, pod.Name, RedirectionAnnotation, state, err)
	}
	return nil
}

// cachedAnnotation returns the annotation as the local pod cache has it,
// when the cached pod is the same pod (UID).
func (s *Source) cachedAnnotation(pod cluster.Pod) (string, bool) {
	uid, state, found := s.Redirection(pod.Namespace, pod.Name)
	if !found || (pod.UID != "" && uid != pod.UID) {
		return "", false
	}
	return state, true
}

// Redirection returns the ambit.dev/redirection annotation of a pod of
// this node as the informer cache has it, and the pod's UID; found is
// false when the cache holds no such pod. No API call: the status
// reconcile (node-agent/statussync) compares with it on every pass.
func (s *Source) Redirection(namespace, name string) (uid, state string, found bool) {
	obj, ok, _ := s.localPods.GetStore().GetByKey(namespace + "/" + name)
	if !ok {
		return "", "", false
	}
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return "", "", false
	}
	return string(p.UID), p.Annotations[RedirectionAnnotation], true
}

// RedirectionPatch is the merge patch SetRedirection sends.
func RedirectionPatch(uid, state string) ([]byte, error) {
	var v any = state
	if state == "" {
		v = nil // null deletes the key in a merge patch
	}
	meta := map[string]any{"annotations": map[string]any{RedirectionAnnotation: v}}
	if uid != "" {
		meta["uid"] = uid
	}
	return json.Marshal(map[string]any{"metadata": meta})
}

// Warn records a Warning Event on the pod with reason (CamelCase, e.g.
// "RedirectionFailed") and message. Events are sent asynchronously and
// rate-limited by the recorder; this never blocks on the API server.
func (s *Source) Warn(_ context.Context, pod cluster.Pod, reason, message string) error {
	if s.recorder == nil {
		return errors.New("kube: Warn before Start: no event recorder")
	}
	if reason == "" {
		return errors.New("kube: Warn needs a reason")
	}
	s.recorder.Event(podRef(pod), corev1.EventTypeWarning, reason, message)
	return nil
}

// Normal records a Normal Event on the pod (e.g. "Enrolled").
func (s *Source) Normal(pod cluster.Pod, reason, message string) {
	if s.recorder != nil {
		s.recorder.Event(podRef(pod), corev1.EventTypeNormal, reason, message)
	}
}

func podRef(pod cluster.Pod) runtime.Object {
	return &corev1.ObjectReference{
		Kind: "Pod", APIVersion: "v1",
		Namespace: pod.Namespace, Name: pod.Name, UID: types.UID(pod.UID),
	}
}

// eventSink writes Events through the clientset (the typed sink of
// client-go, spelled out so the Source keeps only kubernetes.Interface).
type eventSink struct{ client kubernetes.Interface }

func (e *eventSink) Create(ev *corev1.Event) (*corev1.Event, error) {
	return e.client.CoreV1().Events(ev.Namespace).Create(context.Background(), ev, metav1.CreateOptions{})
}

func (e *eventSink) Update(ev *corev1.Event) (*corev1.Event, error) {
	return e.client.CoreV1().Events(ev.Namespace).Update(context.Background(), ev, metav1.UpdateOptions{})
}

func (e *eventSink) Patch(ev *corev1.Event, data []byte) (*corev1.Event, error) {
	return e.client.CoreV1().Events(ev.Namespace).Patch(context.Background(), ev.Name, types.StrategicMergePatchType, data, metav1.PatchOptions{})
}

var _ record.EventSink = (*eventSink)(nil)
