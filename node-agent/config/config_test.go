package config

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/yaml"
)

func write(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestLoadDefaults(t *testing.T) {
	c, err := Load(write(t, "nodeName: n1\n"))
	if err != nil {
		t.Fatal(err)
	}
	if c.Socket != "/var/run/ambit/cni.sock" || c.EnrollLabel != DefaultEnrollLabel || c.Source != SourceKubernetes {
		t.Fatalf("defaults not applied: %+v", c)
	}
	if c.SnapshotFile != "/var/run/ambit/enrollment-snapshot.json" {
		t.Fatalf("snapshotFile = %q", c.SnapshotFile)
	}
	if len(c.ExcludedNamespaces) != 1 || c.ExcludedNamespaces[0] != "kube-system" {
		t.Fatalf("excluded = %v", c.ExcludedNamespaces)
	}
	// Not client-go's 5/10: 50 pods started at once would wait up to 8 s
	// for their annotation.
	if c.KubeAPIQPS != 50 || c.KubeAPIBurst != 100 {
		t.Fatalf("kubeAPIQPS/kubeAPIBurst = %v/%d", c.KubeAPIQPS, c.KubeAPIBurst)
	}
}

func TestLoadYAMLAndJSON(t *testing.T) {
	y := "nodeName: n1\ninventoryFile: /etc/ambit/inv.yaml\ndrainTimeout: 5s\nenrollLabel: istio.io/dataplane-mode\nexcludedNamespaces: [kube-system, infra]\n"
	c, err := Load(write(t, y))
	if err != nil {
		t.Fatal(err)
	}
	if c.Source != SourceInventory || c.DrainTimeout.Duration != 5*time.Second || c.EnrollLabel != "istio.io/dataplane-mode" || len(c.ExcludedNamespaces) != 2 {
		t.Fatalf("yaml not applied: %+v", c)
	}
	j := `{"nodeName":"n2","stateDir":"/tmp/x","socket":"/tmp/x/cni.sock","requestTimeout":"2s"}`
	c, err = Load(write(t, j))
	if err != nil {
		t.Fatal(err)
	}
	if c.NodeName != "n2" || c.RequestTimeout.Duration != 2*time.Second || c.SnapshotFile != "/tmp/x/enrollment-snapshot.json" {
		t.Fatalf("json not applied: %+v", c)
	}
}

func TestErrorsNameTheField(t *testing.T) {
	cases := map[string]string{
		"nodeName: n\nsockett: /x\n":                         "sockett",
		"nodeName: n\nsource: docker\n":                      "source",
		"nodeName: n\nsource: inventory\n":                   "inventoryFile",
		"nodeName: n\nstateDir: relative\n":                  "stateDir",
		"nodeName: n\nenrollLabel: 'bad key!'\n":             "enrollLabel",
		"nodeName: n\nexcludedNamespaces: [ok, Bad_NS]\n":    "excludedNamespaces[1]",
		"nodeName: n\nipv6: maybe\n":                         "ipv6",
		"nodeName: n\nredirectBackend: pf\n":                 "redirectBackend",
		"nodeName: n\nrequestTimeout: 1ms\n":                 "requestTimeout",
		"nodeName: n\ndrainTimeout: soon\n":                  "drainTimeout",
		"nodeName: n\nmaxConcurrentRequests: 0\n":            "maxConcurrentRequests",
		"nodeName: n\nmaxProcs: -1\n":                        "maxProcs",
		"nodeName: n\nmaxConnections: -2\n":                  "maxConnections",
		"nodeName: n\nhealthAddr: nope\n":                    "healthAddr",
		"nodeName: n\nlogLevel: loud\n":                      "logLevel",
		"nodeName: n\nhostRules: always\n":                   "hostRules",
		"nodeName: n\ncaAddress: http://ca\n":                "caAddress",
		"nodeName: n\ntrustDomain: 'a/b'\n":                  "trustDomain",
		"nodeName: n\nkubeAPIQPS: 0\n":                       "kubeAPIQPS",
		"nodeName: n\nkubeAPIQPS: -1\n":                      "kubeAPIQPS",
		"nodeName: n\nkubeAPIBurst: 0\n":                     "kubeAPIBurst",
		"nodeName: n\nreadyTaint: 'not a key'\n":             "readyTaint",
		"nodeName: n\nreadyTaint: ambit.dev/x=:NoSchedule\n": "readyTaint",
	}
	for body, field := range cases {
		_, err := Load(write(t, body))
		if err == nil || !strings.Contains(err.Error(), field) {
			t.Errorf("%q: error %v does not name %s", body, err, field)
		}
	}
}

// The startup taint is on by default, a key of the operator's choice
// replaces it, and "" turns it off, also after being written back.
func TestReadyTaint(t *testing.T) {
	c, err := Load(write(t, "nodeName: n\n"))
	if err != nil || c.ReadyTaint != "ambit.dev/agent-not-ready" {
		t.Fatalf("default readyTaint %q, %v", c.ReadyTaint, err)
	}
	c, err = Load(write(t, "nodeName: n\nreadyTaint: example.com/mesh-not-ready\n"))
	if err != nil || c.ReadyTaint != "example.com/mesh-not-ready" {
		t.Fatalf("readyTaint %q, %v", c.ReadyTaint, err)
	}
	c, err = Load(write(t, "nodeName: n\nreadyTaint: \"\"\n"))
	if err != nil || c.ReadyTaint != "" {
		t.Fatalf("readyTaint \"\" gave %q, %v", c.ReadyTaint, err)
	}
	out, err := yaml.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	c2 := Default()
	if err := Parse(out, &c2); err != nil || c2.ReadyTaint != "" {
		t.Fatalf("readyTaint \"\" written back reads as %q (%v):\n%s", c2.ReadyTaint, err, out)
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte("nodeName: n1\nreadyTaint: \"\"\n"))
	f.Add([]byte("nodeName: n1\ndrainTimeout: 5s\n"))
	// Zero values that mean something (no health server, no excluded
	// namespace) must not turn back into the defaults when written back.
	f.Add([]byte("nodeName: n1\nhealthAddr: \"\"\nexcludedNamespaces: []\n"))
	f.Add([]byte(`{"socket":"/x","excludedNamespaces":["a"]}`))
	f.Add([]byte("- a\n- b"))
	f.Add([]byte("nodeName: n1\nstateDir: /var/run/ambit\nsource: inventory\ninventoryFile: /i\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		c := Default()
		if err := Parse(b, &c); err != nil {
			return
		}
		if err := c.finish(); err != nil {
			return
		}
		// A config the agent accepts says the same thing written back
		// (what `ambit-agent` logs at start, what an operator copies
		// into a ConfigMap): nothing is lost or changed on the way.
		out, err := yaml.Marshal(c)
		if err != nil {
			t.Fatalf("marshal an accepted config: %v", err)
		}
		c2 := Default()
		if err := Parse(out, &c2); err != nil {
			t.Fatalf("an accepted config written back does not parse: %v\n%s", err, out)
		}
		if err := c2.finish(); err != nil {
			t.Fatalf("an accepted config written back is refused: %v\n%s", err, out)
		}
		if !reflect.DeepEqual(c, c2) {
			t.Fatalf("written back and read again, the config differs:\n%+v\n%+v\n%s", c, c2, out)
		}
	})
}

// The auto/on/off keys take their documented values unquoted. YAML 1.1
// reads on, off, yes and no as booleans, and the YAML-to-JSON step made
// them "true" and "false", so `ipv6: off` as docs/host-rules.md says to
// write it was refused as `ipv6: "false" is not auto, on or off`, and
// the agent crash-looped on a config that looks right.
func TestSwitchesUnquoted(t *testing.T) {
	for body, want := range map[string][3]string{
		"nodeName: n\nipv6: off\nhostRules: off\ninstallCNI: off\n":  {"off", "off", "off"},
		"nodeName: n\nipv6: on\nhostRules: on\ninstallCNI: on\n":     {"on", "on", "on"},
		"nodeName: n\nipv6: no\nhostRules: yes\ninstallCNI: false\n": {"off", "on", "off"},
		"nodeName: n\nipv6: \"off\"\nhostRules: auto\n":              {"off", "auto", "auto"},
		`{"nodeName":"n","ipv6":false,"hostRules":true}`:             {"off", "on", "auto"},
	} {
		c, err := Load(write(t, body))
		if err != nil {
			t.Errorf("%q: %v", body, err)
			continue
		}
		if got := [3]string{c.IPv6, c.HostRules, c.InstallCNI}; got != want {
			t.Errorf("%q: ipv6, hostRules, installCNI = %q, want %q", body, got, want)
		}
	}
}

// A duration written without its unit, or empty, is refused naming the
// key: the decoder's own error ("want a duration string such as \"10s\":
// json: cannot unmarshal number into Go value of type string") named
// none, and "" silently kept the default. A bare 0 is zero, as
// time.ParseDuration reads it (ruleCheckInterval: 0 turns the check off).
func TestDurationErrorsNameTheKey(t *testing.T) {
	for body, key := range map[string]string{
		"nodeName: n\ndrainTimeout: 25\n":          "drainTimeout",
		"nodeName: n\nrequestTimeout: 2.5\n":       "requestTimeout",
		"nodeName: n\nruleCheckInterval: \"\"\n":   "ruleCheckInterval",
		"nodeName: n\ndrainTimeout: [1s]\n":        "drainTimeout",
		"nodeName: n\nruleCheckInterval: {a: 1}\n": "ruleCheckInterval",
	} {
		_, err := Load(write(t, body))
		if err == nil || !strings.Contains(err.Error(), ": "+key+": ") {
			t.Errorf("%q: error %v does not name %s", body, err, key)
		}
	}
	c, err := Load(write(t, "nodeName: n\nruleCheckInterval: 0\ndrainTimeout:\n"))
	if err != nil || c.RuleCheckInterval.Duration != 0 || c.DrainTimeout.Duration != Default().DrainTimeout.Duration {
		t.Fatalf("ruleCheckInterval: 0, drainTimeout: null gave %v, %v (%v)", c.RuleCheckInterval, c.DrainTimeout, err)
	}
}

// A health port no listener can take is refused at load: the agent
// binds healthAddr only once ready (while another agent runs), and a
// failed bind was logged and the agent ran on without /readyz, so its
// pod never became ready and the rollout stalled with no error at start.
func TestHealthAddrPort(t *testing.T) {
	for _, addr := range []string{":99999", ":-1", "127.0.0.1:nope-no-such-service"} {
		if _, err := Load(write(t, "nodeName: n\nhealthAddr: \""+addr+"\"\n")); err == nil || !strings.Contains(err.Error(), "healthAddr") {
			t.Errorf("healthAddr %q: error %v", addr, err)
		}
	}
	for _, addr := range []string{":15021", "127.0.0.1:0", "[::1]:15021", ""} {
		if _, err := Load(write(t, "nodeName: n\nhealthAddr: \""+addr+"\"\n")); err != nil {
			t.Errorf("healthAddr %q: %v", addr, err)
		}
	}
}

// The DaemonSet's ConfigMap holds a config this version accepts, with
// the values its comments promise (a key renamed here, or a validation
// tightened, must not leave the shipped manifests crash-looping).
func TestShippedConfigMap(t *testing.T) {
	b, err := os.ReadFile("../../manifests/base/agent/configmap.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var cm struct {
		Data map[string]string `json:"data"`
	}
	if err := yaml.Unmarshal(b, &cm); err != nil {
		t.Fatal(err)
	}
	body, ok := cm.Data["config.yaml"]
	if !ok {
		t.Fatal("no config.yaml in the ConfigMap")
	}
	t.Setenv("NODE_NAME", "node-a")
	c, err := Load(write(t, body))
	if err != nil {
		t.Fatal(err)
	}
	if c.DrainTimeout.Duration != 25*time.Second || c.ProcRoot != "/host/proc" || c.SnapshotFile != "/var/run/ambit/enrollment-snapshot.json" || c.IPv6 != "auto" || c.LogFormat != "json" {
		t.Fatalf("shipped config read as %+v", c)
	}
}
