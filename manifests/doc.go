// Package manifests holds Ambit's Kubernetes manifests (kustomize:
// `kubectl apply -k manifests/`) and the test that renders them with the
// kustomize library and checks what a reviewer would: capabilities, host
// mounts, probes, RBAC verbs, and that the ConfigMap parses as the agent's
// configuration. There is no Go code to import here.
//
// Layout: base/ (namespace, agent DaemonSet + RBAC + ConfigMap, CA
// Deployment + Service + PDB, and ../crds), the top-level kustomization
// (the default install), overlays/kind and overlays/uninstall.
package manifests
