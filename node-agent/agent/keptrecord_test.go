package agent

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/admin"
	"github.com/ambit-mesh/ambit/node-agent/cluster"
	"github.com/ambit-mesh/ambit/node-agent/inventory"
	"github.com/ambit-mesh/ambit/node-agent/state"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

// invWebOther lists apps/web and apps/other by the UIDs their ADDs carry
// (h.call: uid-<name>).
const invWebOther = `namespaces:
  - name: apps
    labels: {ambit.dev/dataplane-mode: ambient}
workloads:
  - namespace: apps
    name: other
    uid: uid-other
  - namespace: apps
    name: web
    uid: uid-web
`

// hasRecord tells whether the agent's store holds the record of cid.
func hasRecord(t *testing.T, h *harness, cid string) bool {
	t.Helper()
	_, err := h.a.store.Read(state.FileName(cid))
	return err == nil
}

// TestRecordOfDeletedPodIsRemoved: apps/web's sandbox went while no agent
// ran, and its IP is apps/other's now. Re-adoption refuses the other
// pod's namespace and keeps web's record (as before, while web exists:
// its status says why). Before, nothing ever looked at that record again
// once web was deleted: it stayed on disk for good, adopted and refused
// again at every restart, its Warning Event repeated for a pod that no
// longer exists. Now a kept record whose netns is gone is removed once
// its pod is gone from the view: at the pod's deletion, or at adoption
// when it went while no agent ran. apps/other is left as it is.
func TestRecordOfDeletedPodIsRemoved(t *testing.T) {
	testenv.RequireRoot(t)
	for _, tc := range []struct {
		name      string
		whileDown bool // deleted while no agent ran
	}{
		{"deleted after the restart", false},
		{"deleted while no agent ran", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := agentDir(t)
			h1 := startAgent(t, dir, invWebOther)
			wn := newNetns(t, "10.89.5.3/24")
			on := newNetns(t, "10.89.5.3/24")
			enrollLikePlugin(t, h1, "web", wn, "10.89.5.3/24")
			enrollLikePlugin(t, h1, "other", on, "10.89.5.3/24")
			h1.stop()
			wn.file.Close()
			if err := netns.DeleteNamed(wn.name); err != nil {
				t.Fatal(err)
			}

			var gone []string
			if tc.whileDown {
				gone = []string{"apps/web"}
			}
			var v *apiView
			h := startAgent(t, dir, invWebOther, func(o *Options) { v = newAPIView(o, gone...) })
			if !tc.whileDown {
				notServed(t, h, "web", map[uint64]string{inodeOfNetns(t, on): "apps/other's"})
				if st := adminPodOf(t, h, "web"); st.State != admin.StateFailed || st.Reason != eventNetnsOwner {
					t.Errorf("status of apps/web: %s %s %q; want failed %s", st.State, st.Reason, st.Message, eventNetnsOwner)
				}
				if !hasRecord(t, h, "cid-web") {
					t.Fatal("the record of apps/web, which still exists, was removed at its refusal")
				}
				v.delete("apps", "web")
			}
			if !within(5*time.Second, func() bool { return !hasRecord(t, h, "cid-web") }) {
				t.Errorf("the record of apps/web (deleted, its netns gone) is still on disk")
			}
			if !hasRecord(t, h, "cid-other") {
				t.Error("the record of apps/other was removed")
			}
			if p := h.podNow("apps/other"); p == nil || !p.enrolled() || p.rec.NetnsInode != inodeOfNetns(t, on) {
				t.Errorf("apps/other: %+v, want served in its namespace", p)
			}
			if n := h.tun.Live(); n != 1 {
				t.Errorf("%d servings, want 1 (apps/other's)", n)
			}
		})
	}
}

// apiView is the inventory as an API-backed view (not static), whose
// pods can be deleted: then unknown (not "not in the mesh", as the
// inventory answers any pod of a namespace it lists) and announced.
type apiView struct {
	*inventory.Source
	mu   sync.Mutex
	gone map[string]bool
	subs []func(cluster.Event)
}

func newAPIView(o *Options, gone ...string) *apiView {
	v := &apiView{Source: o.View.(*inventory.Source), gone: map[string]bool{}}
	for _, k := range gone {
		v.gone[k] = true
	}
	o.View = v
	return v
}

func (*apiView) Static() bool { return false }

func (v *apiView) isGone(namespace, name string) bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.gone[namespace+"/"+name]
}

func (v *apiView) Pod(ctx context.Context, namespace, name string) (cluster.Pod, bool, error) {
	if v.isGone(namespace, name) {
		return cluster.Pod{}, false, nil
	}
	return v.Source.Pod(ctx, namespace, name)
}

