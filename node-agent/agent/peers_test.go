package agent

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/fsnotify/fsnotify"
	"github.com/vishvananda/netns"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/hostrules"
	"github.com/ambit-mesh/ambit/node-agent/netnsfind"
	"github.com/ambit-mesh/ambit/node-agent/state"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
	"github.com/ambit-mesh/ambit/plugin/redirect"
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

// otherAgentsRecord is the record another agent of the node writes once
// it has served the ADD of pod apps/<name> in n.
func otherAgentsRecord(t *testing.T, name string, n *testNetns, ip string) state.Pod {
	t.Helper()
	ino, err := netnsfind.Inode(n.file)
	if err != nil {
		t.Fatal(err)
	}
	return state.Pod{Namespace: "apps", Name: name, UID: "uid-" + name, ContainerID: "cid-" + name, Netns: n.path, NetnsInode: ino,
		IPs: []netip.Addr{netip.MustParseAddr(ip)}, Enrolled: true, IPv4: true, Identity: "spiffe://cluster.local/ns/apps/sa/default", Since: time.Now()}
}

// known says whether the agent has a sandbox of container ID cid.
func (h *harness) known(cid string) bool {
	h.a.mu.Lock()
	defer h.a.mu.Unlock()
	return h.a.byCID[cid] != nil
}

// TestRecordRemovedAsThePeerExits: the other agent serves a pod's DEL
// (removing its record) and exits within the settle: the pod must be
// released here although no other agent runs by the time the pass looks.
// Whether one ran used to be asked only then, so the pod stayed served
// and its netns held. A record removed by hand once the other agent has
// been gone a while (alone on the node), with no look at the records in
// between, still leaves the pod served.
func TestRecordRemovedAsThePeerExits(t *testing.T) {
	testenv.RequireRoot(t)
	defer func(d time.Duration) { recordPeerCheck = d }(recordPeerCheck)
	recordPeerCheck = 50 * time.Millisecond
	var peer atomic.Bool
	peer.Store(true)
	h := startAgent(t, "", invAmbient, func(o *Options) { o.Peers = peer.Load })
	store, err := state.Open(h.dir)
	if err != nil {
		t.Fatal(err)
	}
	a, b, c := newNetns(t, "10.77.0.2/24"), newNetns(t, "10.77.3.2/24"), newNetns(t, "10.77.4.2/24")
	for _, r := range []state.Pod{otherAgentsRecord(t, "a", a, "10.77.0.2"), otherAgentsRecord(t, "b", b, "10.77.3.2")} {
		if err := store.Put(r); err != nil {
			t.Fatal(err)
		}
	}
	// Adopted, and their rules checked (the repair writes the record
	// again, which makes another pass): no look at the records is due.
	eventually(t, "both records adopted and their rules checked", func() bool {
		ra, erra := store.Read(state.FileName("cid-a"))
		rb, errb := store.Read(state.FileName("cid-b"))
		return h.known("cid-a") && h.known("cid-b") && h.tun.Live() == 2 && erra == nil && errb == nil && ra.Backend != "" && rb.Backend != ""
	})
	time.Sleep(200 * time.Millisecond)
	// The other agent goes without touching the records; a while later
	// a record is removed by hand.
	peer.Store(false)
	time.Sleep(10 * recordPeerCheck)
	if err := store.Delete("cid-b"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	if !h.known("cid-b") || h.tun.Live() != 2 {
		t.Fatal("alone on the node, a record removed by hand unserved its pod")
	}
	// Another agent again (seen at the look after its record of c).
	peer.Store(true)
	if err := store.Put(otherAgentsRecord(t, "c", c, "10.77.4.2")); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the record of c adopted", func() bool { return h.known("cid-c") && h.tun.Live() == 3 })
	// Its DEL of a, then its exit: before the pass runs.
	if err := store.Delete("cid-a"); err != nil {
		t.Fatal(err)
	}
	peer.Store(false)
	eventually(t, "the pod the exiting agent deleted released", func() bool { return !h.known("cid-a") && h.tun.Live() == 2 })
	if !h.known("cid-b") {
		t.Fatal("the pod whose record was removed by hand was released later")
	}
}

// TestReleaseLeavesTheRecord: the release of a pod whose record the
// other agent removed must not remove the record again: the other agent
// may have written it anew right after this agent looked (it owns the
// record's removal), and the pod is then adopted again, not lost by both.
func TestReleaseLeavesTheRecord(t *testing.T) {
	testenv.RequireRoot(t)
	n := newNetns(t, "10.77.0.2/24")
	rec := otherAgentsRecord(t, "a", n, "10.77.0.2")
	var store *state.Store
	var armed, rewrote atomic.Bool
	// Set before the agent runs (it reads the hook).
	releaseChecked = func() {
		if armed.Load() && rewrote.CompareAndSwap(false, true) {
			if err := store.Put(rec); err != nil { // the other agent, a few µs after the check
				t.Error(err)
			}
		}
	}
	h := startAgent(t, "", invAmbient, func(o *Options) { o.Peers = func() bool { return true } })
	t.Cleanup(func() { releaseChecked = nil }) // after the agent stopped (cleanups run last first)
	var err error
	if store, err = state.Open(h.dir); err != nil {
		t.Fatal(err)
	}
	if err := store.Put(rec); err != nil {
		t.Fatal(err)
	}
	// Adopted, and its rules checked: the check's repair writes the
	// record (with the backend it installed).
	eventually(t, "the record adopted and its rules checked", func() bool {
		r, err := store.Read(state.FileName("cid-a"))
		return h.known("cid-a") && h.tun.Live() == 1 && err == nil && r.Backend != ""
	})
	armed.Store(true)
	if err := store.Delete("cid-a"); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the record written again after the check adopted again", func() bool {
		_, err := store.Read(state.FileName("cid-a"))
		return rewrote.Load() && err == nil && h.known("cid-a") && h.tun.Live() == 1
	})
}

