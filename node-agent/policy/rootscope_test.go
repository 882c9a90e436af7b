package policy

import (
	"strings"
	"testing"

	"github.com/ambit-mesh/ambit/tunnel"
)

// Istio objects mean in Ambit what they mean in Istio: mesh-wide in
// Istio's root namespace (istio-system) only. In Ambit's root namespace
// (ambit-system) they are that namespace's, while Ambit's own kinds there
// stay mesh-wide.

func agedDoc(ts, apiVersion, kind, ns, name, spec string) string {
	return "---\napiVersion: " + apiVersion + "\nkind: " + kind + "\nmetadata: {namespace: " + ns +
		", name: " + name + ", creationTimestamp: \"" + ts + "\"}\nspec:\n" + indent(spec) + "\n"
}

func TestIstioObjectsInAmbitRootAreNamespaceScoped(t *testing.T) {
	const older, newer = "2024-01-01T00:00:00Z", "2024-06-01T00:00:00Z"
	const istioV1, ambitV1 = "security.istio.io/v1", "ambit.dev/v1alpha1"
	pa := func(ts, ns, name, spec string) string {
		return agedDoc(ts, istioV1, "PeerAuthentication", ns, name, spec)
	}
	iap := func(ts, ns, name, spec string) string {
		return agedDoc(ts, istioV1, "AuthorizationPolicy", ns, name, spec)
	}
	onlyFront := "rules:\n- from: [{source: {namespaces: [front]}}]"

	// An older PERMISSIVE PeerAuthentication in ambit-system used to be
	// the mesh default, beating istio-system's newer STRICT one.
	badSelector := "selector: {matchLabels: {app: \"not a label!\"}}\nrules: [{}]"
	openInAmbit := pa(older, "ambit-system", "open", `mtls: {mode: PERMISSIVE}`) +
		pa(newer, "istio-system", "mesh", `mtls: {mode: STRICT}`)
	// An ALLOW policy in ambit-system used to lock down every workload.
	allowInAmbit := iap(older, "ambit-system", "front-only", onlyFront)

	cases := []struct {
		name   string
		docs   string
		c      tunnel.ConnInfo
		allow  bool
		policy string
	}{
		// The two proven cases.
		{"older PERMISSIVE PeerAuthentication in ambit-system leaves istio-system's STRICT in force elsewhere",
			openInAmbit, conn("", "10.1.0.5", api, 80), false, "istio:istio-system/mesh"},
		{"istio ALLOW policy in ambit-system does not cover other namespaces",
			allowInAmbit, conn(batch, "10.1.0.5", api, 80), true, ""},
		// Nor with a selector: not a mesh-wide selector policy.
		{"istio selector ALLOW policy in ambit-system does not pick workloads of other namespaces",
			iap(older, "ambit-system", "api-lock", "selector: {matchLabels: {app: api}}\n"+onlyFront),
			conn(batch, "10.1.0.5", api, 80), true, ""},
		// An unreadable one fails closed for its own namespace only.
		{"invalid istio policy in ambit-system denies its namespace only",
			iap(older, "ambit-system", "bad", badSelector), conn(ui, "10.1.0.5", api, 80), true, ""},

		// Workloads of ambit-system get the Istio objects there, with
		// Istio's namespace-level semantics.
		{"ambit-system PeerAuthentication is its namespace's default",
			openInAmbit, conn("", "10.1.0.5", gw, 80), true, ""},
		{"ambit-system STRICT PeerAuthentication applies to its workloads",
			pa(older, "ambit-system", "strict", `mtls: {mode: STRICT}`), conn("", "10.1.0.5", gw, 80), false, "istio:ambit-system/strict"},
		{"ambit-system selector PeerAuthentication applies to its workloads",
			pa(older, "ambit-system", "gw", "selector: {matchLabels: {app: gw}}\nmtls: {mode: STRICT}"),
			conn("", "10.1.0.5", gw, 80), false, "istio:ambit-system/gw"},
		{"ambit-system ALLOW policy covers its namespace (denies)",
			allowInAmbit, conn(batch, "10.1.0.5", gw, 80), false, ""},
		{"ambit-system ALLOW policy covers its namespace (allows)",
			allowInAmbit, conn(ui, "10.1.0.5", gw, 80), true, "istio:ambit-system/front-only"},
		{"invalid istio policy in ambit-system denies its namespace",
			iap(older, "ambit-system", "bad", badSelector), conn(ui, "10.1.0.5", gw, 80), false, "istio:ambit-system/bad"},
		// The namespace level beats Ambit's mesh default there, as it
		// beats istio-system's; elsewhere the mesh default holds.
		{"ambit-system PeerAuthentication beats ambit's mesh InboundMode for ambit-system",
			agedDoc(older, ambitV1, "InboundMode", "ambit-system", "mesh", `mode: STRICT`) +
				pa(newer, "ambit-system", "open", `mtls: {mode: PERMISSIVE}`),
			conn("", "10.1.0.5", gw, 80), true, ""},
		{"ambit's mesh InboundMode still holds beside an ambit-system PeerAuthentication",
			agedDoc(older, ambitV1, "InboundMode", "ambit-system", "mesh", `mode: STRICT`) +
				pa(newer, "ambit-system", "open", `mtls: {mode: PERMISSIVE}`),
			conn("", "10.1.0.5", api, 80), false, "ambit-system/mesh"},

		// Controls: istio-system's Istio objects stay mesh-wide.
		{"istio-system PeerAuthentication is the mesh default",
			pa(older, "istio-system", "mesh", `mtls: {mode: STRICT}`), conn("", "10.1.0.5", api, 80), false, "istio:istio-system/mesh"},
		{"istio-system PeerAuthentication covers ambit-system too",
			pa(older, "istio-system", "mesh", `mtls: {mode: STRICT}`), conn("", "10.1.0.5", gw, 80), false, "istio:istio-system/mesh"},
		{"istio-system ALLOW policy is mesh-wide",
			iap(older, "istio-system", "front-only", onlyFront), conn(batch, "10.1.0.5", api, 80), false, ""},
		{"istio-system selector policy picks workloads in every namespace",
			iap(older, "istio-system", "api-lock", "selector: {matchLabels: {app: api}}\n"+onlyFront),
			conn(batch, "10.1.0.5", api, 80), false, ""},
		// Ambit's own kinds in ambit-system stay mesh-wide, and share
		// the mesh level with istio-system's: the older one wins.
		{"ambit ALLOW policy in ambit-system is mesh-wide",
			agedDoc(older, ambitV1, "AuthorizationPolicy", "ambit-system", "front-only", "rules:\n- from: {namespaces: [front]}"),
			conn(batch, "10.1.0.5", api, 80), false, ""},
		{"ambit InboundMode in ambit-system is the mesh default",
			agedDoc(older, ambitV1, "InboundMode", "ambit-system", "mesh", `mode: STRICT`), conn("", "10.1.0.5", api, 80), false, "ambit-system/mesh"},
		{"older ambit mesh InboundMode beats a newer istio-system PeerAuthentication",
			agedDoc(older, ambitV1, "InboundMode", "ambit-system", "mesh", `mode: PERMISSIVE`) +
				pa(newer, "istio-system", "mesh", `mtls: {mode: STRICT}`),
			conn("", "10.1.0.5", api, 80), true, ""},
		// A document whose type could not be read may have been ours:
		// in ambit-system it still fails closed mesh-wide.
		{"unreadable istio-group document in ambit-system denies the mesh",
			agedDoc(older, "security.istio.io/v2", "AuthorisationPolicy", "ambit-system", "typo", "{}"),
			conn(ui, "10.1.0.5", api, 80), false, "istio:ambit-system/typo"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			set, _ := Decode(strings.NewReader(tc.docs))
			e := New(Options{Logger: discardLogger()})
			e.Update("test", set)
			v := e.Authorize(tc.c)
			if v.Allow != tc.allow || v.Policy != tc.policy {
				t.Fatalf("Allow = %v, Policy = %q (reason %q); want %v, %q", v.Allow, v.Policy, v.Reason, tc.allow, tc.policy)
			}
		})
	}
}

