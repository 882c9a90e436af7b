package main

import (
	"fmt"
	"strings"

	"github.com/containernetworking/cni/pkg/types"
)

// podArgs are the Kubernetes identity the runtime passes in CNI_ARGS.
type podArgs struct {
	Namespace   string
	Name        string
	UID         string
	InfraID     string
	fromKubelet bool // any K8S_POD_* key present
	// nameOnly: K8S_POD_NAME without K8S_POD_NAMESPACE, as podman sends
	// (IgnoreUnknown=1;K8S_POD_NAME=<container name>). Such a runtime has
	// no namespaces; the conflist's defaultNamespace gives it one.
	nameOnly bool
}

const maxCNIArgs = 16 << 10

// parseCNIArgs reads CNI_ARGS ("K=V;K=V"). Unknown keys are ignored (the
// runtime adds its own, like IgnoreUnknown); malformed pairs and bad
// values of the keys we use are errors naming the key.
func parseCNIArgs(s string) (podArgs, error) {
	var a podArgs
	if len(s) > maxCNIArgs {
		return a, argsError("CNI_ARGS is %d bytes, more than %d", len(s), maxCNIArgs)
	}
	if s == "" {
		return a, nil
	}
	seen := map[string]bool{}
	for _, pair := range strings.Split(s, ";") {
		if pair == "" {
			continue
		}
		k, v, ok := strings.Cut(pair, "=")
		if !ok || k == "" {
			return a, argsError("CNI_ARGS entry %q is not KEY=VALUE", pair)
		}
		var dst *string
		switch k {
		case "K8S_POD_NAMESPACE":
			dst = &a.Namespace
		case "K8S_POD_NAME":
			dst = &a.Name
		case "K8S_POD_UID":
			dst = &a.UID
		case "K8S_POD_INFRA_CONTAINER_ID":
			dst = &a.InfraID
		default:
			continue
		}
		if seen[k] {
			return a, argsError("CNI_ARGS sets %s twice", k)
		}
		seen[k] = true
		if len(v) > 253 || strings.ContainsAny(v, "/\x00\n") {
			return a, argsError("CNI_ARGS %s=%q is not a valid Kubernetes name", k, v)
		}
		*dst = v
		a.fromKubelet = true
	}
	if a.Name != "" && !seen["K8S_POD_NAMESPACE"] {
		a.nameOnly, a.fromKubelet = true, false
		return a, nil
	}
	if a.fromKubelet && (a.Namespace == "" || a.Name == "") {
		return a, argsError("CNI_ARGS carries Kubernetes keys but K8S_POD_NAMESPACE or K8S_POD_NAME is empty")
	}
	return a, nil
}

func argsError(format string, a ...any) error {
	return types.NewError(types.ErrInvalidEnvironmentVariables, fmt.Sprintf(format, a...), "")
}
