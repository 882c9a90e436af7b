package main

import (
	"context"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/plugin/cniproto/cniprototest"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
	"github.com/ambit-mesh/ambit/plugin/internal/nstest"
	"github.com/ambit-mesh/ambit/plugin/redirect"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
)

// direct is a pod netns and a conflist entry for running ambit-cni alone
// with a hand-made prevResult; no chain is needed to test bad input.
type direct struct {
	t    *testing.T
	bin  string
	pod  ns.NetNS
	conf map[string]any
	env  []string
	dir  string
}

func newDirect(t *testing.T, namespace, socket string) *direct {
	testenv.RequireRoot(t)
	d := &direct{t: t, bin: testenv.Binary(t, "ambit-cni"), pod: nstest.New(t, "pod"), dir: t.TempDir()}
	d.conf = map[string]any{"cniVersion": "1.0.0", "name": "ambit-test", "type": "ambit-cni", "agentSocket": socket,
		"logFile": filepath.Join(d.dir, "cni.log"), "snapshotFile": filepath.Join(d.dir, "snapshot.json"), "agentTimeout": "2s",
		"prevResult": map[string]any{"cniVersion": "1.0.0", "ips": []any{map[string]any{"address": "10.9.0.5/24"}, map[string]any{"address": "fd00:9::5/64"}}}}
	d.env = []string{"CNI_CONTAINERID=ctr-1", "CNI_NETNS=" + d.pod.Path(),
		"CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=" + namespace + ";K8S_POD_NAME=web-0;K8S_POD_UID=u1"}
	return d
}

func (d *direct) run(cmd string, mutate func(map[string]any), env ...string) ([]byte, *types.Error) {
	m := map[string]any{}
	for k, v := range d.conf {
		m[k] = v
	}
	if mutate != nil {
		mutate(m)
	}
	b, _ := json.Marshal(m)
	return runAmbit(d.t, d.bin, cmd, b, append(append([]string{}, d.env...), env...)...)
}

func (d *direct) snapshot(ambient ...string) {
	s := &cniproto.Snapshot{Version: cniproto.SnapshotVersion, Generated: time.Now(), LabelKey: "ambit.dev/dataplane-mode",
		ExcludedNamespaces: []string{"kube-system"}, AmbientNamespaces: ambient}
	if err := cniproto.WriteSnapshot(d.conf["snapshotFile"].(string), s); err != nil {
		d.t.Fatal(err)
	}
}

func wantCode(t *testing.T, what string, e *types.Error, code uint, msg string) {
	t.Helper()
	if e == nil {
		t.Fatalf("%s: succeeded, want CNI error %d", what, code)
	}
	if e.Code != code || !strings.Contains(e.Msg, msg) {
		t.Fatalf("%s: error %d %q (details %q), want code %d containing %q", what, e.Code, e.Msg, e.Details, code, msg)
	}
}

func (d *direct) noRules() {
	d.t.Helper()
	noRules(d.t, &pod{ns: d.pod})
}

