package agent

import (
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/hostrules"
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

// TestOldSandboxReleasedAfterItsSuccessor: a pod's sandbox restarted
// (kubelet: DEL of the old sandbox, ADD of a new one) during a surge
// upgrade, the new sandbox with the old one's IP (IPAM handing a pod its
// address back). The old sandbox is released by this agent only when it
// notices the other agent removed its record, after the new sandbox is
// served here: that release must not take the host probe entry the new
// sandbox holds (entries are owned by pod UID, the same for both). It
// did: the probe SNAT of the running pod was gone from the kernel and
// from this agent's picture, so its reconcile never put it back.
func TestOldSandboxReleasedAfterItsSuccessor(t *testing.T) {
	testenv.RequireRoot(t)
	for _, mode := range []string{"new sandbox served here", "both served by the other agent"} {
		t.Run(mode, func(t *testing.T) {
			hostNS := newNetns(t)
			hr, err := hostrules.New(hostrules.Config{Backend: hostrules.BackendNFTables, NetNS: netns.NsHandle(hostNS.file.Fd()), Interval: time.Hour, Logger: quietLogger()})
			if err != nil {
				t.Fatal(err)
			}
			h := startAgent(t, "", invAmbient, func(o *Options) { o.Host = hr; o.Peers = func() bool { return true } })
			store, err := state.Open(h.dir)
			if err != nil {
				t.Fatal(err)
			}
			ip := netip.MustParseAddr("10.79.0.2")
			record := func(cid string, n *testNetns) state.Pod {
				ino, err := netnsfind.Inode(n.file)
				if err != nil {
					t.Fatal(err)
				}
				return state.Pod{Namespace: "apps", Name: "web", UID: "uid-web", ContainerID: cid, Netns: n.path, NetnsInode: ino,
					IPs: []netip.Addr{ip}, Enrolled: true, IPv4: true, Identity: "spiffe://cluster.local/ns/apps/sa/web-sa", Since: time.Now()}
			}
			hostEntry := func() bool {
				out, err := exec.Command("ip", "netns", "exec", hostNS.name, "nft", "list", "table", "inet", "ambit-host").CombinedOutput()
				return err == nil && strings.Contains(string(out), ip.String()) && hr.Entries()[ip] == "uid-web"
			}
			old, neu := newNetns(t, "10.79.0.2/24"), newNetns(t, "10.79.0.2/24")
			// The old sandbox, enrolled by the other agent.
			if err := store.Put(record("cid-old", old)); err != nil {
				t.Fatal(err)
			}
			eventually(t, "the old sandbox adopted", func() bool { return h.tun.Live() == 1 && hostEntry() })
			if mode == "new sandbox served here" {
				if resp, err := h.call(cniproto.OpAdd, "apps", "web", "cid-new", neu, "10.79.0.2/24"); err != nil || resp.Error != "" {
					t.Fatalf("ADD of the new sandbox: %+v %v", resp, err)
				}
			} else if err := store.Put(record("cid-new", neu)); err != nil {
				t.Fatal(err)
			}
			// The other agent's DEL of the old sandbox.
			if err := store.Delete("cid-old"); err != nil {
				t.Fatal(err)
			}
			eventually(t, "the old sandbox released, the new one served", func() bool {
				h.a.mu.Lock()
				_, oldKnown := h.a.byCID["cid-old"]
				_, newKnown := h.a.byCID["cid-new"]
				h.a.mu.Unlock()
				return !oldKnown && newKnown && h.tun.Live() == 1
			})
			time.Sleep(100 * time.Millisecond) // the release's host-rule removal runs in the background
			if !hostEntry() {
				out, _ := exec.Command("ip", "netns", "exec", hostNS.name, "nft", "list", "table", "inet", "ambit-host").CombinedOutput()
				t.Fatalf("the new sandbox's host probe entry is gone (picture %v):\n%s", hr.Entries(), out)
			}
		})
	}
}

// TestRecordsDirReplaced: the records directory removed or moved away and
// a new one made at its path (by hand, a state volume recreated). The
// watch stayed with the old directory, so records another agent wrote to
// the new one were never adopted; and the pods whose records stayed
// behind in the old one must not be released as deleted.
func TestRecordsDirReplaced(t *testing.T) {
	testenv.RequireRoot(t)
	defer func(d time.Duration) { recordRewatch = d }(recordRewatch)
	recordRewatch = 50 * time.Millisecond
	h := startAgent(t, "", invAmbient, func(o *Options) { o.Peers = func() bool { return true } })
	own := newNetns(t, "10.77.1.2/24")
	if resp, err := h.call(cniproto.OpAdd, "apps", "own", "cid-own", own, "10.77.1.2/24"); err != nil || resp.Error != "" {
		t.Fatalf("ADD: %+v %v", resp, err)
	}
	time.Sleep(200 * time.Millisecond) // the pass after its own record: done
	pods := filepath.Join(h.dir, "pods")
	if err := os.Rename(pods, pods+".old"); err != nil {
		t.Fatal(err)
	}
	store, err := state.Open(h.dir) // the new directory
	if err != nil {
		t.Fatal(err)
	}
	n := newNetns(t, "10.77.0.2/24")
	ino, err := netnsfind.Inode(n.file)
	if err != nil {
		t.Fatal(err)
	}
	rec := state.Pod{Namespace: "apps", Name: "late", UID: "uid-late", ContainerID: "cid-late", Netns: n.path, NetnsInode: ino,
		IPs: []netip.Addr{netip.MustParseAddr("10.77.0.2")}, Enrolled: true, IPv4: true, Identity: "spiffe://cluster.local/ns/apps/sa/default", Since: time.Now()}
	if err := store.Put(rec); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the record written to the new directory adopted", func() bool {
		p := h.a.podByName("apps/late")
		return p != nil && h.tun.Live() == 2
	})
	// Records written to the new directory afterwards are followed too.
	if resp, err := h.call(cniproto.OpAdd, "apps", "own2", "cid-own2", newNetns(t, "10.77.2.2/24"), "10.77.2.2/24"); err != nil || resp.Error != "" {
		t.Fatalf("ADD: %+v %v", resp, err)
	}
	if err := store.Delete("cid-late"); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the pod the other agent deleted in the new directory released", func() bool {
		return h.a.podByName("apps/late") == nil && h.tun.Live() == 2
	})
	if h.a.podByName("apps/own") == nil {
		t.Fatal("the pod whose record stayed in the old directory was released")
	}
}
