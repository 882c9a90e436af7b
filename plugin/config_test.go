package main

import (
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/plugin/redirect"
	"github.com/containernetworking/cni/pkg/types"
)

const prev = `"prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],"ips":[{"address":"10.1.0.5/24","interface":0}]}`

func TestParseConfigDefaults(t *testing.T) {
	c, err := parseConfig([]byte(`{"cniVersion":"1.0.0","name":"n","type":"ambit-cni",` + prev + `}`))
	if err != nil {
		t.Fatal(err)
	}
	if c.AgentSocket != "/var/run/ambit/cni.sock" || c.AgentTimeout != 15*time.Second || c.LogLevel != slog.LevelInfo ||
		c.LogFile != "/var/log/ambit/cni.log" || c.RuleBackend != redirect.Auto || c.AgentDownPolicy != "snapshot" ||
		c.SnapshotFile != "/var/run/ambit/enrollment-snapshot.json" || len(c.ExcludedNamespaces) != 1 || c.ExcludedNamespaces[0] != "kube-system" {
		t.Errorf("defaults: %+v", c)
	}
	if c.PrevResult == nil || len(prevIPs(c.PrevResult)) != 1 {
		t.Errorf("prevResult not parsed: %+v", c.PrevResult)
	}
}

func TestParseConfigFields(t *testing.T) {
	c, err := parseConfig([]byte(`{"cniVersion":"0.4.0","name":"n","type":"ambit-cni","agentSocket":"/run/x.sock","excludedNamespaces":[],
		"agentTimeout":"2s","logLevel":"debug","logFile":"","ruleBackend":"iptables-nft","agentDownPolicy":"fail-closed","snapshotFile":"/tmp/s.json","mystery":1}`))
	if err != nil {
		t.Fatal(err)
	}
	if c.AgentSocket != "/run/x.sock" || len(c.ExcludedNamespaces) != 0 || c.AgentTimeout != 2*time.Second || c.LogLevel != slog.LevelDebug ||
		c.LogFile != "" || c.RuleBackend != redirect.IptablesNft || c.AgentDownPolicy != "fail-closed" || c.SnapshotFile != "/tmp/s.json" {
		t.Errorf("fields: %+v", c)
	}
	if len(c.Unknown) != 1 || c.Unknown[0] != "mystery" {
		t.Errorf("unknown keys: %v", c.Unknown)
	}
}

// encoding/json applies a key in another case ("AgentTimeout"): it must
// not be reported as ignored, but as applied under the name it was
// taken for. A key in no case of ours stays unknown.
func TestParseConfigKeyInAnotherCase(t *testing.T) {
	c, err := parseConfig([]byte(`{"cniVersion":"1.0.0","name":"n","type":"ambit-cni","AgentTimeout":"3s","LOGLEVEL":"debug","agentTimeOut2":"x"}`))
	if err != nil {
		t.Fatal(err)
	}
	if c.AgentTimeout != 3*time.Second || c.LogLevel != slog.LevelDebug {
		t.Fatalf("keys in another case not applied: timeout %v level %v", c.AgentTimeout, c.LogLevel)
	}
	if len(c.Unknown) != 1 || c.Unknown[0] != "agentTimeOut2" {
		t.Errorf("unknown keys %v, want only agentTimeOut2 (the others were applied)", c.Unknown)
	}
	want := []string{"AgentTimeout (as agentTimeout)", "LOGLEVEL (as logLevel)"}
	if strings.Join(c.OtherCase, "|") != strings.Join(want, "|") {
		t.Errorf("other-case keys %q, want %q", c.OtherCase, want)
	}
}

func TestParseConfigRejects(t *testing.T) {
	cases := []struct {
		name, in, field string
		code            uint
	}{
		{"not json", `{"cniVersion":`, "not valid JSON", types.ErrDecodingFailure},
		{"wrong type", `{"cniVersion":"1.0.0","agentTimeout":5}`, "agentTimeout", types.ErrDecodingFailure},
		{"no version", `{"name":"n"}`, "cniVersion", types.ErrInvalidNetworkConfig},
		{"relative socket", `{"cniVersion":"1.0.0","agentSocket":"cni.sock"}`, "agentSocket", types.ErrInvalidNetworkConfig},
		{"long socket", `{"cniVersion":"1.0.0","agentSocket":"/` + strings.Repeat("a", 120) + `"}`, "agentSocket", types.ErrInvalidNetworkConfig},
		{"bad namespace", `{"cniVersion":"1.0.0","excludedNamespaces":["ok","a/b"]}`, "excludedNamespaces[1]", types.ErrInvalidNetworkConfig},
		{"bad timeout", `{"cniVersion":"1.0.0","agentTimeout":"soon"}`, "agentTimeout", types.ErrInvalidNetworkConfig},
		{"tiny timeout", `{"cniVersion":"1.0.0","agentTimeout":"1ms"}`, "agentTimeout", types.ErrInvalidNetworkConfig},
		{"bad level", `{"cniVersion":"1.0.0","logLevel":"loud"}`, "logLevel", types.ErrInvalidNetworkConfig},
		{"numeric level", `{"cniVersion":"1.0.0","logLevel":"info+2"}`, "logLevel", types.ErrInvalidNetworkConfig},
		{"relative log", `{"cniVersion":"1.0.0","logFile":"cni.log"}`, "logFile", types.ErrInvalidNetworkConfig},
		{"bad backend", `{"cniVersion":"1.0.0","ruleBackend":"ebpf"}`, "ruleBackend", types.ErrInvalidNetworkConfig},
		{"bad policy", `{"cniVersion":"1.0.0","agentDownPolicy":"open"}`, "agentDownPolicy", types.ErrInvalidNetworkConfig},
		{"relative snapshot", `{"cniVersion":"1.0.0","snapshotFile":"s.json"}`, "snapshotFile", types.ErrInvalidNetworkConfig},
		{"wrong plugin type", `{"cniVersion":"1.0.0","type":"bridge"}`, "type", types.ErrInvalidNetworkConfig},
		{"bad prevResult", `{"cniVersion":"1.0.0","prevResult":{"ips":[{"address":"nope"}]}}`, "prevResult", types.ErrInvalidNetworkConfig},
	}
	for _, c := range cases {
		_, err := parseConfig([]byte(c.in))
		var te *types.Error
		if !errors.As(err, &te) {
			t.Errorf("%s: %v is not a CNI error", c.name, err)
			continue
		}
		if te.Code != c.code || !strings.Contains(te.Msg, c.field) {
			t.Errorf("%s: code %d %q, want code %d naming %q", c.name, te.Code, te.Msg, c.code, c.field)
		}
	}
}

