package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/state"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

// TestGCLargeNode: CNI GC on a node with thousands of sandboxes (one
// request well over the old 64 KiB bound) keeps every listed pod and
// forgets the one the runtime no longer lists.
func TestGCLargeNode(t *testing.T) {
	testenv.RequireRoot(t)
	h := startAgent(t, "", invAmbient)
	const enrolled = 3
	for i := range enrolled {
		ip := fmt.Sprintf("10.81.0.%d/24", i+2)
		enrollLikePlugin(t, h, fmt.Sprintf("web-%d", i), newNetns(t, ip), ip)
	}
	if h.tun.Live() != enrolled {
		t.Fatalf("%d pods served before GC, want %d", h.tun.Live(), enrolled)
	}

	// ~3000 sandboxes the agent never heard of (other CNI networks,
	// skipped pods, non-Kubernetes sandboxes), with web-0 and web-1 in
	// the middle; web-2 is gone from the runtime.
	valid := make([]cniproto.Attachment, 0, 3000)
	for i := range 3000 - 2 {
		b := make([]byte, 32)
		rand.Read(b)
		valid = append(valid, cniproto.Attachment{ContainerID: hex.EncodeToString(b), IfName: "eth0"})
		if i == 1000 {
			valid = append(valid, cniproto.Attachment{ContainerID: "cid-web-0", IfName: "eth0"})
		}
	}
	valid = append(valid, cniproto.Attachment{ContainerID: "cid-web-1", IfName: "eth0"})
	req := &cniproto.Request{Version: cniproto.Version, Op: cniproto.OpGC, Valid: valid}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := cniproto.Call(ctx, h.sock, req, nil)
	if err != nil || resp.Error != "" || resp.Decision != cniproto.Skip {
		t.Fatalf("GC of %d attachments: %+v %v", len(valid), resp, err)
	}

	for _, name := range []string{"web-0", "web-1"} {
		if p := h.podNow("apps/" + name); p == nil || !p.enrolled() {
			t.Fatalf("GC forgot %s, which the runtime still lists", name)
		}
	}
	if p := h.a.podByName("apps/web-2"); p != nil {
		t.Fatal("GC kept web-2, which the runtime no longer lists")
	}
	eventually(t, "web-2 no longer served", func() bool { return h.tun.Live() == enrolled-1 })
	store, err := state.Open(h.dir)
	if err != nil {
		t.Fatal(err)
	}
	recs, errs := store.List()
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	kept := map[string]bool{}
	for _, r := range recs {
		kept[r.ContainerID] = true
	}
	if !kept["cid-web-0"] || !kept["cid-web-1"] || kept["cid-web-2"] || len(recs) != enrolled-1 {
		t.Fatalf("records after GC: %v, want cid-web-0 and cid-web-1 only", kept)
	}
	// The unknown IDs created nothing.
	h.a.mu.Lock()
	known := len(h.a.byCID)
	h.a.mu.Unlock()
	if known != enrolled-1 {
		t.Fatalf("agent knows %d sandboxes after GC, want %d", known, enrolled-1)
	}
}