// TestWatcherVerifiesOnlyWhatItAdopted: a pass after ready checks the
// rules of the pods it adopted itself and leaves the ones adoption found
// at start to verifyAdopted (it took them all: verifyAdopted then checked
// none, logging 'pods 0', and the watcher was busy with every pod's
// check instead of following the records). What it adopts before
// verifyAdopted took its list is checked with that list.
func TestWatcherVerifiesOnlyWhatItAdopted(t *testing.T) {
	testenv.RequireRoot(t)
	h := startAgent(t, "", invAmbient, func(o *Options) { o.Peers = func() bool { return true } })
	store, err := state.Open(h.dir)
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "verifyAdopted to take its list", func() bool {
		h.a.mu.Lock()
		defer h.a.mu.Unlock()
		return h.a.verifyTaken
	})
	// As if verifyAdopted had not taken its list yet, holding a pod
	// adoption found at start (not enrolled: its check is a no-op).
	startup := &pod{rec: state.Pod{Namespace: "apps", Name: "startup", ContainerID: "cid-startup"}}
	h.a.mu.Lock()
	h.a.verifyTaken = false
	h.a.toVerify = append(h.a.toVerify, startup)
	h.a.mu.Unlock()
	a := newNetns(t, "10.77.0.2/24")
	if err := store.Put(otherAgentsRecord(t, "a", a, "10.77.0.2")); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the record adopted and its pass done", func() bool {
		h.a.mu.Lock()
		defer h.a.mu.Unlock()
		return h.a.byCID["cid-a"] != nil && len(h.a.toVerify) >= 2
	})
	h.a.mu.Lock()
	list := slices.Clone(h.a.toVerify)
	h.a.toVerify, h.a.verifyTaken = nil, true // taken now
	h.a.mu.Unlock()
	if len(list) != 2 || list[0] != startup || list[1].rec.ContainerID != "cid-a" {
		t.Fatalf("verifyAdopted's list after the watcher adopted a pod: %v, want the pod found at start and the adopted one", list)
	}
	// Once verifyAdopted has taken its list, the watcher checks what it
	// adopts: the record's pod has no rules in its netns (the other
	// agent's plugin has not installed them yet), the check installs them.
	b := newNetns(t, "10.77.3.2/24")
	if err := store.Put(otherAgentsRecord(t, "b", b, "10.77.3.2")); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the adopted pod's rules checked and repaired by the watcher", func() bool {
		found, err := h.a.rules.Installed(context.Background(), b.file)
		return h.known("cid-b") && err == nil && len(found) > 0
	})
	h.a.mu.Lock()
	n := len(h.a.toVerify)
	h.a.mu.Unlock()
	if n != 0 {
		t.Fatalf("%d pods left for verifyAdopted after it took its list", n)
	}
}

