package main

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/ambit-mesh/ambit/plugin/cniproto"
	"github.com/ambit-mesh/ambit/plugin/redirect"
	"github.com/containernetworking/cni/pkg/types"
	"golang.org/x/sys/unix"
)

// These tests hold ambit-cni to the CNI spec (SPEC.md v1.1.0, section 2
// and 5) where skel and the reference plugins are laxer, and to what
// libcni-driven runtimes (containerd, CRI-O) do to a chained plugin.

// Every error result carries cniVersion (SPEC.md, "Error": cniVersion,
// code, msg, details): the configuration's when it is one we speak, else
// the spec version of the binary.
func TestErrorResultFormat(t *testing.T) {
	agent := newResponder(t, "mesh")
	d := newDirect(t, "mesh", agent.socket)
	for _, v := range supportedVersions {
		out, e := d.run("ADD", func(m map[string]any) {
			m["cniVersion"] = v
			m["agentTimeout"] = "forever"
			m["prevResult"] = map[string]any{"cniVersion": v}
		})
		wantCode(t, v+": bad config", e, types.ErrInvalidNetworkConfig, "agentTimeout")
		wantErrorKeys(t, v, out, v)
	}
	out, e := d.run("ADD", func(m map[string]any) { m["cniVersion"] = "9.9.9" })
	wantCode(t, "unsupported cniVersion", e, types.ErrIncompatibleCNIVersion, "incompatible")
	wantErrorKeys(t, "unsupported cniVersion", out, specVersion)
	out, e = runAmbit(t, d.bin, "ADD", []byte(`{"cniVersion":"1.0.0","name":"x","type":"ambit-cni"}`), "CNI_CONTAINERID=c")
	wantCode(t, "CNI_NETNS missing", e, types.ErrInvalidEnvironmentVariables, "CNI_NETNS")
	wantErrorKeys(t, "CNI_NETNS missing", out, specVersion)
	out, e = runAmbit(t, d.bin, "ADD", nil, d.env...)
	wantCode(t, "empty stdin", e, types.ErrDecodingFailure, "")
	wantErrorKeys(t, "empty stdin", out, specVersion)
}

func wantErrorKeys(t *testing.T, what string, out []byte, version string) {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(out, &m); err != nil {
		t.Fatalf("%s: error result is not a JSON object: %v\n%s", what, err, out)
	}
	if m["cniVersion"] != version {
		t.Errorf("%s: error result has cniVersion %v, want %q:\n%s", what, m["cniVersion"], version, out)
	}
	if _, ok := m["code"].(float64); !ok {
		t.Errorf("%s: no numeric code:\n%s", what, out)
	}
	if s, _ := m["msg"].(string); s == "" {
		t.Errorf("%s: no msg:\n%s", what, out)
	}
}

