package kube

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/ambit-mesh/ambit/internal/testenv"
)

// manifestsDir is manifests/ of the repository, what users apply.
// AMBIT_MANIFESTS_DIR points the suite at a copy, to try a candidate fix
// without touching the repository.
func manifestsDir() string {
	return envOr("AMBIT_MANIFESTS_DIR", filepath.Join(testenv.RepoRoot(), "manifests"))
}

// ensureNamespace creates ns if it is missing (server-side dry-run of
// namespaced objects needs their namespace to exist, as it would on a
// real cluster where someone ran `kubectl create ns` or a first apply).
func (c *cluster) ensureNamespace(t *testing.T, ns string) {
	t.Helper()
	_, err := c.client.CoreV1().Namespaces().Create(context.Background(),
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
}

// TestManifestsServerDryRun: the install a user runs, `kubectl apply -k
// manifests/`, is accepted by a real API server's validation and admission
// (server-side dry run: schemas, RBAC escalation checks, defaulting) for
// the default install and every overlay.
func TestManifestsServerDryRun(t *testing.T) {
	c := need(t)
	r := track(t)
	root := manifestsDir()
	c.ensureNamespace(t, "ambit-system")
	// CRDs must exist for custom resources in the same apply to dry-run.
	c.mustKubectl(t, "", "apply", "--server-side", "-k", filepath.Join(root, "crds"))
	c.waitCRDs(t)
	for _, dir := range []string{".", "overlays/kind", "overlays/uninstall"} {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		out, err := c.kubectl(ctx, "", "apply", "-k", filepath.Join(root, dir), "--dry-run=server")
		cancel()
		if err != nil {
			t.Errorf("kubectl apply -k %s --dry-run=server: %v\n%s", dir, err, out)
			continue
		}
		n := strings.Count(out, "(server dry run)")
		if n == 0 {
			t.Errorf("%s: no object went through the server dry run:\n%s", dir, out)
		}
		r.note("manifests/%s: %d objects", dir, n)
		checkClusterScopedHaveNoNamespace(t, c, filepath.Join(root, dir))
	}
}

// checkClusterScopedHaveNoNamespace: what `kubectl kustomize` renders
// (the kustomize the user's kubectl embeds, which need not know every
// kind's scope: kubectl 1.36's gave the admission policy a namespace)
// puts no namespace on an object the API server says is cluster-scoped.
// The server drops it, but GitOps tools diff against the manifests.
func checkClusterScopedHaveNoNamespace(t *testing.T, c *cluster, dir string) {
	t.Helper()
	_, lists, err := c.client.Discovery().ServerGroupsAndResources()
	if err != nil {
		t.Errorf("discovery: %v", err)
		return
	}
	clusterScoped := map[string]bool{}
	for _, l := range lists {
		for _, res := range l.APIResources {
			if !res.Namespaced && !strings.Contains(res.Name, "/") {
				clusterScoped[l.GroupVersion+"/"+res.Kind] = true
			}
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := c.kubectl(ctx, "", "kustomize", dir)
	if err != nil {
		t.Errorf("kubectl kustomize %s: %v\n%s", dir, err, out)
		return
	}
	for _, doc := range strings.Split(out, "\n---\n") {
		var o struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
			Metadata   struct {
				Name      string `json:"name"`
				Namespace string `json:"namespace"`
			} `json:"metadata"`
		}
		if err := yaml.Unmarshal([]byte(doc), &o); err != nil {
			t.Errorf("kubectl kustomize %s: %v", dir, err)
			continue
		}
		if clusterScoped[o.APIVersion+"/"+o.Kind] && o.Metadata.Namespace != "" {
			t.Errorf("kubectl kustomize %s: cluster-scoped %s %s rendered with namespace %q", dir, o.Kind, o.Metadata.Name, o.Metadata.Namespace)
		}
	}
}

// waitCRDs waits until Ambit's CRDs are Established (served).
func (c *cluster) waitCRDs(t *testing.T) {
	t.Helper()
	c.mustKubectl(t, "", "wait", "--for=condition=Established", "--timeout=60s",
		"crd/authorizationpolicies.ambit.dev", "crd/inboundmodes.ambit.dev")
}

// TestCRDValidation: the policy CRDs reject malformed objects at the API
// server, with messages that name the field and say what is wrong, and
// accept well-formed ones (so the rejections are about the defects).
func TestCRDValidation(t *testing.T) {
	c := need(t)
	r := track(t)
	c.mustKubectl(t, "", "apply", "--server-side", "-k", filepath.Join(manifestsDir(), "crds"))
	c.waitCRDs(t)
	ns := c.namespace(t, "e2e-crd", nil)

	head := func(kind string) string {
		return "apiVersion: ambit.dev/v1alpha1\nkind: " + kind + "\nmetadata:\n  name: p\n  namespace: " + ns + "\n"
	}
	cases := []struct {
		name, yaml string
		want       []string // substrings of the error; nil means accepted
	}{
		{"valid ALLOW policy", head("AuthorizationPolicy") + `spec:
  selector: {matchLabels: {app: server}}
  action: ALLOW
  rules:
  - from: {principals: ["cluster.local/ns/shop/sa/web", "spiffe://cluster.local/ns/ops/*"], ipBlocks: ["10.244.0.0/16", "fd00::1"]}
    to: {ports: [8080]}
`, nil},
		{"valid InboundMode", head("InboundMode") + "spec:\n  mode: STRICT\n  ports: [{port: 8080, mode: PERMISSIVE}]\n", nil},
		{"unknown action", head("AuthorizationPolicy") + "spec:\n  action: PERMIT\n",
			[]string{"spec.action", `Unsupported value: "PERMIT"`, `"ALLOW"`, `"DENY"`}},
		{"port out of range", head("AuthorizationPolicy") + "spec:\n  rules: [{to: {ports: [70000]}}]\n",
			[]string{"spec.rules[0].to.ports[0]", "65535"}},
		{"CIDR that is not one", head("AuthorizationPolicy") + "spec:\n  rules: [{from: {ipBlocks: [\"10.0.0.0/99\"]}}]\n",
			[]string{"spec.rules[0].from.ipBlocks[0]", "must be an IP address or a CIDR"}},
		{"principal with a space", head("AuthorizationPolicy") + "spec:\n  rules: [{from: {principals: [\"cluster.local/ns/a b\"]}}]\n",
			[]string{"spec.rules[0].from.principals[0]", "should match"}},
		{"wildcard in the middle", head("AuthorizationPolicy") + "spec:\n  rules: [{from: {namespaces: [\"a*b\"]}}]\n",
			[]string{"spec.rules[0].from.namespaces[0]", "should match"}},
		{"policy without spec", head("AuthorizationPolicy"),
			[]string{"spec", "Required value"}},
		{"InboundMode that sets nothing", head("InboundMode") + "spec:\n  selector: {matchLabels: {app: x}}\n",
			[]string{"set mode, ports, or both"}},
		{"InboundMode unknown mode", head("InboundMode") + "spec:\n  mode: LOOSE\n",
			[]string{"spec.mode", `Unsupported value: "LOOSE"`}},
		{"InboundMode port listed twice", head("InboundMode") + "spec:\n  ports: [{port: 80, mode: STRICT}, {port: 80, mode: PERMISSIVE}]\n",
			[]string{"spec.ports[1]", "Duplicate value"}},
	}
	rejected := 0
	for _, tc := range cases {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		out, err := c.kubectl(ctx, tc.yaml, "apply", "--dry-run=server", "-f", "-")
		cancel()
		if tc.want == nil {
			if err != nil {
				t.Errorf("%s: refused: %v", tc.name, err)
			}
			continue
		}
		if err == nil {
			t.Errorf("%s: accepted, want a rejection:\n%s", tc.name, out)
			continue
		}
		msg := err.Error()
		for _, w := range tc.want {
			if !strings.Contains(msg, w) {
				t.Errorf("%s: message lacks %q: %s", tc.name, w, msg)
			}
		}
		rejected++
		t.Logf("%s → %s", tc.name, lastLine(msg))
	}
	r.note("%d malformed rejected with field paths, 2 valid accepted", rejected)
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndex(s, "\n"); i >= 0 {
		return s[i+1:]
	}
	return s
}
