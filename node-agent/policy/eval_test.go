package policy

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/ambit-mesh/ambit/tunnel"
)

var (
	web = tunnel.Workload{UID: "u-web", Namespace: "shop", Name: "web-1", ServiceAccount: "web",
		Labels: map[string]string{"app": "web", "tier": "front"}, Identity: "spiffe://cluster.local/ns/shop/sa/web"}
	db = tunnel.Workload{UID: "u-db", Namespace: "shop", Name: "db-1", ServiceAccount: "db",
		Labels: map[string]string{"app": "db", "tier": "back"}, Identity: "spiffe://cluster.local/ns/shop/sa/db"}
	api = tunnel.Workload{UID: "u-api", Namespace: "bank", Name: "api-1", ServiceAccount: "api",
		Labels: map[string]string{"app": "api"}, Identity: "spiffe://cluster.local/ns/bank/sa/api"}
	gw = tunnel.Workload{UID: "u-gw", Namespace: "ambit-system", Name: "gw-1", ServiceAccount: "gw",
		Labels: map[string]string{"app": "gw"}, Identity: "spiffe://cluster.local/ns/ambit-system/sa/gw"}
)

const (
	ui      = "spiffe://cluster.local/ns/front/sa/ui"
	admin   = "spiffe://cluster.local/ns/front/sa/admin"
	fe      = "spiffe://cluster.local/ns/frontend/sa/ui"
	batch   = "spiffe://cluster.local/ns/jobs/sa/batch"
	shopWeb = "spiffe://cluster.local/ns/shop/sa/web"
	foreign = "spiffe://other.td/ns/front/sa/ui"
)

// conn builds a ConnInfo; an empty identity means plaintext (15006).
func conn(id, src string, dst tunnel.Workload, port uint16) tunnel.ConnInfo {
	return tunnel.ConnInfo{SrcIdentity: id, SrcIP: netip.MustParseAddr(src), Dst: dst, DstPort: port, Plaintext: id == ""}
}

func engineWith(t testing.TB, docs string) *Engine {
	t.Helper()
	set, errs := Decode(strings.NewReader(docs))
	if len(errs) > 0 {
		t.Fatalf("decode: %v", errs)
	}
	e := New(Options{})
	e.Update("test", set)
	return e
}

func pol(ns, name, spec string) string {
	return "---\napiVersion: ambit.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {namespace: " + ns + ", name: " + name + "}\nspec:\n" + indent(spec) + "\n"
}

func mode(ns, name, spec string) string {
	return "---\napiVersion: ambit.dev/v1alpha1\nkind: InboundMode\nmetadata: {namespace: " + ns + ", name: " + name + "}\nspec:\n" + indent(spec) + "\n"
}

func indent(s string) string {
	lines := strings.Split(strings.Trim(s, "\n"), "\n")
	for i := range lines {
		lines[i] = "  " + lines[i]
	}
	return strings.Join(lines, "\n")
}

const allowUI = `
action: ALLOW
rules:
- from: {principals: ["cluster.local/ns/front/sa/ui"]}`