// A chained plugin that changes nothing must output the prevResult it was
// given (SPEC.md, "ADD Success"): every field, including the ones the CNI
// library's result types do not know (another plugin's or a newer
// spec's), whatever path the pod takes: enrolled, skipped by the agent,
// excluded, no pod identity, agent down and namespace not in the mesh.
func TestPrevResultVerbatim(t *testing.T) {
	agent := newResponder(t, "mesh")
	d := newDirect(t, "mesh", agent.socket)
	down := filepath.Join(t.TempDir(), "none.sock")
	d.snapshot("mesh")
	paths := []struct {
		name   string
		mutate func(map[string]any)
		env    []string
	}{
		{"enrolled", nil, nil},
		{"skipped", nil, []string{"CNI_ARGS=K8S_POD_NAMESPACE=plain;K8S_POD_NAME=a"}},
		{"excluded", nil, []string{"CNI_ARGS=K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=a"}},
		{"no pod identity", nil, []string{"CNI_ARGS=IgnoreUnknown=1"}},
		{"agent down", func(m map[string]any) { m["agentSocket"] = down }, []string{"CNI_ARGS=K8S_POD_NAMESPACE=plain;K8S_POD_NAME=a"}},
	}
	for _, v := range supportedVersions {
		prev := map[string]any{
			"cniVersion": v,
			"interfaces": []any{map[string]any{"name": "eth0", "mac": "0a:58:0a:09:00:05", "sandbox": d.pod.Path(), "x-vendor": map[string]any{"queues": 4.0}}},
			"ips":        []any{map[string]any{"address": "10.9.0.5/24", "gateway": "10.9.0.1", "interface": 0.0, "x-pool": "blue"}},
			"routes":     []any{map[string]any{"dst": "0.0.0.0/0", "x-weight": 7.0}},
			"dns":        map[string]any{"nameservers": []any{"10.96.0.10"}, "x-dnssec": true},
			"x-top":      []any{"kept", 1.5, nil},
		}
		if v < "1.0.0" {
			prev["ips"].([]any)[0].(map[string]any)["version"] = "4"
		} else {
			prev["interfaces"].([]any)[0].(map[string]any)["mtu"] = 1450.0
		}
		if v == "1.1.0" {
			prev["interfaces"].([]any)[0].(map[string]any)["socketPath"] = "/run/vhost/sock0"
			prev["interfaces"].([]any)[0].(map[string]any)["pciID"] = "0000:00:1f.6"
			prev["routes"].([]any)[0].(map[string]any)["table"] = 100.0
		}
		for _, p := range paths {
			out, e := d.run("ADD", func(m map[string]any) {
				m["cniVersion"] = v
				m["prevResult"] = prev
				if p.mutate != nil {
					p.mutate(m)
				}
			}, p.env...)
			if e != nil {
				t.Fatalf("%s %s: %v", v, p.name, e)
			}
			var got map[string]any
			if err := json.Unmarshal(out, &got); err != nil {
				t.Fatalf("%s %s: stdout is not JSON: %s", v, p.name, out)
			}
			if !reflect.DeepEqual(got, prev) {
				want, _ := json.Marshal(prev)
				t.Errorf("%s %s: prevResult not passed through unchanged\nwant %s\ngot  %s", v, p.name, want, out)
			}
		}
	}
	if err := redirect.Verify(context.Background(), d.pod, redirect.DefaultSpec()); err != nil {
		t.Fatal(err)
	}
}

// DEL is best effort and must succeed, and remove what ADD added while the
// agent is up, whatever changed since ADD (SPEC.md: "plugins should
// always complete a DEL action without error to the fullest extent
// possible"; a failed DEL wedges the sandbox's teardown, and the runtime
// calls DEL even after a failed ADD).
func TestDelAfterConfigChanged(t *testing.T) {
	agent := newResponder(t, "mesh")
	d := newDirect(t, "mesh", agent.socket)
	enroll := func(what string) {
		t.Helper()
		if _, e := d.run("ADD", nil); e != nil {
			t.Fatalf("%s: ADD: %v", what, e)
		}
		if err := redirect.Verify(context.Background(), d.pod, redirect.DefaultSpec()); err != nil {
			t.Fatalf("%s: after ADD: %v", what, err)
		}
	}
	dels := func() int {
		n := 0
		for _, op := range agent.ops() {
			if op == cniproto.OpDel {
				n++
			}
		}
		return n
	}
	cases := []struct {
		name   string
		mutate func(map[string]any)
		env    []string
	}{
		// The operator excluded the namespace after the pod started.
		{"namespace excluded since", func(m map[string]any) { m["excludedNamespaces"] = []string{"kube-system", "mesh"} }, nil},
		// The runtime's cached result is gone: no prevResult.
		{"no prevResult", func(m map[string]any) { delete(m, "prevResult") }, nil},
		// A prevResult that the result types cannot read: DEL has no
		// use for it.
		{"unreadable prevResult", func(m map[string]any) {
			m["prevResult"] = map[string]any{"cniVersion": "1.0.0", "ips": []any{map[string]any{"address": "not-an-address"}}}
		}, nil},
		{"prevResult not an object", func(m map[string]any) { m["prevResult"] = "gone" }, nil},
	}
	for _, c := range cases {
		enroll(c.name)
		before := dels()
		if _, e := d.run("DEL", c.mutate, c.env...); e != nil {
			t.Errorf("%s: DEL failed: %v", c.name, e)
			continue
		}
		if dels() != before+1 {
			t.Errorf("%s: DEL did not reach the agent (agent saw %v)", c.name, agent.ops()[before:])
		}
		found, err := redirect.Installed(context.Background(), d.pod)
		if err != nil {
			t.Fatal(err)
		}
		if len(found) != 0 {
			t.Errorf("%s: DEL left the %v redirection in the netns", c.name, found)
			d.run("DEL", nil) // clean up for the next case
		}
		// And again: DEL must accept being repeated.
		if _, e := d.run("DEL", c.mutate, c.env...); e != nil {
			t.Errorf("%s: second DEL failed: %v", c.name, e)
		}
	}
	d.noRules()

	// CNI_ARGS that ADD refuses: the runtime calls DEL after the failed
	// ADD with the same arguments, and that DEL must succeed.
	for _, args := range []string{
		"K8S_POD_NAMESPACE=mesh;K8S_POD_NAME=web-0;K8S_POD_NAME=web-1",
		"K8S_POD_NAMESPACE=mesh;K8S_POD_NAME=",
		"K8S_POD_NAMESPACE=mesh;K8S_POD_NAME=a/b",
		"K8S_POD_NAMESPACE",
	} {
		_, e := d.run("ADD", nil, "CNI_ARGS="+args)
		wantCode(t, "ADD with CNI_ARGS "+args, e, types.ErrInvalidEnvironmentVariables, "")
		d.noRules()
		if _, e := d.run("DEL", nil, "CNI_ARGS="+args); e != nil {
			t.Errorf("DEL after ADD refused CNI_ARGS %q: %v", args, e)
		}
	}
	d.noRules()
}

