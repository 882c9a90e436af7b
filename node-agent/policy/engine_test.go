package policy

import (
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ambit-mesh/ambit/tunnel"
)

func decodeT(t testing.TB, docs string) Set {
	t.Helper()
	set, errs := Decode(strings.NewReader(docs))
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	return set
}

func TestOnChangeFiresOnlyWhenEnforcementChanges(t *testing.T) {
	e := New(Options{Logger: discardLogger()})
	n := 0
	e.OnChange(func() { n++ })
	set := decodeT(t, pol("shop", "allow-ui", allowUI))
	e.Update("kube", set)
	if n != 1 {
		t.Fatalf("hooks after first update = %d", n)
	}
	// The same objects again, with a status written back: nothing to do.
	set.Policies[0].Status.Conditions = nil
	set.Policies[0].ResourceVersion = "42"
	e.Update("kube", set)
	if n != 1 {
		t.Fatalf("no-op update fired the hook (%d)", n)
	}
	e.Update("files", decodeT(t, mode("shop", "strict", "mode: STRICT")))
	if n != 2 {
		t.Fatalf("hooks after a second source = %d", n)
	}
	if e.Authorize(conn("", "10.1.0.5", web, 80)).Allow {
		t.Fatal("second source's STRICT not enforced")
	}
	// Both sources are in force together.
	if e.Authorize(conn(admin, "10.1.0.5", web, 80)).Allow {
		t.Fatal("first source's ALLOW lost")
	}
}

func TestLabelChangeIsSeen(t *testing.T) {
	e := engineWith(t, pol("shop", "lock-db", `
selector: {matchLabels: {app: db}}
action: DENY
rules: [{}]`))
	w := web
	if !e.Authorize(conn(ui, "10.1.0.5", w, 80)).Allow {
		t.Fatal("web denied")
	}
	// Same pod (UID), relabelled: the cached decision must not stick.
	w.Labels = maps.Clone(w.Labels)
	w.Labels["app"] = "db"
	if e.Authorize(conn(ui, "10.1.0.5", w, 80)).Allow {
		t.Fatal("relabelled pod still allowed")
	}
}

func TestDenialsCountedByPolicy(t *testing.T) {
	reg := prometheus.NewRegistry()
	e := New(Options{Logger: discardLogger(), Registerer: reg})
	e.Update("t", decodeT(t, pol("shop", "allow-ui", allowUI)+pol("shop", "no-batch", `
action: DENY
rules:
- from: {namespaces: [jobs]}`)+mode("shop", "strict", "mode: STRICT")))
	e.Authorize(conn(batch, "10.1.0.5", web, 80))
	e.Authorize(conn(batch, "10.1.0.5", web, 81))
	e.Authorize(conn(admin, "10.1.0.5", web, 80))
	e.Authorize(conn("", "10.1.0.5", web, 80))
	e.Authorize(conn(ui, "10.1.0.5", web, 80))
	want := `
# HELP ambit_policy_denials_total Inbound connections refused by policy, by deciding policy (empty when no ALLOW rule matched) and reason.
# TYPE ambit_policy_denials_total counter
ambit_policy_denials_total{policy="",reason="no_allow_match"} 1
ambit_policy_denials_total{policy="shop/allow-ui",reason="deny_policy"} 0
ambit_policy_denials_total{policy="shop/no-batch",reason="deny_policy"} 2
ambit_policy_denials_total{policy="shop/strict",reason="strict_plaintext"} 1
`
	if err := testutil.CollectAndCompare(e.denials, strings.NewReader(want), "ambit_policy_denials_total"); err != nil {
		t.Fatal(err)
	}
	// A policy that goes away takes its series along.
	e.Update("t", decodeT(t, pol("shop", "allow-ui", allowUI)))
	if got := testutil.CollectAndCount(e.denials, "ambit_policy_denials_total"); got != 2 {
		t.Fatalf("series after removal = %d, want 2", got)
	}
}

