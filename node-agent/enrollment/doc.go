// Package enrollment decides whether a pod is enrolled in the mesh. The
// decision is a pure function of the pod, its namespace and the policy, so
// the CNI ADD path, live label changes and restart recovery all agree.
//
// Order of precedence (first match wins):
//  1. hostNetwork pods: never (they share the node's namespace);
//  2. terminal pods (Succeeded/Failed): never;
//  3. excluded namespaces (default kube-system): never;
//  4. pods Istio already serves: never, whatever their labels: an Istio
//     sidecar pod (annotation sidecar.istio.io/status) or one istio-cni
//     redirected (ambient.istio.io/redirection enabled or pending);
//  5. the pod label: "none" opts out, "ambient" opts in; the project's own
//     key (ambit.dev/dataplane-mode, which Ambit's own pods carry as
//     "none") opts out too when another key is configured;
//  6. the namespace label: "ambient" opts in;
//  7. otherwise: not enrolled.
package enrollment