func (v *apiView) LocalPods() []cluster.Pod {
	return slices.DeleteFunc(v.Source.LocalPods(), func(p cluster.Pod) bool { return v.isGone(p.Namespace, p.Name) })
}

func (v *apiView) Subscribe(fn func(cluster.Event)) {
	v.mu.Lock()
	v.subs = append(v.subs, fn)
	v.mu.Unlock()
	v.Source.Subscribe(fn)
}

// delete deletes pod namespace/name from the API, as an informer sees it.
func (v *apiView) delete(namespace, name string) {
	v.mu.Lock()
	v.gone[namespace+"/"+name] = true
	subs := slices.Clone(v.subs)
	v.mu.Unlock()
	for _, fn := range subs {
		fn(cluster.Event{Kind: cluster.PodDeleted, Namespace: namespace, Name: name})
	}
}

// TestFoundSandboxOfDeletedPodIsForgotten: apps/web, found by live
// enrollment, is deleted from the API; the runtime's DEL of its sandbox
// cannot be counted on to name it (no container ID; no netns once gone).
// Before, the deletion closed its listeners but left it registered and
// its found: record on disk until a restart (and, its netns path still
// opening, adopted again then). Now it is forgotten at the deletion.
func TestFoundSandboxOfDeletedPodIsForgotten(t *testing.T) {
	testenv.RequireRoot(t)
	n := newNetns(t, "10.73.0.2/24")
	var v *apiView
	h := startAgent(t, "", invFound, func(o *Options) { v = newAPIView(o) })
	waitFound(t, h)
	v.delete("apps", "web")
	if !within(5*time.Second, func() bool {
		cids, claims, recs := agentHolds(t, h)
		return h.tun.Live() == 0 && len(cids) == 0 && claims == 0 && len(recs) == 0
	}) {
		cids, claims, recs := agentHolds(t, h)
		t.Fatalf("after apps/web was deleted: %d servings, sandboxes %v, %d claims, records %v; want none", h.tun.Live(), cids, claims, recs)
	}
	if _, err := dialIn(n, "127.0.0.1:15001"); err == nil {
		t.Error("a listener is still open in the namespace after the pod's deletion")
	}
}

// TestGCKeepsAKeptRecordTheRuntimeLists: apps/web's record, kept
// unserved at re-adoption (its netns gone, its IP apps/other's now), is
// not the agent's to drop while the runtime still lists its container:
// CNI GC naming cid-web leaves it on disk (and kept); a GC that no
// longer names it removes it. apps/other is served throughout.
func TestGCKeepsAKeptRecordTheRuntimeLists(t *testing.T) {
	testenv.RequireRoot(t)
	dir := agentDir(t)
	h1 := startAgent(t, dir, invWebOther)
	wn := newNetns(t, "10.89.6.3/24")
	on := newNetns(t, "10.89.6.3/24")
	enrollLikePlugin(t, h1, "web", wn, "10.89.6.3/24")
	enrollLikePlugin(t, h1, "other", on, "10.89.6.3/24")
	h1.stop()
	wn.file.Close()
	if err := netns.DeleteNamed(wn.name); err != nil {
		t.Fatal(err)
	}

	h := startAgent(t, dir, invWebOther)
	notServed(t, h, "web", map[uint64]string{inodeOfNetns(t, on): "apps/other's"})
	gc := func(cids ...string) {
		t.Helper()
		var valid []cniproto.Attachment
		for _, cid := range cids {
			valid = append(valid, cniproto.Attachment{ContainerID: cid, IfName: "eth0"})
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		resp, err := cniproto.Call(ctx, h.sock, &cniproto.Request{Version: cniproto.Version, Op: cniproto.OpGC, Valid: valid}, nil)
		if err != nil || resp.Error != "" {
			t.Fatalf("GC %v: %+v %v", cids, resp, err)
		}
	}
	isKept := func() bool {
		h.a.mu.Lock()
		defer h.a.mu.Unlock()
		return h.a.kept["apps/web"]["cid-web"]
	}

	gc("cid-web", "cid-other")
	if !hasRecord(t, h, "cid-web") || !isKept() {
		t.Fatalf("GC listing cid-web removed its record (on disk %v, kept %v)", hasRecord(t, h, "cid-web"), isKept())
	}
	gc("cid-other")
	if hasRecord(t, h, "cid-web") || isKept() {
		t.Errorf("GC no longer listing cid-web left its record (on disk %v, kept %v)", hasRecord(t, h, "cid-web"), isKept())
	}
	if !hasRecord(t, h, "cid-other") {
		t.Error("the record of apps/other was removed")
	}
	if p := h.podNow("apps/other"); p == nil || !p.enrolled() || p.rec.NetnsInode != inodeOfNetns(t, on) {
		t.Errorf("apps/other: %+v, want served in its namespace", p)
	}
}