func TestBadInput(t *testing.T) {
	agent := newResponder(t, "mesh")
	d := newDirect(t, "mesh", agent.socket)

	_, e := runAmbit(t, d.bin, "ADD", []byte(`{"cniVersion":"1.0.0",`), d.env...)
	wantCode(t, "malformed JSON", e, types.ErrDecodingFailure, "")

	_, e = d.run("ADD", func(m map[string]any) { delete(m, "prevResult") })
	wantCode(t, "no prevResult", e, types.ErrInvalidNetworkConfig, "prevResult")
	_, e = d.run("CHECK", func(m map[string]any) { delete(m, "prevResult") })
	wantCode(t, "CHECK without prevResult", e, types.ErrInvalidNetworkConfig, "prevResult")

	_, e = d.run("ADD", func(m map[string]any) { m["cniVersion"] = "9.9.9" })
	wantCode(t, "unknown cniVersion", e, types.ErrIncompatibleCNIVersion, "")

	_, e = d.run("ADD", func(m map[string]any) { m["agentTimeout"] = "forever" })
	wantCode(t, "bad config value", e, types.ErrInvalidNetworkConfig, "agentTimeout")

	_, e = d.run("ADD", nil, "CNI_ARGS=K8S_POD_NAMESPACE=mesh")
	wantCode(t, "CNI_ARGS without pod name", e, types.ErrInvalidEnvironmentVariables, "K8S_POD_NAME")

	_, e = d.run("ADD", nil, "CNI_NETNS=/var/run/netns/amb-plg-does-not-exist")
	wantCode(t, "missing netns", e, types.ErrInvalidNetNS, "amb-plg-does-not-exist")
	notNS := filepath.Join(d.dir, "plain-file")
	os.WriteFile(notNS, nil, 0o600)
	_, e = d.run("ADD", nil, "CNI_NETNS="+notNS)
	wantCode(t, "netns path that is not a netns", e, types.ErrInvalidNetNS, "plain-file")
	_, e = d.run("ADD", nil, "CNI_NETNS=/proc/self/ns/pid")
	wantCode(t, "a namespace of another kind", e, types.ErrInvalidNetNS, "is not a network namespace")
	if n := len(agent.ops()); n != 0 {
		t.Fatalf("bad input reached the agent %d times", n)
	}
	d.noRules()

	// Agent answers with errors.
	agent.mu.Lock()
	agent.errMsg = "certificate for mesh/default not issued yet"
	agent.mu.Unlock()
	_, e = d.run("ADD", nil)
	wantCode(t, "agent error", e, cniproto.CodeRefused, "certificate for mesh/default not issued yet")
	d.noRules()

	// An enrolled pod whose rules cannot be installed (the conflist's
	// backend override reaches the agent, whose PATH lacks its tools):
	// the agent's code and message, nothing left behind.
	agent.mu.Lock()
	agent.errMsg = ""
	agent.mu.Unlock()
	path := os.Getenv("PATH")
	t.Setenv("PATH", d.dir)
	_, e = d.run("ADD", func(m map[string]any) { m["ruleBackend"] = "iptables-nft" })
	t.Setenv("PATH", path)
	wantCode(t, "install failure", e, cniproto.CodeRedirect, "iptables-nft-save not found")
	d.noRules()
	if got := agent.last().RuleBackend; got != redirect.IptablesNft {
		t.Fatalf("the agent got ruleBackend %q, want the conflist's iptables-nft", got)
	}

	// The happy path still works in the same netns afterwards.
	out, e := d.run("ADD", nil)
	if e != nil {
		t.Fatal(e)
	}
	if !strings.Contains(string(out), "10.9.0.5/24") {
		t.Fatalf("ADD did not print prevResult: %s", out)
	}
	if err := redirect.Verify(context.Background(), d.pod, redirect.DefaultSpec()); err != nil {
		t.Fatal(err)
	}
}

func TestSlowAndGarbageAgent(t *testing.T) {
	agent := newResponder(t, "mesh")
	// Under its lock, as the errMsg changes above: the handler reads it
	// on the server's goroutine, and the socket between is no
	// happens-before for the race detector (go test -race reported it).
	agent.mu.Lock()
	agent.delay = 3 * time.Second
	agent.mu.Unlock()
	d := newDirect(t, "mesh", agent.socket)
	_, e := d.run("ADD", func(m map[string]any) { m["agentTimeout"] = "300ms" })
	wantCode(t, "slow agent", e, types.ErrTryAgainLater, "did not answer within 300ms")
	d.noRules()

	garbage := filepath.Join(t.TempDir(), "garbage.sock")
	cniprototest.Serve(t, garbage, func(c *net.UnixConn) {
		buf := make([]byte, 70000)
		c.Read(buf)
		c.Write([]byte(`{"version":1,"decision":"enroll","redirect":{"outboundPort":15001}}`))
	})
	_, e = d.run("ADD", func(m map[string]any) { m["agentSocket"] = garbage })
	wantCode(t, "garbage agent", e, cniproto.CodeProtocol, "bad redirect parameters")
	d.noRules()
}

func TestAgentDownPolicy(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "no-agent.sock")
	d := newDirect(t, "mesh", missing)

	_, e := d.run("ADD", nil)
	wantCode(t, "agent down, no snapshot", e, types.ErrTryAgainLater, "snapshot is unusable")

	d.snapshot("mesh")
	_, e = d.run("ADD", nil)
	wantCode(t, "agent down, ambient namespace", e, types.ErrTryAgainLater, "ambit-agent is down and pod mesh/web-0 needs it")
	d.noRules()

	d.snapshot("other")
	if _, e = d.run("ADD", nil); e != nil {
		t.Fatalf("agent down, namespace not in the mesh: %v", e)
	}
	d.noRules()

	_, e = d.run("ADD", func(m map[string]any) { m["agentDownPolicy"] = "fail-closed" })
	wantCode(t, "agent down, fail-closed", e, types.ErrTryAgainLater, "fail-closed")

	// Excluded namespaces never need the agent, even with fail-closed.
	if _, e = d.run("ADD", func(m map[string]any) { m["agentDownPolicy"] = "fail-closed" }, "CNI_ARGS=K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=dns"); e != nil {
		t.Fatalf("excluded namespace with the agent down: %v", e)
	}
	// DEL and GC never wedge on a missing agent.
	if _, e = d.run("DEL", nil); e != nil {
		t.Fatalf("DEL with the agent down: %v", e)
	}
	if _, e = d.run("GC", func(m map[string]any) { m["cniVersion"] = "1.1.0"; delete(m, "prevResult") }); e != nil {
		t.Fatalf("GC with the agent down: %v", e)
	}
	// STATUS: ready under the snapshot policy, not under fail-closed.
	if _, e = d.run("STATUS", func(m map[string]any) { m["cniVersion"] = "1.1.0"; delete(m, "prevResult") }); e != nil {
		t.Fatalf("STATUS (snapshot policy): %v", e)
	}
	_, e = d.run("STATUS", func(m map[string]any) {
		m["cniVersion"] = "1.1.0"
		m["agentDownPolicy"] = "fail-closed"
		delete(m, "prevResult")
	})
	wantCode(t, "STATUS fail-closed", e, types.ErrPluginNotAvailable, "socket")
	// The log file got the story.
	b, err := os.ReadFile(d.conf["logFile"].(string))
	if err != nil || !strings.Contains(string(b), "starting pod unenrolled") {
		t.Fatalf("log file: %v\n%s", err, b)
	}
}

