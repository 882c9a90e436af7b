package policy

import (
	"maps"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
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
targetRefs: [{kind: Service, group: "", name: web}]`)+
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
	check("ambit.dev/v1alpha1 m1", true, ReasonAccepted, "")
	check("ambit.dev/v1alpha1 m2", false, ReasonConflict, "m1")
	check("security.istio.io/v1 pa", false, ReasonUnsupported, `spec.mtls.mode: Unsupported value: "DISABLE"`)
}

// FuzzDecode: whatever the bytes, decoding, validating, compiling and
// authorizing never panics.
func FuzzDecode(f *testing.F) {
	f.Add([]byte(pol("shop", "p", allowUI)))
	f.Add([]byte(mode("shop", "m", "mode: STRICT\nports: [{port: 80, mode: PERMISSIVE}]")))
	f.Add([]byte(istio("shop", "i", "rules:\n- from: [{source: {principals: [\"*\"]}}]\n  when: [{key: source.ip, values: [\"10.0.0.0/8\"]}]")))
	f.Add([]byte(pol("shop", "p", "selector: {matchLabels: {app: web}}\naction: DENY\nrules:\n- from: {ipBlocks: [\"fd00::/8\"], notPrincipals: [\"*/sa/x\"]}\n  to: {ports: [1]}")))
	f.Add([]byte("kind: List\napiVersion: v1\nitems: [{apiVersion: ambit.dev/v1alpha1, kind: InboundMode}]"))
	f.Fuzz(func(t *testing.T, data []byte) {
		set, _ := Decode(strings.NewReader(string(data)))
		e := New(Options{Logger: discardLogger()})
		e.Update("fuzz", set)
		for _, c := range []string{ui, "", batch} {
			e.Authorize(conn(c, "10.1.0.5", web, 80))
			e.Authorize(conn(c, "fd00::1", db, 443))
		}
	})
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
