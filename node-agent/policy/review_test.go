package policy

import (
	"strings"
	"testing"

	"github.com/ambit-mesh/ambit/tunnel"
)

// Cases found in the security review (session 9). Each failed before its
// fix; the commit that fixed it says how.

func TestReviewEvaluation(t *testing.T) {
	cases := []struct {
		name   string
		docs   string
		c      tunnel.ConnInfo
		allow  bool
		policy string // "-" skips the check
	}{
		// Istio's when on destination.port is AND-ed with the rule's
		// to.ports: it must not replace them.
		{"istio when notValues keeps to.ports (other port)", istio("shop", "i", `
rules:
- to: [{operation: {ports: ["8080"]}}]
  when: [{key: destination.port, notValues: ["9443"]}]`), conn(ui, "10.1.0.5", web, 9090), false, ""},
		{"istio when notValues keeps to.ports (the port)", istio("shop", "i", `
rules:
- to: [{operation: {ports: ["8080"]}}]
  when: [{key: destination.port, notValues: ["9443"]}]`), conn(ui, "10.1.0.5", web, 8080), true, "istio:shop/i"},
		{"istio when values keeps to.notPorts", istio("shop", "i", `
rules:
- to: [{operation: {notPorts: ["8080"]}}]
  when: [{key: destination.port, values: ["8080", "8081"]}]`), conn(ui, "10.1.0.5", web, 8080), false, ""},
		// Two froms share one to: the condition applies to both rules
		// (it was written into the shared to twice, then refused).
		{"istio when destination.port with two sources", istio("shop", "i", `
rules:
- from: [{source: {namespaces: [front]}}, {source: {namespaces: [jobs]}}]
  to: [{operation: {notPorts: ["22"]}}]
  when: [{key: destination.port, values: ["8080"]}]`), conn(batch, "10.1.0.5", web, 8080), true, "istio:shop/i"},
		// not-lists AND-ed are one longer not-list: expressible.
		{"istio when notValues adds to notNamespaces", istio("shop", "i", `
rules:
- from: [{source: {notNamespaces: [jobs]}}]
  when: [{key: source.namespace, notValues: [front]}]`), conn(ui, "10.1.0.5", web, 80), false, ""},
		{"istio when notValues adds to notNamespaces (other ns)", istio("shop", "i", `
rules:
- from: [{source: {notNamespaces: [jobs]}}]
  when: [{key: source.namespace, notValues: [front]}]`), conn(shopWeb, "10.1.0.5", web, 80), true, "istio:shop/i"},

		// A malformed serviceAccount ("sa" without namespace) in a
		// not-list must not make the rule match everyone.
		{"istio bad notServiceAccounts fails closed", istio("shop", "i", `
rules:
- from: [{source: {notServiceAccounts: ["batch"]}}]`), conn(batch, "10.1.0.5", web, 80), false, "-"},

		// Istio ignores (and refuses) portLevelMtls without a selector.
		{"istio namespace-wide portLevelMtls does not open the port", peer("shop", "pa", `
mtls: {mode: STRICT}
portLevelMtls: {"8080": {mode: PERMISSIVE}}`), conn("", "10.1.0.5", web, 8080), false, "-"},

		// An invalid InboundMode whose selector is bad counts as STRICT
		// for the whole namespace, even beside a namespace-wide one.
		{"invalid selector InboundMode beside a namespace-wide one", mode("shop", "a-open", `mode: PERMISSIVE`) + mode("shop", "b-bad", `
selector: {matchLabels: {"bad key!": x}}
mode: STRICT`), conn("", "10.1.0.5", web, 80), false, "shop/b-bad"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			set, _ := Decode(strings.NewReader(tc.docs))
			e := New(Options{Logger: discardLogger()})
			e.Update("test", set)
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

// TestListItemErrorKeepsTheRest: one unreadable item of a List must not
// drop the items after it (a DENY among them would silently vanish).
// (The unreadable item was a typo, ambit.dev/v1alpha2; such an item is
// now read as invalid and enforced fail-closed: TestDecodeTypos.)
func TestListItemErrorKeepsTheRest(t *testing.T) {
	doc := `apiVersion: v1
kind: List
items:
- apiVersion: ambit.dev/v1alpha1
  kind: AuthorizationPolicy
  metadata: {namespace: shop, name: first}
  spec: {action: DENY, rules: [{to: {ports: [22]}}]}
- not an object
- apiVersion: ambit.dev/v1alpha1
  kind: AuthorizationPolicy
  metadata: {namespace: shop, name: after}
  spec: {action: DENY, rules: [{to: {ports: [23]}}]}
`
	set, errs := Decode(strings.NewReader(doc))
	if len(errs) != 1 || !strings.Contains(errs[0].Error(), "items[1]") {
		t.Errorf("errors %v, want one naming items[1]", errs)
	}
	var names []string
	for _, p := range set.Policies {
		names = append(names, p.Name)
	}
	if strings.Join(names, ",") != "first,after" {
		t.Fatalf("decoded %v, want [first after]", names)
	}
}

// TestTypedListItems: the items of an AuthorizationPolicyList (as the API
// server lists them) carry no apiVersion/kind; they are read as the
// list's kind instead of being refused, which dropped the whole list.
func TestTypedListItems(t *testing.T) {
	doc := `apiVersion: ambit.dev/v1alpha1
kind: AuthorizationPolicyList
items:
- metadata: {namespace: shop, name: no-ssh}
  spec: {action: DENY, rules: [{to: {ports: [22]}}]}
`
	set, errs := Decode(strings.NewReader(doc))
	if len(errs) > 0 || len(set.Policies) != 1 || set.Policies[0].Name != "no-ssh" {
		t.Fatalf("decoded %+v, errors %v", set.Policies, errs)
	}
	if errs := ValidateAuthorizationPolicy(&set.Policies[0]); len(errs) > 0 {
		t.Fatal(errs)
	}
}