// Bad input that an ADD refuses with a clear code must not make DEL fail
// when there is nothing DEL could do about it.
func TestDelNeverFailsOnAgentDown(t *testing.T) {
	d := newDirect(t, "mesh", filepath.Join(t.TempDir(), "none.sock"))
	for _, env := range [][]string{nil, {"CNI_ARGS=K8S_POD_NAME=a;K8S_POD_NAME=b"}, {"CNI_NETNS="}, {"CNI_NETNS=/proc/self/ns/pid"}} {
		if _, e := d.run("DEL", func(m map[string]any) { delete(m, "prevResult") }, env...); e != nil {
			t.Errorf("DEL %v with the agent down: %v", env, e)
		}
	}
	notNS := filepath.Join(d.dir, "plain")
	os.WriteFile(notNS, nil, 0o600)
	if _, e := d.run("DEL", nil, "CNI_NETNS="+notNS); e != nil {
		t.Errorf("DEL with a netns path that is a plain file: %v", e)
	}
}

// STATUS under fail-closed says "not available" (code 50) whenever ADD
// would find no agent: a socket file an agent left behind when it died
// (kill -9) counts as down. It used to stat the path and answer ready.
func TestStatusFailClosedStaleSocket(t *testing.T) {
	agent := newResponder(t, "mesh")
	d := newDirect(t, "mesh", agent.socket)
	status := func(socket string) *types.Error {
		_, e := d.run("STATUS", func(m map[string]any) {
			m["cniVersion"] = "1.1.0"
			m["agentDownPolicy"] = "fail-closed"
			m["agentSocket"] = socket
			delete(m, "prevResult")
		})
		return e
	}
	if e := status(agent.socket); e != nil {
		t.Fatalf("STATUS with the agent serving: %v", e)
	}
	stale := filepath.Join(t.TempDir(), "stale.sock")
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: stale}); err != nil {
		t.Fatal(err)
	}
	unix.Listen(fd, 1)
	unix.Close(fd) // the agent died; its socket file stays
	wantCode(t, "STATUS with a stale socket", status(stale), types.ErrPluginNotAvailable, "does not accept connections")
	wantCode(t, "STATUS with no socket", status(stale+".missing"), types.ErrPluginNotAvailable, "does not accept connections")
	// And ADD agrees: the agent is down.
	_, e := d.run("ADD", func(m map[string]any) { m["agentDownPolicy"] = "fail-closed"; m["agentSocket"] = stale })
	wantCode(t, "ADD with a stale socket", e, types.ErrTryAgainLater, "ambit-agent is down")
}
