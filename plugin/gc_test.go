package main

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/ambit-mesh/ambit/plugin/cniproto/cniprototest"

	"github.com/ambit-mesh/ambit/plugin/cniproto"
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
// differ. A small GC still works with it.
func TestGCOldAgent(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "old.sock")
	cniprototest.Serve(t, socket, cniprototest.OldAgent)
	d := newDirect(t, "mesh", socket)
	_, e := d.run("GC", gcWith(sandboxIDs(1500)))
	wantCode(t, "big GC to an old agent", e, cniproto.CodeRefused, "ambit-agent: request exceeds 65536 bytes")
	for _, want := range []string{"lists 1500 attachments", "agent and plugin versions differ", "upgrade ambit-agent"} {
		if !strings.Contains(e.Msg, want) {
			t.Errorf("error %q lacks %q", e.Msg, want)
		}
	}
	if _, e := d.run("GC", gcWith(sandboxIDs(100))); e != nil {
		t.Fatalf("small GC to an old agent: %v", e)
	}
}