func TestResults(t *testing.T) {
	e := New(Options{Logger: discardLogger()})
	res := e.Update("t", decodeT(t, pol("shop", "ok", allowUI)+pol("shop", "bad", "action: MAYBE")+
		istio("shop", "l7", `
rules:
- to: [{operation: {methods: [GET], ports: ["80"]}}]`)+istio("shop", "waypoint", `
targetRefs: [{kind: Service, group: "", name: web}]`)+istio("shop", "typo", `
rules:
- from: [{source: {notPrincipal: ["*"]}}]`)+istio("shop", "action", "action: ALOW")+
		mode("shop", "m1", "mode: STRICT")+mode("shop", "m2", "mode: PERMISSIVE")+
		peer("bank", "pa", "mtls: {mode: DISABLE}")))
	got := map[string]Result{}
	for _, r := range res {
		got[r.APIVersion+" "+r.Name] = r
	}
	check := func(key string, accepted bool, reason string, msg string) {
		t.Helper()
		r, ok := got[key]
		if !ok {
			t.Fatalf("no result for %s in %+v", key, res)
		}
		if r.Accepted != accepted || r.Reason != reason || !strings.Contains(r.Message, msg) {
			t.Errorf("%s: %+v, want accepted=%v reason=%s message~%q", key, r, accepted, reason, msg)
		}
	}
	check("ambit.dev/v1alpha1 ok", true, ReasonAccepted, "")
	check("ambit.dev/v1alpha1 bad", false, ReasonInvalid, `spec.action: Unsupported value: "MAYBE"`)
	check("security.istio.io/v1 l7", false, ReasonUnsupported, "spec.rules[0].to[0].operation.methods")
	check("security.istio.io/v1 waypoint", false, ReasonUnsupported, "not enforced")
	// Unreadable Istio policies are enforced as deny-all, as ours are,
	// and say so (they were reported Accepted while denying everything).
	check("security.istio.io/v1 typo", false, ReasonInvalid, `unknown field "spec.rules[0].from[0].source.notPrincipal"; enforced as deny-all`)
	check("security.istio.io/v1 action", false, ReasonInvalid, `"ALOW"`)
	e2 := New(Options{Logger: discardLogger()})
	e2.Update("t", decodeT(t, istio("shop", "typo", "rules:\n- from: [{source: {notPrincipal: [\"*\"]}}]")))
	if v := e2.Authorize(conn(ui, "10.1.0.5", web, 80)); v.Allow || v.Policy != "istio:shop/typo" {
		t.Errorf("a connection under the unreadable Istio policy: %+v, want denied by it", v)
	}
	check("ambit.dev/v1alpha1 m1", true, ReasonAccepted, "")
	check("ambit.dev/v1alpha1 m2", false, ReasonConflict, "m1")
	check("security.istio.io/v1 pa", false, ReasonUnsupported, `spec.mtls.mode: Unsupported value: "DISABLE"`)
}

