package kube

// The agent's Kubernetes policy source against the real API server:
// policies applied with kubectl are enforced by the Engine, each gets its
// Accepted condition through the status subresource, a policy the schema
// lets through but the agent cannot honour is reported False with the
// field, and a deletion lifts enforcement. Added by the policy owner.

import (
	"context"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"k8s.io/client-go/dynamic"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/policy"
	"github.com/ambit-mesh/ambit/node-agent/policy/kubesource"
	"github.com/ambit-mesh/ambit/tunnel"
)

func TestPolicyKubeSource(t *testing.T) {
	c := need(t)
	r := track(t)
	c.mustKubectl(t, "", "apply", "--server-side", "-k", filepath.Join(testenv.RepoRoot(), "manifests", "crds"))
	c.waitCRDs(t)
	ns := c.namespace(t, "e2e-pol", nil)

	dyn, err := dynamic.NewForConfig(c.rest)
	if err != nil {
		t.Fatal(err)
	}
	eng := policy.New(policy.Options{})
	src, err := kubesource.New(kubesource.Options{Client: dyn, Engine: eng, WriteStatus: true, Debounce: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- src.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	sctx, scancel := context.WithTimeout(ctx, time.Minute)
	defer scancel()
	if err := src.WaitSynced(sctx); err != nil {
		t.Fatal(err)
	}

	web := tunnel.Workload{UID: "u-web", Namespace: ns, Name: "web-1", Labels: map[string]string{"app": "web"}}
	verdict := func(id string) tunnel.Verdict {
		return eng.Authorize(tunnel.ConnInfo{SrcIdentity: id, SrcIP: netip.MustParseAddr("10.244.1.9"), Dst: web, DstPort: 8080})
	}
	const ui, other = "spiffe://cluster.local/ns/front/sa/ui", "spiffe://cluster.local/ns/jobs/sa/batch"
	if !verdict(other).Allow {
		t.Fatal("denied before any policy")
	}

	applied := time.Now()
	c.mustKubectl(t, `apiVersion: ambit.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: allow-ui, namespace: `+ns+`}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - from: {principals: ["cluster.local/ns/front/sa/ui"]}
    to: {ports: [8080]}
`, "apply", "-f", "-")
	poll(t, 30*time.Second, "the policy in force", func() (bool, error) {
		return verdict(ui).Allow && !verdict(other).Allow, nil
	})
	inForce := time.Since(applied)
	// The schema lets this through (label keys are checked by the agent):
	// the agent must refuse it visibly and enforce it fail-closed.
	c.mustKubectl(t, `apiVersion: ambit.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: bad-selector, namespace: `+ns+`}
spec:
  selector: {matchLabels: {"not a label key!": x}}
  action: DENY
  rules: [{}]
`, "apply", "-f", "-")

	accepted := func(name string) (string, string) {
		out, err := c.kubectl(ctx, "", "-n", ns, "get", "authorizationpolicies.ambit.dev", name, "-o",
			`jsonpath={.status.conditions[?(@.type=="Accepted")].status}|{.status.conditions[?(@.type=="Accepted")].reason}|{.status.conditions[?(@.type=="Accepted")].message}`)
		if err != nil {
			return "", err.Error()
		}
		status, rest, _ := strings.Cut(out, "|")
		return status, rest
	}
	poll(t, 30*time.Second, "Accepted conditions", func() (bool, error) {
		s1, _ := accepted("allow-ui")
		s2, _ := accepted("bad-selector")
		return s1 == "True" && s2 == "False", nil
	})
	if _, msg := accepted("bad-selector"); !strings.Contains(msg, "Invalid|") || !strings.Contains(msg, "spec.selector.matchLabels") {
		t.Errorf("bad-selector condition reason|message = %q, want Invalid naming spec.selector.matchLabels", msg)
	}
	// The unreadable policy is enforced namespace-wide as deny-all.
	if v := verdict(ui); v.Allow || v.Policy != ns+"/bad-selector" {
		t.Errorf("unreadable policy not enforced fail-closed: %+v", v)
	}

	deleted := time.Now()
	c.mustKubectl(t, "", "-n", ns, "delete", "authorizationpolicies.ambit.dev", "allow-ui", "bad-selector")
	poll(t, 30*time.Second, "enforcement lifted after delete", func() (bool, error) {
		return verdict(other).Allow, nil
	})
	r.note("policy in force %v after kubectl apply, lifted %v after delete; status conditions written",
		inForce.Round(time.Millisecond), time.Since(deleted).Round(time.Millisecond))
}
