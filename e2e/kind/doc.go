// Package kind holds `make e2e-kind`: the e2e/kube cases on a kind cluster
// (kind-config.yaml: one control plane, two workers, Calico as the primary
// CNI instead of kindnet), driven by kind.sh, for machines with a
// container engine and kind. Nothing here needs a cluster to be tested:
// kind_test.go checks, in every `go test`, that the kind config says what
// the script and the cases assume, that manifests/overlays/kind runs the
// image `make image` builds without pulling it, that networkpolicy.yaml
// is valid and allows exactly HBONE and the probe source, that the
// script's Calico patch and tool checks behave, and that the script
// passes `bash -n` and shellcheck. See docs/e2e.md.
package kind