// FuzzDecode: whatever the bytes, decoding, validating, compiling and
// authorizing never panics, and what comes out holds: one verdict per
// object, the same decision for the same connection, the same decisions
// after a re-encode, and no hole in a mesh-wide deny-all.
func FuzzDecode(f *testing.F) {
	f.Add([]byte(pol("shop", "p", allowUI)))
	f.Add([]byte(mode("shop", "m", "mode: STRICT\nports: [{port: 80, mode: PERMISSIVE}]")))
	f.Add([]byte(istio("shop", "i", "rules:\n- from: [{source: {principals: [\"*\"]}}]\n  when: [{key: source.ip, values: [\"10.0.0.0/8\"]}]")))
	f.Add([]byte(pol("shop", "p", "selector: {matchLabels: {app: web}}\naction: DENY\nrules:\n- from: {ipBlocks: [\"fd00::/8\"], notPrincipals: [\"*/sa/x\"]}\n  to: {ports: [1]}")))
	f.Add([]byte("kind: List\napiVersion: v1\nitems: [{apiVersion: ambit.dev/v1alpha1, kind: InboundMode}]"))
	f.Add([]byte("kind: AuthorizationPolicyList\napiVersion: ambit.dev/v1alpha1\nitems: [{metadata: {namespace: s, name: a}}, {kind: X}, {metadata: {namespace: s, name: b}, spec: {action: DENY}}]"))
	f.Add([]byte(istio("shop", "i", "rules:\n- from: [{source: {notServiceAccounts: [\"a/b\", \"c\"], notNamespaces: [x]}}, {}]\n  to: [{operation: {ports: [\"80\"]}}]\n  when: [{key: destination.port, notValues: [\"81\"]}, {key: source.namespace, notValues: [y]}]")))
	f.Add([]byte(peer("shop", "pa", "mtls: {mode: PERMISSIVE}\nportLevelMtls: {\"80\": {mode: STRICT}}")))
	// Typos of our types (read as invalid, deny-all of the namespace),
	// other groups (skipped), a wrong type in the header.
	f.Add([]byte("apiVersion: ambit.dev/v1alpah1\nkind: AuthorizationPolicy\nmetadata: {namespace: shop, name: a}\nspec: {action: DENY}\n---\nkind: PeerAuthentication\nmetadata: {namespace: istio-system, name: b}"))
	f.Add([]byte("apiVersion: security.istio.io/v2\nkind: AuthorisationPolicy\nmetadata: {namespace: ambit-system}\n---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\n---\napiVersion: v1\nkind: ConfigMap"))
	f.Add([]byte("apiVersion: ambit.dev\nKind: InboundMode\nMetadata: {namespace: shop, name: 2024}\nitems: 3"))
	f.Fuzz(func(t *testing.T, data []byte) {
		set, _ := Decode(strings.NewReader(string(data)))
		e := New(Options{Logger: discardLogger()})
		res := e.Update("fuzz", set)

		// Every object gets exactly one verdict, and a verdict says
		// accepted exactly when its reason does.
		if n := len(set.Policies) + len(set.Modes) + len(set.IstioPolicies) + len(set.IstioPeerAuthentications); len(res) != n {
			t.Fatalf("%d results for %d objects", len(res), n)
		}
		for _, r := range res {
			if r.Accepted != (r.Reason == ReasonAccepted) {
				t.Fatalf("result %+v: Accepted disagrees with its reason", r)
			}
		}

		// The same connection gets the same verdict every time (the
		// first call fills the workload's cache, the second reads it).
		probes := fuzzProbes()
		first := verdicts(e, probes)
		if again := verdicts(e, probes); !slices.Equal(first, again) {
			t.Fatalf("verdicts changed on a second call:\n%v\n%v", first, again)
		}

		// Re-encoding what was decoded changes no decision: what the
		// API server stores and hands back is what the agent enforces.
		// (Not for invalid objects: their unknown fields are not kept.)
		if !slices.ContainsFunc(res, func(r Result) bool { return r.Reason == ReasonInvalid }) {
			re, errs := Decode(strings.NewReader(encodeSet(t, set)))
			if len(errs) > 0 {
				t.Fatalf("re-encoded set does not decode: %v", errs)
			}
			e2 := New(Options{Logger: discardLogger()})
			e2.Update("fuzz", re)
			if got := verdicts(e2, probes); !slices.Equal(first, got) {
				t.Fatalf("verdicts differ after a re-encode:\n%v\n%v", first, got)
			}
		}

		// A mesh-wide DENY of everything wins over whatever else is in
		// force: no fuzzed object can open a hole in it.
		for _, p := range set.Policies {
			if p.Namespace == DefaultRootNamespace && p.Name == "zz-fuzz-guard" {
				return
			}
		}
		guard, errs := Decode(strings.NewReader(pol(DefaultRootNamespace, "zz-fuzz-guard", "action: DENY\nrules: [{}]")))
		if len(errs) > 0 {
			t.Fatal(errs)
		}
		e.Update("guard", guard)
		for i, v := range verdicts(e, probes) {
			if strings.HasPrefix(v, "allow ") {
				t.Fatalf("%v allowed under a mesh-wide deny-all: %s", probes[i], v)
			}
		}
	})
}

