package policy

import (
	"strings"
	"testing"

	"github.com/ambit-mesh/ambit/tunnel"
)

// Istio precedence rules we did not follow (UNSET keeps its level;
// serviceAccounts with principals is invalid). Each failed before its fix.
func TestIstioPrecedence(t *testing.T) {
	aged := func(ts, ns, name, spec string) string {
		return "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {namespace: " + ns +
			", name: " + name + ", creationTimestamp: \"" + ts + "\"}\nspec:\n" + indent(spec) + "\n"
	}
	agedMode := func(ts, ns, name, spec string) string {
		return "---\napiVersion: ambit.dev/v1alpha1\nkind: InboundMode\nmetadata: {namespace: " + ns +
			", name: " + name + ", creationTimestamp: \"" + ts + "\"}\nspec:\n" + indent(spec) + "\n"
	}
	const older, newer = "2024-01-01T00:00:00Z", "2024-06-01T00:00:00Z"
	cases := []struct {
		name   string
		docs   string
		c      tunnel.ConnInfo
		allow  bool
		policy string // "-" skips the check
	}{
		// Istio picks the oldest PeerAuthentication of a level before
		// looking at its mode: an UNSET one still takes the level (and
		// inherits), a newer one of the same level is ignored. Dropping
		// the UNSET one let the newer PERMISSIVE one open plaintext.
		{"istio UNSET workload PeerAuthentication shadows a newer PERMISSIVE one",
			mode("shop", "ns", `mode: STRICT`) +
				aged(older, "shop", "a-unset", "selector: {matchLabels: {app: web}}\nmtls: {mode: UNSET}") +
				aged(newer, "shop", "b-open", "selector: {matchLabels: {app: web}}\nmtls: {mode: PERMISSIVE}"),
			conn("", "10.1.0.5", web, 80), false, "shop/ns"},
		{"istio UNSET namespace PeerAuthentication shadows a newer PERMISSIVE one",
			aged(older, "istio-system", "mesh", "mtls: {mode: STRICT}") +
				aged(older, "shop", "a-unset", "mtls: {}") +
				aged(newer, "shop", "b-open", "mtls: {mode: PERMISSIVE}"),
			conn("", "10.1.0.5", web, 80), false, "istio:istio-system/mesh"},
		// Without a competitor it still inherits (no effect).
		{"istio UNSET PeerAuthentication alone inherits",
			aged(older, "istio-system", "mesh", "mtls: {mode: STRICT}") +
				aged(older, "shop", "a-unset", "selector: {matchLabels: {app: web}}"),
			conn("", "10.1.0.5", web, 80), false, "istio:istio-system/mesh"},
		{"istio newer PERMISSIVE PeerAuthentication still applies to what the UNSET one does not select",
			mode("shop", "ns", `mode: STRICT`) +
				aged(older, "shop", "a-unset", "selector: {matchLabels: {app: web}}\nmtls: {mode: UNSET}") +
				aged(newer, "shop", "b-open", "selector: {matchLabels: {tier: back}}\nmtls: {mode: PERMISSIVE}"),
			conn("", "10.1.0.5", db, 80), true, ""},
		// In one Istio source every field must match (AND); folding
		// serviceAccounts into principals made them alternatives (OR),
		// so the batch account got in without being ui. Istio refuses
		// the combination; so do we (fail closed).
		{"istio serviceAccounts with principals is refused, not OR-ed",
			istio("shop", "i", `
rules:
- from: [{source: {principals: ["cluster.local/ns/front/sa/ui"], serviceAccounts: ["jobs/batch"]}}]`),
			conn(batch, "10.1.0.5", web, 80), false, "istio:shop/i"},
		{"istio serviceAccounts alone still allows",
			istio("shop", "i", `
rules:
- from: [{source: {serviceAccounts: ["jobs/batch"]}}]`),
			conn(batch, "10.1.0.5", web, 80), true, "istio:shop/i"},
		// The UNSET one shadows Istio's objects only: a stale UNSET
		// PeerAuthentication must not switch off Ambit's own STRICT.
		{"istio UNSET namespace PeerAuthentication leaves a newer InboundMode in force",
			aged(older, "shop", "a-unset", "mtls: {mode: UNSET}") +
				agedMode(newer, "shop", "strict", "mode: STRICT"),
			conn("", "10.1.0.5", web, 80), false, "shop/strict"},
		{"istio UNSET workload PeerAuthentication leaves a newer InboundMode in force",
			aged(older, "shop", "a-unset", "selector: {matchLabels: {app: web}}") +
				agedMode(newer, "shop", "strict", "selector: {matchLabels: {app: web}}\nmode: STRICT"),
			conn("", "10.1.0.5", web, 80), false, "shop/strict"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := engineWith(t, tc.docs)
			v := e.Authorize(tc.c)
			if v.Allow != tc.allow {
				t.Fatalf("Allow = %v (policy %q, reason %q), want %v", v.Allow, v.Policy, v.Reason, tc.allow)
			}
			if tc.policy != "-" && v.Policy != tc.policy {
				t.Errorf("Policy = %q (reason %q), want %q", v.Policy, v.Reason, tc.policy)
			}
		})
	}
}

// The PeerAuthentication an older UNSET one shadows is reported ignored.
func TestIstioUnsetPeerAuthenticationResults(t *testing.T) {
	docs := "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {namespace: shop, name: a, creationTimestamp: \"2024-01-01T00:00:00Z\"}\nspec: {mtls: {mode: UNSET}}\n" +
		"---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {namespace: shop, name: b, creationTimestamp: \"2024-06-01T00:00:00Z\"}\nspec: {mtls: {mode: PERMISSIVE}}\n"
	set, errs := Decode(strings.NewReader(docs))
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	got := map[string]Result{}
	for _, r := range New(Options{Logger: discardLogger()}).Update("test", set) {
		got[r.Name] = r
	}
	if r := got["a"]; !r.Accepted || !strings.Contains(r.Message, "UNSET") {
		t.Errorf("a: %+v, want accepted, saying UNSET", r)
	}
	if r := got["b"]; r.Accepted || r.Reason != ReasonConflict || !strings.Contains(r.Message, "istio:shop/a") {
		t.Errorf("b: %+v, want Conflict naming istio:shop/a", r)
	}
}