// The verdicts agree: PeerAuthentications of ambit-system and istio-system
// are of different levels (no Conflict), and an invalid Istio policy in
// ambit-system is reported as covering its namespace, not the mesh.
func TestIstioObjectsInAmbitRootResults(t *testing.T) {
	docs := agedDoc("2024-01-01T00:00:00Z", "security.istio.io/v1", "PeerAuthentication", "ambit-system", "open", `mtls: {mode: PERMISSIVE}`) +
		agedDoc("2024-06-01T00:00:00Z", "security.istio.io/v1", "PeerAuthentication", "istio-system", "mesh", `mtls: {mode: STRICT}`) +
		agedDoc("2024-01-01T00:00:00Z", "security.istio.io/v1", "AuthorizationPolicy", "ambit-system", "bad",
			"selector: {matchLabels: {app: \"not a label!\"}}\nrules: [{}]")
	set, errs := Decode(strings.NewReader(docs))
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	got := map[string]Result{}
	for _, r := range New(Options{Logger: discardLogger()}).Update("test", set) {
		got[r.Namespace+"/"+r.Name] = r
	}
	for _, k := range []string{"ambit-system/open", "istio-system/mesh"} {
		if r := got[k]; !r.Accepted {
			t.Errorf("%s: %+v, want accepted", k, r)
		}
	}
	if r := got["ambit-system/bad"]; r.Reason != ReasonInvalid || !strings.Contains(r.Message, "every workload of its namespace") {
		t.Errorf("ambit-system/bad: %+v, want Invalid, enforced for its namespace", r)
	}
}