func TestGCAndVersion(t *testing.T) {
	agent := newResponder(t)
	d := newDirect(t, "mesh", agent.socket)
	_, e := d.run("GC", func(m map[string]any) {
		m["cniVersion"] = "1.1.0"
		delete(m, "prevResult")
		m["cni.dev/valid-attachments"] = []any{map[string]any{"containerID": "keep-1", "ifname": "eth0"}}
	})
	if e != nil {
		t.Fatal(e)
	}
	req := agent.last()
	if req.Op != cniproto.OpGC || len(req.Valid) != 1 || req.Valid[0].ContainerID != "keep-1" {
		t.Fatalf("GC request: %+v", req)
	}
	out, e := d.run("VERSION", nil)
	if e != nil || !strings.Contains(string(out), `"1.1.0"`) || !strings.Contains(string(out), `"0.3.0"`) {
		t.Fatalf("VERSION: %s %v", out, e)
	}
}

// prevResult comes back unchanged, in the requested spec version, for
// every version the plugin accepts.
func TestPrevResultEveryVersion(t *testing.T) {
	agent := newResponder(t)
	d := newDirect(t, "plain", agent.socket)
	for _, v := range []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"} {
		prev := map[string]any{"cniVersion": v, "ips": []any{map[string]any{"address": "10.9.0.5/24", "gateway": "10.9.0.1"}}}
		if v < "1.0.0" {
			prev["ips"].([]any)[0].(map[string]any)["version"] = "4"
		}
		out, e := d.run("ADD", func(m map[string]any) { m["cniVersion"] = v; m["prevResult"] = prev })
		if e != nil {
			t.Fatalf("%s: %v", v, e)
		}
		var got map[string]any
		if err := json.Unmarshal(out, &got); err != nil {
			t.Fatalf("%s: stdout is not JSON: %s", v, out)
		}
		if got["cniVersion"] != v || !strings.Contains(string(out), `"10.9.0.5/24"`) || !strings.Contains(string(out), `"10.9.0.1"`) {
			t.Errorf("%s: prevResult not returned as %s: %s", v, v, out)
		}
	}
}

// A CNI_NETNS path that is a FIFO (or anything else whose open waits for
// a peer) fails ADD and CHECK with code 8 and is "gone" for DEL, at
// once: openNetns's open blocked until a writer came, so the plugin
// hung, and a hung DEL wedges the sandbox's teardown. The dispatcher's
// own-netns check already avoided opening such a path for that reason.
// The bound below only tells a hang from an answer; the plugin answers
// in milliseconds.
func TestNetnsPathThatBlocksOnOpen(t *testing.T) {
	agent := newResponder(t, "mesh")
	d := newDirect(t, "mesh", agent.socket)
	fifo := filepath.Join(d.dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, cmd := range []string{"ADD", "CHECK", "DEL"} {
		b, _ := json.Marshal(d.conf)
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		c := exec.CommandContext(ctx, d.bin)
		c.Env = append([]string{"CNI_COMMAND=" + cmd, "CNI_IFNAME=eth0", "CNI_PATH=/nonexistent", "PATH=" + os.Getenv("PATH")}, d.env...)
		c.Env = append(c.Env, "CNI_NETNS="+fifo)
		c.Stdin = strings.NewReader(string(b))
		out, err := c.Output()
		hung := ctx.Err() != nil
		cancel()
		if hung {
			t.Fatalf("%s with CNI_NETNS a FIFO: no answer in 20 s (the open waits for a writer)", cmd)
		}
		if cmd == "DEL" {
			if err != nil {
				t.Errorf("DEL with CNI_NETNS a FIFO: %v: %s", err, out)
			}
			continue
		}
		var e types.Error
		if json.Unmarshal(out, &e) != nil || e.Code != types.ErrInvalidNetNS {
			t.Errorf("%s with CNI_NETNS a FIFO: %v, %s; want code 8", cmd, err, out)
		}
	}
	d.noRules()
}
