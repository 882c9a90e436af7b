package policy

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"k8s.io/kube-openapi/pkg/validation/spec"
	"k8s.io/kube-openapi/pkg/validation/strfmt"
	"k8s.io/kube-openapi/pkg/validation/validate"
	"sigs.k8s.io/yaml"

	"github.com/ambit-mesh/ambit/internal/testenv"
)

// crdSchema loads manifests/crds/<file> and returns its OpenAPI v3 schema
// as the API server's structural validator sees it (kube-openapi's
// validator; CEL rules are not run here — the e2e harness applies the
// CRDs to a real API server).
func crdSchema(t *testing.T, file string) (*spec.Schema, map[string]any) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(testenv.RepoRoot(), "manifests", "crds", file))
	if err != nil {
		t.Fatal(err)
	}
	var crd struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
		Spec       struct {
			Group    string `json:"group"`
			Scope    string `json:"scope"`
			Names    struct{ Kind, Plural string }
			Versions []struct {
				Name    string `json:"name"`
				Served  bool   `json:"served"`
				Storage bool   `json:"storage"`
				Schema  struct {
					OpenAPIV3Schema json.RawMessage `json:"openAPIV3Schema"`
				} `json:"schema"`
				Subresources map[string]any `json:"subresources"`
			} `json:"versions"`
		} `json:"spec"`
	}
	js, err := yaml.YAMLToJSON(b)
	if err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	if err := json.Unmarshal(js, &crd); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	if crd.APIVersion != "apiextensions.k8s.io/v1" || crd.Kind != "CustomResourceDefinition" ||
		crd.Spec.Group != Group || crd.Spec.Scope != "Namespaced" || len(crd.Spec.Versions) != 1 {
		t.Fatalf("%s: unexpected CRD header %+v", file, crd)
	}
	v := crd.Spec.Versions[0]
	if v.Name != Version || !v.Served || !v.Storage || v.Subresources["status"] == nil {
		t.Fatalf("%s: version %s served=%v storage=%v status=%v", file, v.Name, v.Served, v.Storage, v.Subresources["status"])
	}
	var s spec.Schema
	if err := json.Unmarshal(v.Schema.OpenAPIV3Schema, &s); err != nil {
		t.Fatalf("%s: schema: %v", file, err)
	}
	var raw map[string]any
	_ = json.Unmarshal(v.Schema.OpenAPIV3Schema, &raw)
	return &s, raw
}

func schemaErrors(s *spec.Schema, obj map[string]any) []string {
	res := validate.NewSchemaValidator(s, nil, "", strfmt.Default).Validate(obj)
	var out []string
	for _, e := range res.Errors {
		out = append(out, e.Error())
	}
	return out
}