func fuzzProbes() []tunnel.ConnInfo {
	var out []tunnel.ConnInfo
	for _, c := range []string{ui, "", batch, shopWeb, foreign} {
		for _, w := range []tunnel.Workload{web, db, api, gw} {
			out = append(out, conn(c, "10.1.0.5", w, 80), conn(c, "fd00::1", w, 443), conn(c, "192.168.3.4", w, 1))
		}
	}
	return out
}

func verdicts(e *Engine, probes []tunnel.ConnInfo) []string {
	out := make([]string, len(probes))
	for i, c := range probes {
		v := e.Authorize(c)
		verb := "deny"
		if v.Allow {
			verb = "allow"
		}
		out[i] = fmt.Sprintf("%s %s (%s)", verb, v.Policy, v.Reason)
	}
	return out
}

// encodeSet writes set back as YAML documents, as the API server would
// return the objects.
func encodeSet(t *testing.T, set Set) string {
	var b strings.Builder
	add := func(v any) {
		js, err := json.Marshal(v)
		if err != nil {
			t.Fatalf("marshal %T: %v", v, err)
		}
		b.WriteString("---\n")
		b.Write(js)
		b.WriteString("\n")
	}
	for i := range set.Policies {
		add(&set.Policies[i])
	}
	for i := range set.Modes {
		add(&set.Modes[i])
	}
	for i := range set.IstioPolicies {
		add(&set.IstioPolicies[i])
	}
	for i := range set.IstioPeerAuthentications {
		add(&set.IstioPeerAuthentications[i])
	}
	return b.String()
}

// TestAuthorizeAllocatesNothing: the per-connection path (allowed, with
// selector policies in scope, after the first call filled the cache)
// must not allocate — it runs for every connection on the node.
func TestAuthorizeAllocatesNothing(t *testing.T) {
	set, c := benchSet("policies", 1000)
	e := New(Options{Logger: discardLogger()})
	e.Update("t", set)
	if !e.Authorize(c).Allow {
		t.Fatal("want allowed")
	}
	if n := testing.AllocsPerRun(100, func() { e.Authorize(c) }); n != 0 {
		t.Fatalf("Authorize allocates %v times per call", n)
	}
	pt := c
	pt.SrcIdentity, pt.Plaintext = "", true
	e.Authorize(pt)
	e2 := New(Options{Logger: discardLogger()})
	if n := testing.AllocsPerRun(100, func() { e2.Authorize(pt) }); n != 0 {
		t.Fatalf("Authorize without policies allocates %v times per call", n)
	}
}

// TestConcurrentUpdates: connections are authorized while policies
// change (run with -race); every verdict is one of the two policies'.
func TestConcurrentUpdates(t *testing.T) {
	e := New(Options{Logger: discardLogger()})
	a := decodeT(t, pol("shop", "p", allowUI))
	b := decodeT(t, pol("shop", "p", `
rules:
- from: {namespaces: [jobs]}`))
	e.Update("t", a)
	stop := make(chan struct{})
	errs := make(chan string, 4)
	for range 4 {
		go func() {
			for {
				select {
				case <-stop:
					errs <- ""
					return
				default:
				}
				w := web
				v1, v2 := e.Authorize(conn(ui, "10.1.0.5", w, 80)), e.Authorize(conn(admin, "10.1.0.5", w, 80))
				if v2.Allow {
					errs <- "admin allowed by neither policy"
					return
				}
				_ = v1
			}
		}()
	}
	for i := range 200 {
		if i%2 == 0 {
			e.Update("t", b)
		} else {
			e.Update("t", a)
		}
	}
	close(stop)
	for range 4 {
		if msg := <-errs; msg != "" {
			t.Fatal(msg)
		}
	}
}
