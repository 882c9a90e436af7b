package agent

import (
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/netnsfind"
	"github.com/ambit-mesh/ambit/node-agent/state"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

// TestRecordsOfAnotherAgent: a record another agent of the node writes
// after this one read the records (an ADD the old agent served during a
// surge upgrade) is adopted; once it is removed by that agent (its DEL)
// the pod is released, but only while another agent runs: a record
// removed by hand does not unserve a pod.
func TestRecordsOfAnotherAgent(t *testing.T) {
	testenv.RequireRoot(t)
	for _, peer := range []bool{true, false} {
		name := map[bool]string{true: "peer", false: "alone"}[peer]
		t.Run(name, func(t *testing.T) {
			h := startAgent(t, "", invAmbient, func(o *Options) { o.Peers = func() bool { return peer } })
			n := newNetns(t, "10.77.0.2/24")
			ino, err := netnsfind.Inode(n.file)
			if err != nil {
				t.Fatal(err)
			}
			store, err := state.Open(h.dir)
			if err != nil {
				t.Fatal(err)
			}
			served := func() bool { // under the pod's lock, as the agent reads it
				unlock := h.a.lock("apps", "late")
				defer unlock()
				p := h.a.podByName("apps/late")
				return p != nil && p.enrolled()
			}
			// What the other agent writes once it has served the ADD.
			rec := state.Pod{Namespace: "apps", Name: "late", UID: "uid-late", ContainerID: "cid-late", Netns: n.path, NetnsInode: ino,
				IPs: []netip.Addr{netip.MustParseAddr("10.77.0.2")}, Enrolled: true, IPv4: true, Identity: "spiffe://cluster.local/ns/apps/sa/default", Since: time.Now()}
			if err := store.Put(rec); err != nil {
				t.Fatal(err)
			}
			eventually(t, "the agent to adopt the other agent's record", func() bool {
				return served() && h.tun.Live() == 1
			})
			// Its own records are not adopted twice.
			if resp, err := h.call(cniproto.OpAdd, "apps", "own", "cid-own", newNetns(t, "10.77.1.2/24"), "10.77.1.2/24"); err != nil || resp.Error != "" {
				t.Fatalf("ADD: %+v %v", resp, err)
			}
			time.Sleep(200 * time.Millisecond)
			if got := h.tun.Live(); got != 2 {
				t.Fatalf("after its own ADD the agent serves %d pods, want 2", got)
			}
			if err := store.Delete("cid-late"); err != nil {
				t.Fatal(err)
			}
			if peer {
				eventually(t, "the pod the other agent deleted to be released", func() bool {
					return !served() && h.tun.Live() == 1
				})
				return
			}
			time.Sleep(300 * time.Millisecond)
			if !served() || h.tun.Live() != 2 {
				t.Fatal("alone on the node, a record removed by hand unserved its pod")
			}
			if _, err := os.Stat(n.path); err != nil {
				t.Fatal(err)
			}
		})
	}
}