func TestParseCNIArgs(t *testing.T) {
	a, err := parseCNIArgs("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1")
	if err != nil || a.Namespace != "shop" || a.Name != "web-0" || a.UID != "u-1" || a.InfraID != "abc" || !a.fromKubelet {
		t.Fatalf("%+v %v", a, err)
	}
	if a, err := parseCNIArgs(""); err != nil || a.fromKubelet {
		t.Fatalf("empty: %+v %v", a, err)
	}
	if a, err := parseCNIArgs("FOO=bar;"); err != nil || a.fromKubelet {
		t.Fatalf("non-k8s: %+v %v", a, err)
	}
	for in, want := range map[string]string{
		"K8S_POD_NAMESPACE": "not KEY=VALUE",
		"=x":                "not KEY=VALUE",
		"K8S_POD_NAMESPACE=a;K8S_POD_NAMESPACE=b":  "twice",
		"K8S_POD_NAMESPACE=a/b;K8S_POD_NAME=x":     "K8S_POD_NAMESPACE",
		"K8S_POD_NAMESPACE=a":                      "empty",
		"K8S_POD_NAME=" + strings.Repeat("x", 300): "K8S_POD_NAME",
		strings.Repeat("A=b;", maxCNIArgs/4+1):     "bytes",
	} {
		_, err := parseCNIArgs(in)
		var te *types.Error
		if !errors.As(err, &te) || te.Code != types.ErrInvalidEnvironmentVariables || !strings.Contains(te.Msg, want) {
			t.Errorf("parseCNIArgs(%.40q) = %v, want code 4 with %q", in, err, want)
		}
	}
}

func FuzzParseConfig(f *testing.F) {
	f.Add([]byte(`{"cniVersion":"1.0.0","name":"n","type":"ambit-cni",` + prev + `}`))
	f.Add([]byte(`{"cniVersion":"0.3.1","agentTimeout":"3s","excludedNamespaces":["a"],"ruleBackend":"nftables"}`))
	f.Add([]byte(`{"cniVersion":"1.1.0","cni.dev/valid-attachments":[{"containerID":"c","ifname":"eth0"}]}`))
	f.Add([]byte(`{"cniVersion":"1.0.0","prevResult":{"ips":[{"address":"fd00::5/64"}]}}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := parseConfig(b)
		if err != nil {
			var te *types.Error
			if !errors.As(err, &te) || te.Msg == "" {
				t.Fatalf("error %v is not a CNI error with a message", err)
			}
			return
		}
		if c.CNIVersion == "" || c.AgentTimeout <= 0 || c.AgentSocket == "" {
			t.Fatalf("accepted config without its essentials: %+v", c)
		}
		_ = prevIPs(c.PrevResult)
	})
}

func FuzzParseCNIArgs(f *testing.F) {
	f.Add("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1")
	f.Add("K8S_POD_NAMESPACE=a;;K8S_POD_NAME=b=c")
	f.Add(";;;=")
	f.Fuzz(func(t *testing.T, s string) {
		a, err := parseCNIArgs(s)
		if err != nil {
			return
		}
		if a.fromKubelet && (a.Namespace == "" || a.Name == "") {
			t.Fatalf("accepted a pod without namespace or name: %+v", a)
		}
		for _, v := range []string{a.Namespace, a.Name, a.UID} {
			if strings.ContainsAny(v, "/\x00\n") {
				t.Fatalf("accepted %q", v)
			}
		}
	})
}

// podman names the container but has no namespaces; the conflist's
// defaultNamespace decides whether such sandboxes can be enrolled.
func TestNameOnlyArgsFromPodman(t *testing.T) {
	a, err := parseCNIArgs("IgnoreUnknown=1;K8S_POD_NAME=web")
	if err != nil {
		t.Fatal(err)
	}
	if !a.nameOnly || a.fromKubelet || a.Name != "web" {
		t.Fatalf("podman args parsed as %+v, want nameOnly without Kubernetes identity", a)
	}
	c, err := parseConfig([]byte(`{"cniVersion":"1.0.0","type":"ambit-cni","defaultNamespace":"default"}`))
	if err != nil || c.DefaultNamespace != "default" {
		t.Fatalf("defaultNamespace: %v %+v", err, c)
	}
	if _, err := parseConfig([]byte(`{"cniVersion":"1.0.0","type":"ambit-cni","defaultNamespace":"a/b"}`)); err == nil || !strings.Contains(err.Error(), "defaultNamespace") {
		t.Fatalf("bad defaultNamespace accepted: %v", err)
	}
}
