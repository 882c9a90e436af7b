package agent

import (
	"context"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/admin"
	"github.com/ambit-mesh/ambit/node-agent/hostrules"
	"github.com/ambit-mesh/ambit/node-agent/state"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

// TestAddReleasesItsPodsFoundSandboxElsewhere: live enrollment found
// apps/web by its IP (found:apps/web) in one namespace; the sandbox was
// then recreated. The runtime's DEL of the old one named a container ID
// the agent never knew and no netns (gone), so it matched nothing (as
// documented: it does not show it is that sandbox), and the old
// namespace's bind mount went. The ADD of the new sandbox, in another
// namespace, of the same pod or of a pod made again under its name
// (another UID), says which sandbox the pod has now: once that one
// serves, the found one is let go, its listeners, netns fd, claim,
// record and host entry. Before, it stayed served beside the new one
// (2 servings) and outlived the new sandbox's DEL too, holding the old
// namespace alive until the agent restarted.
func TestAddReleasesItsPodsFoundSandboxElsewhere(t *testing.T) {
	testenv.RequireRoot(t)
	for _, tc := range []struct{ name, uid string }{
		{"same pod", "uid-web"},
		{"pod made again", "uid-web-2"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			hr, _ := testHostRules(t, hostrules.Config{})
			old := newNetns(t, "10.73.0.2/24")
			h := startAgent(t, "", invFound, func(o *Options) { o.Host = hr })
			waitFound(t, h)

			delPod(t, h, "uid-web", "cid-old", "", nil)
			old.file.Close()
			if err := netns.DeleteNamed(old.name); err != nil {
				t.Fatal(err)
			}

			n := newNetns(t, "10.73.0.3/24")
			req := &cniproto.Request{Version: cniproto.Version, Op: cniproto.OpAdd,
				Pod: cniproto.Pod{Namespace: "apps", Name: "web", UID: tc.uid, ContainerID: "cid-new", Netns: n.path,
					IPs: []netip.Prefix{netip.MustParsePrefix("10.73.0.3/24")}}}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			resp, err := cniproto.Call(ctx, h.sock, req, n.file)
			cancel()
			if err != nil || resp.Decision != cniproto.Enroll {
				t.Fatalf("ADD of the new sandbox: %+v %v", resp, err)
			}
			answered := time.Now()
			if !within(5*time.Second, func() bool {
				cids, claims, recs := agentHolds(t, h)
				return h.tun.Live() == 1 && len(cids) == 1 && claims == 1 && len(recs) == 1
			}) {
				cids, claims, recs := agentHolds(t, h)
				t.Errorf("after the ADD: %d servings, sandboxes %v, %d claims, records %v; want 1, [cid-new], 1, [cid-new]", h.tun.Live(), cids, claims, recs)
			} else {
				t.Logf("the found sandbox let go %v after the ADD's answer", time.Since(answered).Round(time.Millisecond))
			}
			if p := served(h); p == nil || p.rec.ContainerID != "cid-new" || p.rec.NetnsInode != inodeOfNetns(t, n) {
				t.Errorf("apps/web served by %+v, want its ADD's sandbox cid-new", p)
			}
			if _, err := h.a.store.Read(state.FileName(foundPrefix + "apps/web")); err == nil {
				t.Errorf("the found: record is still there")
			}
			if st := adminPodOf(t, h, "web"); st.State != admin.StateEnrolled || st.ContainerID != "cid-new" {
				t.Errorf("status of apps/web: %s %s %s %q; want enrolled as cid-new", st.State, st.ContainerID, st.Reason, st.Message)
			}
			want := map[netip.Addr]string{netip.MustParseAddr("10.73.0.3"): tc.uid}
			if !within(5*time.Second, func() bool { return sameOwners(hr.Entries(), want) }) {
				t.Errorf("host entries %v, want %v (the old sandbox's gone, the new one's kept)", hr.Entries(), want)
			}
			if err := listenersAnswer(t, n); err != nil {
				t.Errorf("the new sandbox's listeners: %v", err)
			}

			delPod(t, h, tc.uid, "cid-new", n.path, n.file)
			if !within(5*time.Second, func() bool {
				cids, claims, recs := agentHolds(t, h)
				return h.tun.Live() == 0 && len(cids) == 0 && claims == 0 && len(recs) == 0
			}) {
				cids, claims, recs := agentHolds(t, h)
				t.Fatalf("after the new sandbox's DEL: %d servings, sandboxes %v, %d claims, records %v; want none", h.tun.Live(), cids, claims, recs)
			}
			if e := hr.Entries(); len(e) != 0 {
				t.Errorf("host entries after the DEL: %v", e)
			}
		})
	}
}

// delPod sends a DEL of apps/web (pod UID uid) for container cid naming
// netns path, with f as the netns it brings (nil: none).
func delPod(t *testing.T, h *harness, uid, cid, path string, f *os.File) {
	t.Helper()
	req := &cniproto.Request{Version: cniproto.Version, Op: cniproto.OpDel, Pod: cniproto.Pod{Namespace: "apps", Name: "web", UID: uid, ContainerID: cid, Netns: path}}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := cniproto.Call(ctx, h.sock, req, f)
	if err != nil || resp.Error != "" {
		t.Fatalf("DEL %s: %+v %v", cid, resp, err)
	}
}