// TestCRDSchemaAgreesWithGo validates sample objects against the CRD
// schema and against the Go validation the agent applies to files: both
// must accept the good ones and refuse the bad ones, with messages that
// name the field. Cases marked cel are refused only by the schema's CEL
// rules (run by the API server) and by Go.
func TestCRDSchemaAgreesWithGo(t *testing.T) {
	apSchema, _ := crdSchema(t, "authorizationpolicies.ambit.dev.yaml")
	imSchema, _ := crdSchema(t, "inboundmodes.ambit.dev.yaml")
	cases := []struct {
		name  string
		doc   string
		ok    bool
		cel   bool   // schema without CEL accepts; CEL and Go refuse
		field string // the field the errors must name
	}{
		{"full policy", pol("shop", "p", `
selector: {matchLabels: {app: web}}
action: DENY
rules:
- from:
    principals: ["cluster.local/ns/a/sa/b", "spiffe://cluster.local/ns/a/*", "*/sa/x", "*"]
    notPrincipals: ["cluster.local/ns/a/sa/c"]
    namespaces: [a, "b*"]
    notNamespaces: [kube-system]
    ipBlocks: ["10.0.0.0/8", "fd00::/8", "10.1.2.3"]
    notIpBlocks: ["10.9.0.0/16"]
  to: {ports: [80, 443], notPorts: [22]}`), true, false, ""},
		{"allow nothing", pol("shop", "p", `{}`), true, false, ""},
		{"empty rule", pol("shop", "p", `rules: [{}]`), true, false, ""},
		{"lower-case action", pol("shop", "p", `action: allow`), false, false, "spec.action"},
		{"AUDIT action", pol("shop", "p", `action: AUDIT`), false, false, "spec.action"},
		{"port 0", pol("shop", "p", "rules:\n- to: {ports: [0]}"), false, false, "spec.rules[0].to.ports[0]"},
		{"port 65536", pol("shop", "p", "rules:\n- to: {notPorts: [65536]}"), false, false, "spec.rules[0].to.notPorts[0]"},
		{"port as string", pol("shop", "p", "rules:\n- to: {ports: [\"80\"]}"), false, false, "ports"},
		{"star in the middle", pol("shop", "p", "rules:\n- from: {principals: [\"cluster.local/*/sa/x\"]}"), false, false, "spec.rules[0].from.principals[0]"},
		{"stars at both ends", pol("shop", "p", "rules:\n- from: {namespaces: [\"*shop*\"]}"), false, false, "spec.rules[0].from.namespaces[0]"},
		{"empty principal", pol("shop", "p", "rules:\n- from: {principals: [\"\"]}"), false, false, "spec.rules[0].from.principals[0]"},
		{"white space in principal", pol("shop", "p", "rules:\n- from: {notPrincipals: [\"a b\"]}"), false, false, "spec.rules[0].from.notPrincipals[0]"},
		{"host name as ipBlock", pol("shop", "p", "rules:\n- from: {ipBlocks: [\"example.com\"]}"), false, false, "spec.rules[0].from.ipBlocks[0]"},
		{"short CIDR", pol("shop", "p", "rules:\n- from: {ipBlocks: [\"10.0.0/8\"]}"), false, true, "spec.rules[0].from.ipBlocks[0]"},
		{"prefix too long", pol("shop", "p", "rules:\n- from: {notIpBlocks: [\"10.0.0.0/33\"]}"), false, true, "spec.rules[0].from.notIpBlocks[0]"},
		{"unknown field in from", pol("shop", "p", "rules:\n- from: {principal: [x]}"), false, false, "principal"},
		{"rules not a list", pol("shop", "p", "rules: {from: {}}"), false, false, "rules"},
		{"label value too long", pol("shop", "p", "selector: {matchLabels: {app: "+strings.Repeat("x", 64)+"}}"), false, false, "spec.selector.matchLabels"},
		{"too many ipBlocks", pol("shop", "p", "rules:\n- from: {ipBlocks: ["+strings.Repeat("\"10.0.0.1\",", MaxIPBlocks)+"\"10.0.0.2\"]}"), false, false, "spec.rules[0].from.ipBlocks"},

		{"strict mode", mode("shop", "m", `mode: STRICT`), true, false, ""},
		{"ports only", mode("shop", "m", `ports: [{port: 8080, mode: PERMISSIVE}]`), true, false, ""},
		{"selector mode", mode("shop", "m", "selector: {matchLabels: {app: web}}\nmode: PERMISSIVE\nports: [{port: 9100, mode: STRICT}]"), true, false, ""},
		{"lower-case mode", mode("shop", "m", `mode: strict`), false, false, "spec.mode"},
		{"DISABLE mode", mode("shop", "m", `mode: DISABLE`), false, false, "spec.mode"},
		{"port without mode", mode("shop", "m", `ports: [{port: 8080}]`), false, false, "spec.ports[0].mode"},
		{"port out of range", mode("shop", "m", `ports: [{port: 70000, mode: STRICT}]`), false, false, "spec.ports[0].port"},
		{"neither mode nor ports", mode("shop", "m", `selector: {matchLabels: {app: web}}`), false, true, "spec.mode"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			js, err := yaml.YAMLToJSON([]byte(strings.TrimPrefix(tc.doc, "---\n")))
			if err != nil {
				t.Fatal(err)
			}
			var obj map[string]any
			if err := json.Unmarshal(js, &obj); err != nil {
				t.Fatal(err)
			}
			s := apSchema
			if obj["kind"] == KindInboundMode {
				s = imSchema
			}
			serrs := schemaErrors(s, obj)
			schemaOK := len(serrs) == 0
			wantSchema := tc.ok || tc.cel
			// Unknown fields are not a schema error: the API server
			// prunes them, and kubectl's default field validation
			// (strict) refuses them. Go refuses them.
			if tc.name == "unknown field in from" {
				wantSchema = true
			}
			if schemaOK != wantSchema {
				t.Errorf("schema accepts=%v, want %v: %v", schemaOK, wantSchema, serrs)
			}
			if !schemaOK && tc.field != "" && !strings.Contains(strings.Join(serrs, "; "), tc.field) {
				t.Errorf("schema errors do not name %q: %v", tc.field, serrs)
			}

			set, derrs := Decode(strings.NewReader(tc.doc))
			if len(derrs) > 0 {
				t.Fatal(derrs)
			}
			var gerrs []string
			for i := range set.Policies {
				for _, e := range ValidateAuthorizationPolicy(&set.Policies[i]) {
					gerrs = append(gerrs, e.Error())
				}
			}
			for i := range set.Modes {
				for _, e := range ValidateInboundMode(&set.Modes[i]) {
					gerrs = append(gerrs, e.Error())
				}
			}
			if goOK := len(gerrs) == 0; goOK != tc.ok {
				t.Errorf("Go accepts=%v, want %v: %v", goOK, tc.ok, gerrs)
			}
			if !tc.ok && !strings.Contains(strings.Join(gerrs, "; "), tc.field) {
				t.Errorf("Go errors do not name %q: %v", tc.field, gerrs)
			}
		})
	}
}
