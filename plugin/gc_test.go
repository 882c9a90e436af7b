package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/ambit-mesh/ambit/plugin/cniproto/cniprototest"

	"github.com/ambit-mesh/ambit/plugin/cniproto"
	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
)

// gcWith returns a mutation that turns the direct conf into a GC of
// attachments (64-hex IDs, as containerd's sandbox IDs).
func gcWith(ids []string) func(map[string]any) {
	return func(m map[string]any) {
		m["cniVersion"] = "1.1.0"
		delete(m, "prevResult")
		valid := make([]any, len(ids))
		for i, id := range ids {
			valid[i] = map[string]any{"containerID": id, "ifname": "eth0"}
		}
		m["cni.dev/valid-attachments"] = valid
	}
}

func sandboxIDs(n int) []string {
	ids := make([]string, n)
	for i := range ids {
		ids[i] = randHex(32)
	}
	return ids
}

// TestGCLargeNode: a node with thousands of sandboxes GCs through the
// real binary in one request; past MaxAttachments the plugin refuses and
// says so, with nothing sent.
func TestGCLargeNode(t *testing.T) {
	agent := newResponder(t)
	d := newDirect(t, "mesh", agent.socket)
	ids := sandboxIDs(cniproto.MaxAttachments)
	if _, e := d.run("GC", gcWith(ids)); e != nil {
		t.Fatalf("GC of %d attachments: %v", len(ids), e)
	}
	req := agent.last()
	if req.Op != cniproto.OpGC || len(req.Valid) != len(ids) {
		t.Fatalf("agent got %s with %d attachments, want gc with %d", req.Op, len(req.Valid), len(ids))
	}
	// The list is this network's only: it goes with the conflist's name.
	if req.Network != "ambit-test" || req.Version != cniproto.NetworkVersion {
		t.Fatalf("gc request of network %q in version %d, want network %q in version %d", req.Network, req.Version, "ambit-test", cniproto.NetworkVersion)
	}
	for i, id := range ids {
		if req.Valid[i].ContainerID != id || req.Valid[i].IfName != "eth0" {
			t.Fatalf("attachment %d: %+v, want %s/eth0", i, req.Valid[i], id)
		}
	}
	sent := len(agent.ops())
	_, e := d.run("GC", gcWith(sandboxIDs(cniproto.MaxAttachments+1)))
	wantCode(t, "GC over MaxAttachments", e, types.ErrInvalidNetworkConfig, "the runtime lists 4097 valid attachments; ambit-cni's GC handles at most 4096")
	if n := len(agent.ops()); n != sent {
		t.Fatalf("an over-long GC still reached the agent (%d requests, want %d)", n, sent)
	}
}

// TestGCOldAgent: an agent from before large gc requests (64 KiB read
// buffer) refuses a big GC; the error tells the operator the versions
// differ.
func TestGCOldAgent(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "old.sock")
	cniprototest.Serve(t, socket, cniprototest.OldAgent)
	d := newDirect(t, "mesh", socket)
	_, e := d.run("GC", gcWith(sandboxIDs(1500)))
	wantCode(t, "big GC to an old agent", e, cniproto.CodeRefused, `ambit-agent refused the GC of network "ambit-test": request exceeds 65536 bytes`)
	for _, want := range []string{"lists 1500 attachments", "agent and plugin versions differ", "upgrade ambit-agent"} {
		if !strings.Contains(e.Msg, want) {
			t.Errorf("error %q lacks %q", e.Msg, want)
		}
	}
}

// TestGCVersion2Agent: an agent from before GC named its network (protocol
// version 2) cannot tell one network's list from the node's. A named GC
// is refused by it and not asked again without the name (it would forget
// every other network's pods): nothing reaches it, and the error says
// why.
func TestGCVersion2Agent(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "v2.sock")
	var mu sync.Mutex
	var seen []string
	cniprototest.Serve(t, socket, cniprototest.Version2Agent(func(v int, op string, raw []byte) {
		mu.Lock()
		seen = append(seen, fmt.Sprintf("%s v%d %s", op, v, raw))
		mu.Unlock()
	}))
	d := newDirect(t, "mesh", socket)
	_, e := d.run("GC", gcWith(sandboxIDs(3)))
	wantCode(t, "named GC to a version 2 agent", e, cniproto.CodeRefused, `ambit-agent refused the GC of network "ambit-test": malformed request: json: unknown field "network"`)
	for _, want := range []string{"protocol version 2, older than this ambit-cni's 3", "nothing was collected and no pod was affected", "upgrade ambit-agent"} {
		if !strings.Contains(e.Msg, want) {
			t.Errorf("error %q lacks %q", e.Msg, want)
		}
	}
	mu.Lock()
	if len(seen) != 0 {
		t.Fatalf("the version 2 agent accepted %q; a named GC must not reach it without its name", seen)
	}
	mu.Unlock()
}