// TestFollowingRecordsWithoutInotify: the watch cannot be created (the
// inotify instance limit reached: newRecordWatcher fails with the error
// inotify_init1 gives then, until the record written meanwhile was
// adopted). Records are then looked at every recordPoll, and the watch
// is tried again until it is in place; it was tried once, and another
// agent's records were never adopted.
func TestFollowingRecordsWithoutInotify(t *testing.T) {
	testenv.RequireRoot(t)
	// Restored once the agent has stopped: registered before
	// startAgent's cleanup, this one runs after it.
	t.Cleanup(func(p, r, m time.Duration, nw func() (*fsnotify.Watcher, error)) func() {
		return func() { recordPoll, recordWatchRetry, recordWatchRetryMax, newRecordWatcher = p, r, m, nw }
	}(recordPoll, recordWatchRetry, recordWatchRetryMax, newRecordWatcher))
	recordPoll, recordWatchRetry, recordWatchRetryMax = 100*time.Millisecond, 200*time.Millisecond, 400*time.Millisecond
	var refuse atomic.Bool
	refuse.Store(true)
	var tries atomic.Int32
	newRecordWatcher = func() (*fsnotify.Watcher, error) {
		tries.Add(1)
		if refuse.Load() {
			return nil, fmt.Errorf("couldn't initialize inotify: %w", syscall.EMFILE)
		}
		return fsnotify.NewWatcher()
	}
	// The agent is ready only after trying to watch.
	h := startAgent(t, "", invAmbient, func(o *Options) { o.Peers = func() bool { return true } })
	if h.a.watching.Load() {
		t.Fatal("watching though the watch could not be made")
	}
	store, err := state.Open(h.dir)
	if err != nil {
		t.Fatal(err)
	}
	a := newNetns(t, "10.77.0.2/24")
	if err := store.Put(otherAgentsRecord(t, "a", a, "10.77.0.2")); err != nil {
		t.Fatal(err)
	}
	// Still refused: only the poll can see it (a watch made at a retry
	// looks at the directory too).
	eventually(t, "the record adopted though the watch cannot be created", func() bool { return h.known("cid-a") && h.tun.Live() == 1 })
	eventually(t, "the watch tried again", func() bool { return tries.Load() >= 2 })
	refuse.Store(false)
	eventually(t, "the watch in place", func() bool { return h.a.watching.Load() })
	b := newNetns(t, "10.77.3.2/24")
	if err := store.Put(otherAgentsRecord(t, "b", b, "10.77.3.2")); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the record written once watching adopted", func() bool { return h.known("cid-b") && h.tun.Live() == 2 })
	if err := store.Delete("cid-a"); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the pod the other agent deleted released", func() bool { return !h.known("cid-a") && h.tun.Live() == 1 })
}

