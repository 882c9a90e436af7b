package policy

import (
	"testing"
)

// Both root namespaces fail closed mesh-wide for a document of unreadable
// type; a null targetRef is unset. Each failed before its fix.
func TestRootNamespacesFailClosed(t *testing.T) {
	cases := []struct {
		name   string
		docs   string
		id     string
		allow  bool
		policy string
	}{
		// A document of unknown type in Istio's root namespace may have
		// been Istio's mesh-wide one (ambit.dev written for
		// security.istio.io): it fails closed mesh-wide whichever group
		// it names, as one in ours does. It denied istio-system only,
		// so a mesh-wide STRICT PeerAuthentication with the wrong group
		// left plaintext open everywhere else.
		{"unreadable ambit-group document in istio-system denies the mesh",
			"---\napiVersion: ambit.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {namespace: istio-system, name: mesh}\nspec: {mtls: {mode: STRICT}}\n",
			"", false, "istio-system/mesh"},
		{"unreadable ambit-group document in istio-system denies mTLS too",
			"---\napiVersion: ambit.dev/v1alpah1\nkind: AuthorizationPolicy\nmetadata: {namespace: istio-system, name: deny}\nspec: {}\n",
			ui, false, "istio-system/deny"},
		// targetRef: null is no targetRef (Istio reads a null message as
		// unset): the policy is the workload's, not a waypoint's. Read
		// as set, a DENY policy was dropped and let in what it denies.
		{"istio DENY with targetRef: null is enforced",
			istio("bank", "deny-jobs", "targetRef: null\naction: DENY\nrules:\n- from: [{source: {namespaces: [jobs]}}]"),
			batch, false, "istio:bank/deny-jobs"},
		{"istio ALLOW with targetRef: null is enforced",
			istio("bank", "only-front", "targetRef: null\nrules:\n- from: [{source: {namespaces: [front]}}]"),
			batch, false, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := engineWith(t, tc.docs)
			v := e.Authorize(conn(tc.id, "10.1.0.5", api, 80))
			if v.Allow != tc.allow || v.Policy != tc.policy {
				t.Fatalf("Allow = %v, Policy = %q (reason %q); want %v, %q; results %+v", v.Allow, v.Policy, v.Reason, tc.allow, tc.policy, e.Results("test"))
			}
		})
	}
}