// TestGCBadNetworkName: a conflist name the protocol cannot carry fails
// GC with the field named; sent unnamed, the agent would forget the pods
// of every other network. (A name with characters CNI does not allow is
// refused before, by the dispatcher, as libcni does; a valid one longer
// than MaxNetworkName gets here.)
func TestGCBadNetworkName(t *testing.T) {
	agent := newResponder(t)
	d := newDirect(t, "mesh", agent.socket)
	ids := gcWith(sandboxIDs(2))
	_, e := d.run("GC", func(m map[string]any) { ids(m); m["name"] = strings.Repeat("n", 300) })
	wantCode(t, "GC under a bad name", e, types.ErrInvalidNetworkConfig, "ambit-cni config: name: network name is longer than 253 bytes: nothing was collected")
	if n := len(agent.ops()); n != 0 {
		t.Fatalf("a GC under a bad name reached the agent (%d requests)", n)
	}
}

// TestVersion2AgentServesAddCheckDel: ADD, CHECK and DEL name the network
// in version 3; an agent of version 2 refuses that, and the plugin asks
// again in version 2 without the name, so a rollback of the agent (or an
// upgrade before its binary is replaced) keeps pods starting and stopping.
func TestVersion2AgentServesAddCheckDel(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "v2.sock")
	var mu sync.Mutex
	var seen []string
	cniprototest.Serve(t, socket, cniprototest.Version2Agent(func(v int, op string, raw []byte) {
		mu.Lock()
		seen = append(seen, fmt.Sprintf("%s v%d network=%v", op, v, strings.Contains(string(raw), `"network"`)))
		mu.Unlock()
	}))
	d := newDirect(t, "mesh", socket)
	for _, cmd := range []string{"ADD", "CHECK", "DEL"} {
		if _, e := d.run(cmd, nil); e != nil {
			t.Fatalf("%s to a version 2 agent: %v", cmd, e)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	want := []string{"add v2 network=false", "check v2 network=false", "del v2 network=false"}
	if !slices.Equal(seen, want) {
		t.Fatalf("the version 2 agent served %q, want %q", seen, want)
	}
}

// TestRequestsNameTheNetwork: ADD, CHECK and DEL carry the conflist's
// name to a current agent, which keeps it in the pod's record.
func TestRequestsNameTheNetwork(t *testing.T) {
	agent := newResponder(t)
	d := newDirect(t, "mesh", agent.socket)
	for _, cmd := range []string{"ADD", "CHECK", "DEL"} {
		if _, e := d.run(cmd, nil); e != nil {
			t.Fatalf("%s: %v", cmd, e)
		}
		if req := agent.last(); req.Network != "ambit-test" || req.Version != cniproto.Version {
			t.Fatalf("%s reached the agent as version %d, network %q; want version %d, network %q", cmd, req.Version, req.Network, cniproto.Version, "ambit-test")
		}
	}
}

// TestGCThroughLibcniWarnsOfNoTypo: libcni (v1.2+) hands a GC the valid
// attachments under two keys, "cni.dev/valid-attachments" and, for the
// spec's earlier wording, "cni.dev/attachments" (its #1101). Neither is
// the operator's: a GC run by the runtime must not log "unknown config
// keys (typo?)". It did on every GC, for the second key.
func TestGCThroughLibcniWarnsOfNoTypo(t *testing.T) {
	agent := newResponder(t)
	d := newDirect(t, "mesh", agent.socket)
	logFile := d.conf["logFile"].(string)
	entry := map[string]any{"type": "ambit-cni", "agentSocket": agent.socket, "logFile": logFile, "logLevel": "warn"}
	conf, _ := json.Marshal(map[string]any{"cniVersion": "1.1.0", "name": "ambit-test", "plugins": []any{entry}})
	list, err := libcni.ConfListFromBytes(conf)
	if err != nil {
		t.Fatal(err)
	}
	cni := libcni.NewCNIConfigWithCacheDir([]string{filepath.Dir(d.bin)}, filepath.Join(d.dir, "cache"), nil)
	args := &libcni.GCArgs{ValidAttachments: []types.GCAttachment{{ContainerID: "keep-1", IfName: "eth0"}}}
	if err := cni.GCNetworkList(context.Background(), list, args); err != nil {
		t.Fatalf("GC through libcni: %v", err)
	}
	if req := agent.last(); req.Op != cniproto.OpGC || len(req.Valid) != 1 || req.Valid[0].ContainerID != "keep-1" {
		t.Fatalf("agent got %+v, want a gc listing keep-1", req)
	}
	b, _ := os.ReadFile(logFile)
	if bytes.Contains(b, []byte("unknown config keys")) {
		t.Fatalf("a GC run by libcni logged its own keys as the operator's typo:\n%s", b)
	}
}