// TestDelDuringAdoption: a DEL served while the agent re-adopts its pods
// at start, after the records were listed but before that pod's adoption
// ran (the plugin socket is served from the start). The adoption went on
// from the listed record: a lone agent then served a deleted sandbox and
// held its netns until a GC.
func TestDelDuringAdoption(t *testing.T) {
	testenv.RequireRoot(t)
	dir, err := os.MkdirTemp("", "amb-agt-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	store, err := state.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	n := newNetns(t, "10.77.0.2/24")
	rec := otherAgentsRecord(t, "a", n, "10.77.0.2")
	if err := store.Put(rec); err != nil {
		t.Fatal(err)
	}
	var served atomic.Bool
	adoptListed = func(a *Agent) {
		if served.CompareAndSwap(false, true) {
			a.del(&cniproto.Request{Op: cniproto.OpDel, Pod: cniproto.Pod{Namespace: rec.Namespace, Name: rec.Name, UID: rec.UID, ContainerID: rec.ContainerID}})
		}
	}
	defer func() { adoptListed = nil }()
	h := startAgent(t, dir, invAmbient)
	if !served.Load() {
		t.Fatal("the DEL was not served during adoption")
	}
	time.Sleep(200 * time.Millisecond) // the watcher's passes
	if h.known(rec.ContainerID) || h.tun.Live() != 0 {
		t.Fatalf("the sandbox deleted during adoption is served (%d pods)", h.tun.Live())
	}
	if _, err := store.Read(state.FileName(rec.ContainerID)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("its record: %v", err)
	}
}

// installHook is a Redirector whose Install runs fn first.
// delOnInstall makes the agent's next rule install, once store is set,
// remove cid's record first, as another agent of the node serving the
// pod's DEL would (deleted says it happened).
func delOnInstall(t *testing.T, o *Options, store *atomic.Pointer[state.Store], deleted *atomic.Bool, cid string) {
	o.Peers = func() bool { return true }
	b, err := redirect.ParseBackend(o.Config.RedirectBackend)
	if err != nil {
		t.Fatal(err)
	}
	o.Rules = installHook{Rules: Rules{Backend: b}, fn: func() {
		if s := store.Load(); s != nil && deleted.CompareAndSwap(false, true) {
			s.Delete(cid)
		}
	}}
}

type installHook struct {
	Rules
	fn func()
}

func (r installHook) Install(ctx context.Context, f *os.File, b redirect.Backend, spec redirect.Spec) (string, error) {
	r.fn()
	return r.Rules.Install(ctx, f, b, spec)
}

// TestRepairLeavesARemovedRecordRemoved: the other agent serves the DEL
// of a pod (removing its record) while this agent repairs the pod's
// rules. The repair wrote the record back with its backend, so the
// removal was never seen: the pod stayed served here, its netns held,
// and its record left for the next agent to adopt.
func TestRepairLeavesARemovedRecordRemoved(t *testing.T) {
	testenv.RequireRoot(t)
	n := newNetns(t, "10.77.0.2/24")
	rec := otherAgentsRecord(t, "a", n, "10.77.0.2")
	var store atomic.Pointer[state.Store]
	var deleted atomic.Bool
	h := startAgent(t, "", invAmbient, func(o *Options) {
		delOnInstall(t, o, &store, &deleted, rec.ContainerID)
	})
	s, err := state.Open(h.dir)
	if err != nil {
		t.Fatal(err)
	}
	// No rules in the pod's netns yet: the check of the adopted pod
	// repairs them.
	if err := s.Put(rec); err != nil {
		t.Fatal(err)
	}
	store.Store(s)
	eventually(t, "the pod released, its record left removed", func() bool {
		_, err := s.Read(state.FileName(rec.ContainerID))
		return deleted.Load() && errors.Is(err, os.ErrNotExist) && !h.known(rec.ContainerID) && h.tun.Live() == 0
	})
}

// TestLabelFlipLeavesARemovedRecordRemoved: the other agent serves the
// DEL of a pod (removing its record) while this agent enrolls it live
// after a namespace label. The enrollment wrote the record back, so the
// removal was never seen: the pod stayed served here, its netns held,
// and its record left for the next agent to adopt.
func TestLabelFlipLeavesARemovedRecordRemoved(t *testing.T) {
	testenv.RequireRoot(t)
	var store atomic.Pointer[state.Store]
	var deleted, seen atomic.Bool
	const cid = "cid-flip"
	// Set before the agent runs (it reads the hook).
	recordsLooked = func(now map[string]bool) {
		if now[state.FileName(cid)] {
			seen.Store(true)
		}
	}
	h := startAgent(t, "", invPlain, func(o *Options) {
		delOnInstall(t, o, &store, &deleted, cid)
	})
	t.Cleanup(func() { recordsLooked = nil }) // after the agent stopped (cleanups run last first)
	pod, _ := newPair(t, "10.64.0.2", "10.64.0.1")
	resp, err := h.call(cniproto.OpAdd, "apps", "web", cid, pod, "10.64.0.2/24")
	if err != nil || resp.Decision != cniproto.Skip {
		t.Fatalf("ADD in a plain namespace: %+v %v", resp, err)
	}
	// The record the ADD wrote has been seen: only a removal of a record
	// seen is taken for the other agent's DEL.
	eventually(t, "the follower saw the pod's record", seen.Load)
	s, err := state.Open(h.dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Read(state.FileName(cid)); err != nil {
		t.Fatalf("no record after the ADD: %v", err)
	}
	store.Store(s)
	h.writeInventory(invAmbient)
	if err := h.inv.Reload(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the pod released, its record left removed", func() bool {
		_, err := s.Read(state.FileName(cid))
		return deleted.Load() && errors.Is(err, os.ErrNotExist) && !h.known(cid) && h.tun.Live() == 0
	})
}
