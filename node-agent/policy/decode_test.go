package policy

import (
	"strings"
	"testing"
)

// TestDecodeTypos: documents of our groups whose apiVersion or kind we do
// not know are read as invalid policies (enforced as deny-all of their
// namespace), not skipped; other groups are skipped with an error.
func TestDecodeTypos(t *testing.T) {
	for _, c := range []struct {
		doc        string
		ambit      int // decoded into Policies
		istio      int // into IstioPolicies
		errContain string
	}{
		{"apiVersion: ambit.dev/v1alpha2\nkind: AuthorizationPolicy\nmetadata: {namespace: shop, name: a}", 1, 0, ""},
		{"apiVersion: ambit.dev/v1alpha1\nkind: InboundMod\nmetadata: {namespace: shop, name: a}", 1, 0, ""},
		{"apiVersion: Ambit.Dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {namespace: shop, name: a}", 1, 0, ""},
		{"apiVersion: v1\nkind: InboundMode\nmetadata: {namespace: shop, name: a}", 1, 0, ""},
		{"apiVersion: security.istio.io/v1\nkind: PeerAuthenticaton\nmetadata: {namespace: shop, name: a}", 0, 1, ""},
		{"kind: PeerAuthentication\nmetadata: {namespace: shop, name: a}", 0, 1, ""},
		{"kind: AuthorizationPolicy\nmetadata: {namespace: shop, name: a}", 0, 1, ""},
		{"apiVersion: v1\nkind: List\nitems: [{apiVersion: ambit.dev/v1, kind: AuthorizationPolicy, metadata: {namespace: shop, name: a}}]", 1, 0, ""},
		{"apiVersion: v1\nkind: ConfigMap\nmetadata: {namespace: shop, name: a}", 0, 0, "unsupported kind v1 ConfigMap"},
		{"apiVersion: policy.linkerd.io/v1beta3\nkind: AuthorizationPolicy\nmetadata: {namespace: shop, name: a}", 0, 0, "unsupported kind"},
		{"apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {namespace: shop, name: a}", 0, 0, "not enforced by Ambit"},
		{"apiVersion: v1\nkind: List\nitems: {a: b}", 0, 0, "items: not a list"},
	} {
		set, errs := Decode(strings.NewReader(c.doc))
		if len(set.Policies) != c.ambit || len(set.IstioPolicies) != c.istio || len(set.Modes)+len(set.IstioPeerAuthentications) != 0 {
			t.Errorf("%q: decoded %d/%d/%d/%d, want %d ambit and %d Istio policies", c.doc,
				len(set.Policies), len(set.IstioPolicies), len(set.Modes), len(set.IstioPeerAuthentications), c.ambit, c.istio)
		}
		if got := errors2string(errs); (c.errContain == "") != (got == "") || !strings.Contains(got, c.errContain) {
			t.Errorf("%q: errors %q, want one containing %q", c.doc, got, c.errContain)
		}
		for _, p := range set.Policies {
			if errs := ValidateAuthorizationPolicy(&p); len(errs) == 0 {
				t.Errorf("%q: decoded as a valid policy", c.doc)
			}
		}
	}
}

// TestDecodeWrongTypeInHeader: a field of the wrong type among those
// read to choose the type (metadata.name: 2024) made the whole document
// "not an object", skipped, so its DENY was dropped. It is now read and,
// invalid, enforced as deny-all for the workloads it selects.
func TestDecodeWrongTypeInHeader(t *testing.T) {
	doc := "apiVersion: ambit.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {namespace: shop, name: 2024}\n" +
		"spec: {action: DENY, rules: [{from: {principals: [\"cluster.local/ns/jobs/sa/batch\"]}}]}\n---\n" +
		"apiVersion: ambit.dev/v1alpha1\nKind: AuthorizationPolicy\nMetadata: {namespace: bank, name: caps}\n" +
		"spec: {action: DENY, rules: [{}]}\n"
	set, errs := Decode(strings.NewReader(doc))
	if len(errs) > 0 {
		t.Fatalf("errors %v", errs)
	}
	e := New(Options{Logger: discardLogger()})
	res := e.Update("t", set)
	if len(res) != 2 || res[0].Reason != ReasonInvalid || res[1].Reason != ReasonInvalid {
		t.Fatalf("results %+v, want two invalid", res)
	}
	if e.Authorize(conn(ui, "10.1.0.5", web, 80)).Allow || e.Authorize(conn(ui, "10.1.0.5", api, 80)).Allow {
		t.Error("allowed under an invalid DENY")
	}
	if !e.Authorize(conn(ui, "10.1.0.5", gw, 80)).Allow {
		t.Error("denied outside the policies' namespaces")
	}
}

func errors2string(errs []error) string {
	var b []string
	for _, e := range errs {
		b = append(b, e.Error())
	}
	return strings.Join(b, "; ")
}