func TestEvaluation(t *testing.T) {
	cases := []struct {
		name   string
		docs   string
		c      tunnel.ConnInfo
		allow  bool
		policy string // deciding policy; "-" skips the check
	}{
		// No policy at all.
		{"no policy allows mTLS", "", conn(ui, "10.1.0.5", web, 8080), true, ""},
		{"no policy allows plaintext", "", conn("", "10.1.0.5", web, 8080), true, ""},

		// Principals.
		{"exact principal allowed", pol("shop", "allow-ui", allowUI), conn(ui, "10.1.0.5", web, 8080), true, "shop/allow-ui"},
		{"other principal denied", pol("shop", "allow-ui", allowUI), conn(admin, "10.1.0.5", web, 8080), false, ""},
		{"plaintext denied when ALLOW needs principal", pol("shop", "allow-ui", allowUI), conn("", "10.1.0.5", web, 8080), false, ""},
		{"ALLOW in another namespace has no effect", pol("shop", "allow-ui", allowUI), conn(admin, "10.1.0.5", api, 8080), true, ""},
		{"spiffe:// spelling in pattern", pol("shop", "p", `
rules:
- from: {principals: ["spiffe://cluster.local/ns/front/sa/ui"]}`), conn(ui, "10.1.0.5", web, 80), true, "shop/p"},
		{"prefix principal matches", pol("shop", "p", `
rules:
- from: {principals: ["cluster.local/ns/front/*"]}`), conn(admin, "10.1.0.5", web, 80), true, "shop/p"},
		{"prefix principal stops at the namespace boundary", pol("shop", "p", `
rules:
- from: {principals: ["cluster.local/ns/front/*"]}`), conn(fe, "10.1.0.5", web, 80), false, ""},
		{"prefix principal of another trust domain", pol("shop", "p", `
rules:
- from: {principals: ["cluster.local/ns/front/*"]}`), conn(foreign, "10.1.0.5", web, 80), false, ""},
		{"suffix principal matches any namespace", pol("shop", "p", `
rules:
- from: {principals: ["*/sa/ui"]}`), conn(fe, "10.1.0.5", web, 80), true, "shop/p"},
		{"suffix principal refuses others", pol("shop", "p", `
rules:
- from: {principals: ["*/sa/ui"]}`), conn(admin, "10.1.0.5", web, 80), false, ""},
		{"wildcard principal: any mTLS peer", pol("shop", "p", `
rules:
- from: {principals: ["*"]}`), conn(batch, "10.1.0.5", web, 80), true, "shop/p"},
		{"wildcard principal: not plaintext", pol("shop", "p", `
rules:
- from: {principals: ["*"]}`), conn("", "10.1.0.5", web, 80), false, ""},
		{"principal list is OR", pol("shop", "p", `
rules:
- from: {principals: ["cluster.local/ns/jobs/sa/batch", "cluster.local/ns/front/sa/ui"]}`), conn(ui, "10.1.0.5", web, 80), true, "shop/p"},
		{"long principal list (hashed)", pol("shop", "p", `
rules:
- from: {principals: [a/ns/a/sa/1, a/ns/a/sa/2, a/ns/a/sa/3, a/ns/a/sa/4, a/ns/a/sa/5, a/ns/a/sa/6, a/ns/a/sa/7, a/ns/a/sa/8, a/ns/a/sa/9, "cluster.local/ns/jobs/sa/batch"]}`),
			conn(batch, "10.1.0.5", web, 80), true, "shop/p"},
		{"notPrincipals excludes in ALLOW", pol("shop", "p", `
rules:
- from: {principals: ["cluster.local/ns/front/*"], notPrincipals: ["cluster.local/ns/front/sa/admin"]}`), conn(admin, "10.1.0.5", web, 80), false, ""},
		{"notPrincipals keeps the others", pol("shop", "p", `
rules:
- from: {principals: ["cluster.local/ns/front/*"], notPrincipals: ["cluster.local/ns/front/sa/admin"]}`), conn(ui, "10.1.0.5", web, 80), true, "shop/p"},
		{"DENY notPrincipals * refuses plaintext", pol("shop", "no-plain", `
action: DENY
rules:
- from: {notPrincipals: ["*"]}`), conn("", "10.1.0.5", web, 80), false, "shop/no-plain"},
		{"DENY notPrincipals * lets mTLS in", pol("shop", "no-plain", `
action: DENY
rules:
- from: {notPrincipals: ["*"]}`), conn(ui, "10.1.0.5", web, 80), true, ""},

		// Empty rules.
		{"ALLOW without rules allows nothing", pol("shop", "nothing", `action: ALLOW`), conn(ui, "10.1.0.5", web, 80), false, ""},
		{"ALLOW with an empty rule allows all", pol("shop", "all", `
rules:
- {}`), conn("", "10.1.0.5", web, 80), true, "shop/all"},
		{"DENY without rules denies nothing", pol("shop", "d", `action: DENY`), conn(ui, "10.1.0.5", web, 80), true, ""},
		{"DENY with an empty rule denies all", pol("shop", "d", `
action: DENY
rules:
- {}`), conn(ui, "10.1.0.5", web, 80), false, "shop/d"},
		{"empty from and to match anything", pol("shop", "p", `
rules:
- {from: {}, to: {}}`), conn(batch, "10.1.0.5", web, 80), true, "shop/p"},

		// Several policies.
		{"DENY wins over ALLOW", pol("shop", "allow-ui", allowUI) + pol("shop", "deny-ui", `
action: DENY
rules:
- from: {principals: ["*/sa/ui"]}`), conn(ui, "10.1.0.5", web, 80), false, "shop/deny-ui"},
		{"any ALLOW policy suffices", pol("shop", "allow-ui", allowUI) + pol("shop", "allow-batch", `
rules:
- from: {principals: ["cluster.local/ns/jobs/sa/batch"]}`), conn(batch, "10.1.0.5", web, 80), true, "shop/allow-batch"},
		{"rules are OR", pol("shop", "p", `
rules:
- from: {principals: ["cluster.local/ns/jobs/sa/batch"]}
- to: {ports: [9090]}`), conn(ui, "10.1.0.5", web, 9090), true, "shop/p"},
		{"from and to are AND", pol("shop", "p", `
rules:
- from: {principals: ["cluster.local/ns/front/sa/ui"]}
  to: {ports: [8080]}`), conn(ui, "10.1.0.5", web, 9090), false, ""},
		{"fields of one source are AND", pol("shop", "p", `
rules:
- from: {principals: ["cluster.local/ns/front/sa/ui"], ipBlocks: ["10.9.0.0/16"]}`), conn(ui, "10.1.0.5", web, 80), false, ""},

		// Namespace vs workload scope.
		{"selector policy applies to its workload", pol("shop", "db-only", `
selector: {matchLabels: {app: db}}
rules:
- from: {principals: ["cluster.local/ns/shop/sa/web"]}`), conn(ui, "10.1.0.5", db, 5432), false, ""},
		{"selector policy allows its source", pol("shop", "db-only", `
selector: {matchLabels: {app: db}}
rules:
- from: {principals: ["cluster.local/ns/shop/sa/web"]}`), conn(shopWeb, "10.1.0.5", db, 5432), true, "shop/db-only"},
		{"selector policy leaves other workloads", pol("shop", "db-only", `
selector: {matchLabels: {app: db}}
rules:
- from: {principals: ["cluster.local/ns/shop/sa/web"]}`), conn(ui, "10.1.0.5", web, 80), true, ""},
		{"selector needs every label", pol("shop", "p", `
selector: {matchLabels: {app: web, tier: back}}
action: DENY
rules: [{}]`), conn(ui, "10.1.0.5", web, 80), true, ""},
		{"namespace-wide DENY plus workload ALLOW", pol("shop", "deny-batch", `
action: DENY
rules:
- from: {namespaces: [jobs]}`) + pol("shop", "web-ui", `
selector: {matchLabels: {app: web}}
rules:
- from: {namespaces: [jobs, front]}`), conn(batch, "10.1.0.5", web, 80), false, "shop/deny-batch"},

		// Root namespace.
		{"root DENY is mesh-wide", pol("ambit-system", "no-jobs", `
action: DENY
rules:
- from: {namespaces: [jobs]}`), conn(batch, "10.1.0.5", api, 80), false, "ambit-system/no-jobs"},
		{"root ALLOW is mesh-wide", pol("ambit-system", "only-front", `
rules:
- from: {namespaces: [front]}`), conn(batch, "10.1.0.5", api, 80), false, ""},
		{"root ALLOW combines with namespace ALLOW", pol("ambit-system", "only-front", `
rules:
- from: {namespaces: [front]}`) + pol("bank", "jobs", `
rules:
- from: {namespaces: [jobs]}`), conn(batch, "10.1.0.5", api, 80), true, "bank/jobs"},
		{"root selector policy applies in every namespace", pol("ambit-system", "api-lock", `
selector: {matchLabels: {app: api}}
action: DENY
rules:
- to: {ports: [22]}`), conn(ui, "10.1.0.5", api, 22), false, "ambit-system/api-lock"},
		{"root policies apply to root workloads", pol("ambit-system", "only-front", `
rules:
- from: {namespaces: [front]}`), conn(ui, "10.1.0.5", gw, 80), true, "ambit-system/only-front"},

		// Namespaces.
		{"namespace matches the identity's", pol("shop", "p", `
rules:
- from: {namespaces: [front]}`), conn(admin, "10.1.0.5", web, 80), true, "shop/p"},
		{"namespace wildcard prefix", pol("shop", "p", `
rules:
- from: {namespaces: ["front*"]}`), conn(fe, "10.1.0.5", web, 80), true, "shop/p"},
		{"namespaces never match plaintext", pol("shop", "p", `
rules:
- from: {namespaces: ["*"]}`), conn("", "10.1.0.5", web, 80), false, ""},
		{"notNamespaces denies outsiders", pol("shop", "own-ns", `
action: DENY
rules:
- from: {notNamespaces: [shop]}`), conn(ui, "10.1.0.5", web, 80), false, "shop/own-ns"},
		{"notNamespaces lets the namespace in", pol("shop", "own-ns", `
action: DENY
rules:
- from: {notNamespaces: [shop]}`), conn(shopWeb, "10.1.0.5", db, 80), true, ""},
		{"notNamespaces matches plaintext", pol("shop", "own-ns", `
action: DENY
rules:
- from: {notNamespaces: [shop]}`), conn("", "10.1.0.5", db, 80), false, "shop/own-ns"},

		// IP blocks.
		{"ipBlocks v4 inside", pol("shop", "p", `
rules:
- from: {ipBlocks: ["10.1.0.0/16"]}`), conn("", "10.1.2.3", web, 80), true, "shop/p"},
		{"ipBlocks v4 outside", pol("shop", "p", `
rules:
- from: {ipBlocks: ["10.1.0.0/16"]}`), conn("", "10.2.0.3", web, 80), false, ""},
		{"ipBlocks v6", pol("shop", "p", `
rules:
- from: {ipBlocks: ["fd00:1::/64"]}`), conn(ui, "fd00:1::7", web, 80), true, "shop/p"},
		{"ipBlocks v6 outside", pol("shop", "p", `
rules:
- from: {ipBlocks: ["fd00:1::/64"]}`), conn(ui, "fd00:2::7", web, 80), false, ""},
		{"ipBlocks v4 does not match v6", pol("shop", "p", `
rules:
- from: {ipBlocks: ["0.0.0.0/0"]}`), conn(ui, "fd00:2::7", web, 80), false, ""},
		{"ipBlocks single address", pol("shop", "p", `
rules:
- from: {ipBlocks: ["10.1.0.5"]}`), conn(ui, "10.1.0.5", web, 80), true, "shop/p"},
		{"v4-mapped source matches a v4 block", pol("shop", "p", `
rules:
- from: {ipBlocks: ["10.1.0.0/16"]}`), conn(ui, "::ffff:10.1.0.5", web, 80), true, "shop/p"},
		{"notIpBlocks denies outside the block", pol("shop", "p", `
action: DENY
rules:
- from: {notIpBlocks: ["10.0.0.0/8", "fd00::/8"]}`), conn(ui, "172.16.0.1", web, 80), false, "shop/p"},
		{"notIpBlocks lets the block in", pol("shop", "p", `
action: DENY
rules:
- from: {notIpBlocks: ["10.0.0.0/8", "fd00::/8"]}`), conn(ui, "fd00::1", web, 80), true, ""},

		// Ports.
		{"ports allow the listed one", pol("shop", "p", `
rules:
- to: {ports: [8080, 8443]}`), conn(ui, "10.1.0.5", web, 8443), true, "shop/p"},
		{"ports refuse others", pol("shop", "p", `
rules:
- to: {ports: [8080, 8443]}`), conn(ui, "10.1.0.5", web, 9090), false, ""},
		{"notPorts in DENY", pol("shop", "p", `
action: DENY
rules:
- to: {notPorts: [8080]}`), conn(ui, "10.1.0.5", web, 9090), false, "shop/p"},
		{"notPorts in DENY spares the port", pol("shop", "p", `
action: DENY
rules:
- to: {notPorts: [8080]}`), conn(ui, "10.1.0.5", web, 8080), true, ""},
		{"same principal, other port", pol("shop", "p", `
rules:
- from: {principals: ["cluster.local/ns/front/sa/ui"]}
  to: {ports: [8080]}
- from: {principals: ["cluster.local/ns/front/sa/ui"]}
  to: {ports: [8081]}`), conn(ui, "10.1.0.5", web, 8081), true, "shop/p"},

		// Inbound mode.
		{"STRICT refuses plaintext", mode("shop", "strict", `mode: STRICT`), conn("", "10.1.0.5", web, 80), false, "shop/strict"},
		{"STRICT admits mTLS", mode("shop", "strict", `mode: STRICT`), conn(ui, "10.1.0.5", web, 80), true, ""},
		{"STRICT port override PERMISSIVE", mode("shop", "strict", `
mode: STRICT
ports: [{port: 9100, mode: PERMISSIVE}]`), conn("", "10.1.0.5", web, 9100), true, ""},
		{"workload PERMISSIVE beats namespace STRICT", mode("shop", "strict", `mode: STRICT`) + mode("shop", "legacy", `
selector: {matchLabels: {app: web}}
mode: PERMISSIVE`), conn("", "10.1.0.5", web, 80), true, ""},
		{"namespace STRICT still covers other workloads", mode("shop", "strict", `mode: STRICT`) + mode("shop", "legacy", `
selector: {matchLabels: {app: web}}
mode: PERMISSIVE`), conn("", "10.1.0.5", db, 80), false, "shop/strict"},
		{"root STRICT is mesh-wide", mode("ambit-system", "mesh", `mode: STRICT`), conn("", "10.1.0.5", api, 80), false, "ambit-system/mesh"},
		{"namespace PERMISSIVE beats root STRICT", mode("ambit-system", "mesh", `mode: STRICT`) + mode("bank", "open", `mode: PERMISSIVE`), conn("", "10.1.0.5", api, 80), true, ""},
		{"ports-only mode inherits the rest", mode("ambit-system", "mesh", `mode: STRICT`) + mode("bank", "open", `ports: [{port: 9100, mode: PERMISSIVE}]`), conn("", "10.1.0.5", api, 80), false, "ambit-system/mesh"},
		{"root selector mode is not mesh-wide", mode("ambit-system", "gw", `
selector: {matchLabels: {app: api}}
mode: STRICT`), conn("", "10.1.0.5", api, 80), true, ""},
		{"PERMISSIVE plaintext still meets ALLOW", pol("shop", "allow-ui", allowUI), conn("", "10.1.0.5", web, 80), false, ""},
		{"invalid InboundMode enforces STRICT", mode("shop", "typo", `mode: strict`), conn("", "10.1.0.5", web, 80), false, "shop/typo"},

		// Invalid policies fail closed.
		{"invalid CIDR: deny-all for its workloads", pol("shop", "bad", `
selector: {matchLabels: {app: web}}
rules:
- from: {ipBlocks: ["10.0.0/8"]}`), conn(ui, "10.1.0.5", web, 80), false, "shop/bad"},
		{"invalid policy leaves unselected workloads", pol("shop", "bad", `
selector: {matchLabels: {app: web}}
rules:
- from: {ipBlocks: ["10.0.0/8"]}`), conn(ui, "10.1.0.5", db, 80), true, ""},
		{"unknown action: deny-all", pol("shop", "bad", `action: ALOW`), conn(ui, "10.1.0.5", web, 80), false, "shop/bad"},
		{"misspelt field: deny-all", pol("shop", "bad", `
action: DENY
rules:
- from: {notPrincipal: ["*"]}`), conn(ui, "10.1.0.5", web, 80), false, "shop/bad"},
		{"bad selector: namespace-wide deny-all", pol("shop", "bad", `
selector: {matchLabels: {"bad key!": x}}
rules: [{}]`), conn(ui, "10.1.0.5", db, 80), false, "shop/bad"},

		// Istio AuthorizationPolicy.
		{"istio ALLOW principals", istio("shop", "i", `
action: ALLOW
rules:
- from: [{source: {principals: ["cluster.local/ns/front/sa/ui"]}}]
  to: [{operation: {ports: ["8080"]}}]`), conn(ui, "10.1.0.5", web, 8080), true, "istio:shop/i"},
		{"istio ALLOW with L7 rule never matches", istio("shop", "i", `
rules:
- from: [{source: {principals: ["cluster.local/ns/front/sa/ui"]}}]
  to: [{operation: {methods: ["GET"]}}]`), conn(ui, "10.1.0.5", web, 8080), false, ""},
		{"istio DENY with L7 denies its L4 part", istio("shop", "i", `
action: DENY
rules:
- from: [{source: {namespaces: [front]}}]
  to: [{operation: {paths: ["/admin"]}}]`), conn(ui, "10.1.0.5", web, 8080), false, "istio:shop/i"},
		{"istio serviceAccounts", istio("shop", "i", `
rules:
- from: [{source: {serviceAccounts: ["jobs/batch"]}}]`), conn(batch, "10.1.0.5", web, 8080), true, "istio:shop/i"},
		{"istio root namespace is mesh-wide", istio("istio-system", "i", `
action: DENY
rules:
- from: [{source: {namespaces: [front]}}]`), conn(ui, "10.1.0.5", api, 8080), false, "istio:istio-system/i"},
		{"istio PeerAuthentication STRICT", peer("shop", "pa", `mtls: {mode: STRICT}`), conn("", "10.1.0.5", web, 80), false, "istio:shop/pa"},
		{"istio PeerAuthentication STRICT admits mTLS", peer("shop", "pa", `mtls: {mode: STRICT}`), conn(ui, "10.1.0.5", web, 80), true, ""},
		{"istio PeerAuthentication portLevelMtls", peer("shop", "pa", `
selector: {matchLabels: {app: web}}
mtls: {mode: STRICT}
portLevelMtls: {"9100": {mode: PERMISSIVE}}`), conn("", "10.1.0.5", web, 9100), true, ""},
		{"istio root PeerAuthentication is the mesh default", peer("istio-system", "pa", `mtls: {mode: STRICT}`), conn("", "10.1.0.5", api, 80), false, "istio:istio-system/pa"},
		{"istio PeerAuthentication UNSET has no effect", peer("shop", "pa", `mtls: {mode: UNSET}`), conn("", "10.1.0.5", web, 80), true, ""},
		{"istio PeerAuthentication DISABLE reads as PERMISSIVE", mode("ambit-system", "mesh", "mode: STRICT") + peer("shop", "pa", `mtls: {mode: DISABLE}`), conn("", "10.1.0.5", web, 80), true, ""},
		{"istio when destination.port", istio("shop", "i", `
rules:
- when: [{key: destination.port, values: ["9090"]}]`), conn(batch, "10.1.0.5", web, 8080), false, ""},
	}
	if len(cases) < 40 {
		t.Fatalf("only %d cases", len(cases))
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
			// Same answer on the cached path.
			if v2 := e.Authorize(tc.c); v2 != v {
				t.Errorf("second call %+v != first %+v", v2, v)
			}
		})
	}
}

func istio(ns, name, spec string) string {
	return "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {namespace: " + ns + ", name: " + name + "}\nspec:\n" + indent(spec) + "\n"
}

func peer(ns, name, spec string) string {
	return "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {namespace: " + ns + ", name: " + name + "}\nspec:\n" + indent(spec) + "\n"
}
