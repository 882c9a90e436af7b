package kube

import (
	"context"
	"errors"
	"fmt"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
)

// ErrAPIUnreachable wraps a failure to list the node's pods: nothing was
// cleared.
var ErrAPIUnreachable = errors.New("the Kubernetes API server could not be reached")

// ClearRedirections removes the ambit.dev/redirection annotation from
// every pod of node that carries it: `ambit-agent uninstall
// --unenroll-all`, once the redirection is out of the node's pods and no
// agent serves them. Left behind, "enabled" tells the agents of other
// nodes (kube.Directory's Meshed) to send these pods HBONE on port 15008,
// where nothing listens any more.
//
// It asks the API server, not the agent's pod records, which pods carry
// it: the records say what this node enrolled, the annotation is what
// other nodes read, and a second run after a failed one (the records then
// already unenrolled) must still find the pods it missed. It uses the
// agent's own client and RBAC (pods list and patch). Each patch carries the
// pod's UID, so a pod replaced under the same name is left alone; a pod
// deleted meanwhile is not an error. It returns the pods cleared; an
// unreachable API server is ErrAPIUnreachable.
func ClearRedirections(ctx context.Context, client kubernetes.Interface, node string) (cleared []string, err error) {
	if node == "" {
		return nil, errors.New("kube: ClearRedirections needs the node's name")
	}
	opts := metav1.ListOptions{FieldSelector: fields.OneTermEqualSelector("spec.nodeName", node).String(), Limit: 500}
	var failed []error
	for {
		list, err := client.CoreV1().Pods("").List(ctx, opts)
		if err != nil {
			return cleared, fmt.Errorf("%w: listing the pods of node %s to clear their %s annotation: %w", ErrAPIUnreachable, node, RedirectionAnnotation, err)
		}
		for i := range list.Items {
			p := &list.Items[i]
			if p.Spec.NodeName != node {
				continue // a server (or fake) that ignored the selector
			}
			if _, ok := p.Annotations[RedirectionAnnotation]; !ok {
				continue
			}
			name := p.Namespace + "/" + p.Name
			patch, err := RedirectionPatch(string(p.UID), "")
			if err != nil {
				return cleared, err
			}
			_, err = client.CoreV1().Pods(p.Namespace).Patch(ctx, p.Name, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: "ambit-agent-uninstall"}, "status")
			switch {
			case err == nil:
				cleared = append(cleared, name)
			case apierrors.IsNotFound(err):
				// Deleted since the list: nothing to clear.
			case apierrors.IsInvalid(err) || apierrors.IsConflict(err):
				// metadata.uid: a new pod of the same name; its own
				// record is not ours to change.
			default:
				failed = append(failed, fmt.Errorf("%s: %w", name, err))
			}
		}
		if list.Continue == "" {
			break
		}
		opts.Continue = list.Continue
	}
	if len(failed) > 0 {
		return cleared, fmt.Errorf("clearing %s on %d pods of node %s: %w", RedirectionAnnotation, len(failed), node, errors.Join(failed...))
	}
	return cleared, nil
}
