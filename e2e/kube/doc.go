// Package kube is the real-Kubernetes end-to-end suite: a two-node cluster
// on one machine (each node a network namespace and a mount namespace with
// its own containerd, kubelet and kube-proxy; one control plane on the
// host), brought up by cluster.sh from binaries that hack/kube/build.sh
// builds from the Go module proxy and caches outside the repository.
//
// TestMain builds (when the cache is cold) and brings the cluster up once,
// runs the cases, prints a short report (each case, pass/fail, key numbers)
// and tears everything down. Set AMBIT_K8S_KEEP=1 to keep the cluster for
// poking at it afterwards (`eval $(e2e/kube/cluster.sh env)`), and
// `e2e/kube/cluster.sh down` to remove it.
//
// The cases need root (network namespaces, mounts, cgroups); `make test`
// (CI) and `make e2e-kube` run them. Without root, under -short, or with
// AMBIT_E2E_KUBE=0 (a quick local `go test ./...`) they skip loudly. See
// docs/e2e.md.
package kube
