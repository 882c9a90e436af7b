package policy

import (
	"strings"
	"testing"

	"github.com/ambit-mesh/ambit/tunnel"
)

// Which PeerAuthentications take a level: a selector one in Istio's root
// namespace none; an invalid UNSET one is STRICT. Each failed before its fix.
func TestPeerAuthenticationScope(t *testing.T) {
	cases := []struct {
		name  string
		docs  string
		dst   tunnel.Workload
		allow bool
		want  string
	}{
		// Istio skips a PeerAuthentication with a selector in its root
		// namespace for every workload (ComposePeerAuthentication, and
		// ambient's "PeerAuthentication doesn't support mesh-wide
		// selector policies"). Read into our root namespace it picked
		// that namespace's workloads and opened plaintext there.
		{"istio root-namespace selector PeerAuthentication applies to no workload",
			peer("istio-system", "mesh", `mtls: {mode: STRICT}`) +
				peer("istio-system", "gw-open", "selector: {matchLabels: {app: gw}}\nmtls: {mode: PERMISSIVE}"),
			gw, false, "istio:istio-system/mesh"},
		// An invalid namespace-wide UNSET one is invalid like any other:
		// STRICT, as the workload-level one already was, not "inherits".
		{"invalid namespace-wide UNSET PeerAuthentication is enforced as STRICT",
			peer("shop", "Bad_Name", `mtls: {mode: UNSET}`), web, false, "istio:shop/Bad_Name"},
		{"invalid workload UNSET PeerAuthentication is enforced as STRICT",
			peer("shop", "Bad_Name", "selector: {matchLabels: {app: web}}\nmtls: {mode: UNSET}"), web, false, "istio:shop/Bad_Name"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := engineWith(t, tc.docs)
			v := e.Authorize(conn("", "10.1.0.5", tc.dst, 80))
			if v.Allow != tc.allow || v.Policy != tc.want {
				t.Fatalf("Allow = %v, Policy = %q (reason %q); want %v, %q", v.Allow, v.Policy, v.Reason, tc.allow, tc.want)
			}
		})
	}
}

// Their verdicts say what happened: the root selector one is not
// enforced, the invalid one is Invalid (not "Accepted: inherits").
func TestPeerAuthenticationScopeResults(t *testing.T) {
	docs := peer("istio-system", "gw-open", "selector: {matchLabels: {app: gw}}\nmtls: {mode: PERMISSIVE}") +
		peer("shop", "Bad_Name", `mtls: {mode: UNSET}`)
	set, errs := Decode(strings.NewReader(docs))
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	got := map[string]Result{}
	for _, r := range New(Options{Logger: discardLogger()}).Update("test", set) {
		got[r.Name] = r
	}
	if r := got["gw-open"]; r.Accepted || !strings.Contains(r.Message, "root namespace") {
		t.Errorf("gw-open: %+v, want not accepted, naming the root namespace", r)
	}
	if r := got["Bad_Name"]; r.Accepted || r.Reason != ReasonInvalid {
		t.Errorf("Bad_Name: %+v, want Invalid", r)
	}
}
