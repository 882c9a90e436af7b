package agent

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/vishvananda/netns"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/admin"
	"github.com/ambit-mesh/ambit/node-agent/cluster"
	"github.com/ambit-mesh/ambit/node-agent/hostrules"
	"github.com/ambit-mesh/ambit/node-agent/inventory"
	"github.com/ambit-mesh/ambit/node-agent/netnsfind"
	"github.com/ambit-mesh/ambit/node-agent/state"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

// staleLocalView is the cluster view naming, for one pod running on this
// node (listed among the local pods, so the reconcile's live enrollment
// looks for it), its UID and IPs that may be stale: a previous sandbox's,
// given since to another pod. set makes the view fresh.
type staleLocalView struct {
	*inventory.Source
	name string
	mu   sync.Mutex
	uid  string
	ips  []netip.Addr
}

func (v *staleLocalView) set(ips ...netip.Addr) {
	v.mu.Lock()
	v.ips = ips
	v.mu.Unlock()
}

func (v *staleLocalView) fix(p cluster.Pod) cluster.Pod {
	if p.Namespace+"/"+p.Name == v.name {
		v.mu.Lock()
		p.UID, p.IPs = v.uid, append([]netip.Addr(nil), v.ips...)
		v.mu.Unlock()
	}
	return p
}

func (v *staleLocalView) Pod(ctx context.Context, namespace, name string) (cluster.Pod, bool, error) {
	p, ok, err := v.Source.Pod(ctx, namespace, name)
	return v.fix(p), ok, err
}

func (v *staleLocalView) LocalPods() []cluster.Pod {
	ps := v.Source.LocalPods()
	for i := range ps {
		ps[i] = v.fix(ps[i])
	}
	return ps
}

// settled waits (15 s at most) for apps/name's live enrollment to end one
// way or the other: served, or its failure noted in status.
func settled(t *testing.T, h *harness, name string) admin.Pod {
	t.Helper()
	var st admin.Pod
	for end := time.Now().Add(15 * time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if st = adminPodOf(t, h, name); st.State == admin.StateFailed || st.State == admin.StateEnrolled {
			break
		}
	}
	return st
}

func inodeOfNetns(t *testing.T, n *testNetns) uint64 {
	t.Helper()
	ino, err := netnsfind.Inode(n.file)
	if err != nil {
		t.Fatal(err)
	}
	return ino
}

// notServed fails t if apps/name is served, saying in which namespace.
func notServed(t *testing.T, h *harness, name string, others map[uint64]string) {
	t.Helper()
	p := h.podNow("apps/" + name)
	var ino uint64
	enrolled := p != nil && p.enrolled()
	if p != nil {
		ino = p.rec.NetnsInode
	}
	if enrolled {
		t.Errorf("apps/%s is served, in netns inode %d (%s)", name, ino, others[ino])
	}
}

// TestLiveEnrollNeverTakesAnotherPodsNetns: the view names for apps/web
// (UID uid-web, running on this node) its previous sandbox's IP,
// 10.89.2.3, given since to apps/other, enrolled here at ADD. The live
// enrollment finds 10.89.2.3 in apps/other's namespace only; it must not
// serve web there, nor take other's host probe entry: web stays
// unserved, status says why (failed: NetnsOfAnotherPod, naming
// apps/other), and once the view names web's own sandbox (10.89.2.2) the
// next pass enrolls it there. Before, the pass served found:apps/web in
// apps/other's namespace, web's identity on other's traffic, and the
// host entry for 10.89.2.3 passed to uid-web.
func TestLiveEnrollNeverTakesAnotherPodsNetns(t *testing.T) {
	testenv.RequireRoot(t)
	hr, _ := testHostRules(t, hostrules.Config{})
	stale, own := netip.MustParseAddr("10.89.2.3"), netip.MustParseAddr("10.89.2.2")
	var view *staleLocalView
	h := startAgent(t, "", invAmbient, func(o *Options) {
		o.Host = hr
		// No IP until apps/other is enrolled: the agent's first pass
		// must not find web in other's namespace before its ADD.
		view = &staleLocalView{Source: o.View.(*inventory.Source), name: "apps/web", uid: "uid-web"}
		o.View = view
	})
	on := newNetns(t, "10.89.2.3/24")
	if resp, err := h.call(cniproto.OpAdd, "apps", "other", "cid-other", on, "10.89.2.3/24"); err != nil || resp.Decision != cniproto.Enroll {
		t.Fatalf("ADD apps/other: %+v %v", resp, err)
	}
	view.set(stale)
	h.a.Resync()
	st := settled(t, h, "web")
	t.Logf("apps/web after a pass with the stale IP: %s %s: %s", st.State, st.Reason, st.Message)
	notServed(t, h, "web", map[uint64]string{inodeOfNetns(t, on): "apps/other's"})
	if n := h.tun.Live(); n != 1 {
		t.Errorf("%d servings, want 1 (apps/other's)", n)
	}
	if st.State != admin.StateFailed || st.Reason != eventNetnsOwner || !strings.Contains(st.Message, "apps/other") {
		t.Errorf("status of apps/web: %s %s %q; want failed %s naming apps/other", st.State, st.Reason, st.Message, eventNetnsOwner)
	}
	if got, want := hr.Entries(), map[netip.Addr]string{stale: "uid-other"}; !sameOwners(got, want) {
		t.Errorf("host entries: %v, want %v", got, want)
	}
	if v := testutil.ToFloat64(h.a.m.failures.WithLabelValues(reasonNetnsOwner)); v < 1 {
		t.Errorf("enrollment failures for %s: %v, want at least 1", reasonNetnsOwner, v)
	}

	// The view fresh: web's own sandbox.
	wn := newNetns(t, "10.89.2.2/24")
	view.set(own)
	h.a.Resync()
	eventually(t, "apps/web enrolled once the view names its own IP", func() bool {
		st = adminPodOf(t, h, "web")
		return st.State == admin.StateEnrolled
	})
	if p := h.podNow("apps/web"); p == nil || p.rec.NetnsInode != inodeOfNetns(t, wn) {
		t.Errorf("apps/web served in %+v, want its own namespace", p)
	}
	if got, want := hr.Entries(), map[netip.Addr]string{stale: "uid-other", own: "uid-web"}; !sameOwners(got, want) {
		t.Errorf("host entries: %v, want %v", got, want)
	}
}

// TestReadoptionNeverTakesAnotherPodsNetns: apps/web (10.89.3.3) and
// apps/other were enrolled at ADD; the agent stopped, and web's sandbox
// went while no agent ran (its DEL never came), other's holding
// 10.89.3.3 now. The next agent's re-adoption looks for web's record by
// its IP and finds other's namespace only: other's record names it, so
// web is not adopted there; status says why. Before, web was adopted in
// other's namespace: two servings, web's identity on other's traffic.
func TestReadoptionNeverTakesAnotherPodsNetns(t *testing.T) {
	testenv.RequireRoot(t)
	dir := agentDir(t)
	h1 := startAgent(t, dir, invAmbient)
	wn := newNetns(t, "10.89.3.3/24")
	on := newNetns(t, "10.89.3.3/24")
	enrollLikePlugin(t, h1, "web", wn, "10.89.3.3/24")
	enrollLikePlugin(t, h1, "other", on, "10.89.3.3/24")
	h1.stop()
	wn.file.Close()
	if err := netns.DeleteNamed(wn.name); err != nil {
		t.Fatal(err)
	}

	h := startAgent(t, dir, invAmbient)
	notServed(t, h, "web", map[uint64]string{inodeOfNetns(t, on): "apps/other's"})
	if p := h.podNow("apps/other"); p == nil || !p.enrolled() || p.rec.NetnsInode != inodeOfNetns(t, on) {
		t.Errorf("apps/other after the re-adoption: %+v, want served in its namespace", p)
	}
	if n := h.tun.Live(); n != 1 {
		t.Errorf("%d servings, want 1 (apps/other's)", n)
	}
	st := adminPodOf(t, h, "web")
	t.Logf("apps/web after the re-adoption: %s %s: %s", st.State, st.Reason, st.Message)
	if st.State != admin.StateFailed || st.Reason != eventNetnsOwner || !strings.Contains(st.Message, "apps/other") {
		t.Errorf("status of apps/web: %s %s %q; want failed %s naming apps/other", st.State, st.Reason, st.Message, eventNetnsOwner)
	}
}

// podCgroupProcess runs a process in n inside a kubelet pod cgroup
// naming uid (cgroupfs driver's spelling, .../kubepods-*/besteffort/pod<uid>),
// removed at cleanup: a pod's pause process, as netnsfind sees it.
func podCgroupProcess(t *testing.T, n *testNetns, uid string) {
	t.Helper()
	var base string
	for _, c := range []string{"/sys/fs/cgroup/pids", "/sys/fs/cgroup/unified", "/sys/fs/cgroup"} {
		if _, err := os.Stat(c + "/cgroup.procs"); err == nil {
			base = c
			break
		}
	}
	if base == "" {
		t.Fatal("no cgroup hierarchy to put a process in")
	}
	top := base + "/kubepods-amb-" + suffix()
	dir := top + "/besteffort/pod" + uid
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("ip", "netns", "exec", n.name, "sleep", "300")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		cmd.Wait()
		for _, d := range []string{dir, top + "/besteffort", top} {
			os.Remove(d)
		}
	})
	if err := os.WriteFile(dir+"/cgroup.procs", []byte(strconv.Itoa(cmd.Process.Pid)), 0o644); err != nil {
		t.Fatal(err)
	}
	want := inodeOfNetns(t, n)
	eventually(t, "the process in its namespace", func() bool {
		var st syscall.Stat_t
		return syscall.Stat(fmt.Sprintf("/proc/%d/ns/net", cmd.Process.Pid), &st) == nil && st.Ino == want
	})
}

// TestLiveEnrollRefusesNetnsOfAnotherPodsCgroup: the view's IP for
// apps/web is in one namespace only, one this agent knows nothing of
// (no record, not served), whose process runs in the kubelet cgroup of
// another pod UID. It is that pod's, not web's: not served, status says
// why, naming that UID. Before, web was served there.
func TestLiveEnrollRefusesNetnsOfAnotherPodsCgroup(t *testing.T) {
	testenv.RequireRoot(t)
	const webUID, otherUID = "3f0d6a52-9c1e-4b7a-8d2f-0a1b2c3d4e5f", "8e2b7c14-5d3a-4f6e-9b1c-f0e1d2c3b4a5"
	// The other pod runs before the agent starts: its first pass looks.
	on := newNetns(t, "10.89.4.3/24")
	podCgroupProcess(t, on, otherUID)
	h := startAgent(t, "", invAmbient, func(o *Options) {
		o.View = &staleLocalView{Source: o.View.(*inventory.Source), name: "apps/web", uid: webUID,
			ips: []netip.Addr{netip.MustParseAddr("10.89.4.3")}}
	})
	h.a.Resync()
	st := settled(t, h, "web")
	t.Logf("apps/web: %s %s: %s", st.State, st.Reason, st.Message)
	notServed(t, h, "web", map[uint64]string{inodeOfNetns(t, on): "pod " + otherUID + "'s"})
	if st.State != admin.StateFailed || st.Reason != eventNetnsOwner || !strings.Contains(st.Message, otherUID) {
		t.Errorf("status of apps/web: %s %s %q; want failed %s naming %s", st.State, st.Reason, st.Message, eventNetnsOwner, otherUID)
	}
}

// TestAddServesTheSandboxsIPs: apps/web's ADD brings its sandbox's IP,
// 10.89.5.2, while the view still names 10.89.5.3 (a previous
// sandbox's). The tunnel serves web as the holder of 10.89.5.2: a
// client's plaintext to web's app on 10.89.5.2:8080, captured to 15006,
// reaches the app. Before, the tunnel was given the view's IPs and
// reset the connection as addressed to another pod (ip_mismatch).
func TestAddServesTheSandboxsIPs(t *testing.T) {
	testenv.RequireRoot(t)
	reg := prometheus.NewRegistry()
	h := startAgent(t, "", invAmbient, func(o *Options) {
		serveByRealTunnel(t, o, reg)
		o.View = staleView{Source: o.View.(*inventory.Source), name: "apps/web", ips: []netip.Addr{netip.MustParseAddr("10.89.5.3")}}
	})
	web, client := newPair(t, "10.89.5.2", "10.89.5.9")
	serveLines(t, web, "10.89.5.2:8080", "app")
	enrollLikePlugin(t, h, "web", web, "10.89.5.2/24")
	c, line, err := dialFrom(t, client, "10.89.5.2:8080")
	if err != nil || line != "app" {
		t.Fatalf("plaintext to web's own IP through its capture: %q %v", line, err)
	}
	c.Close()
	if n := testenv.Metric(t, reg, "ambit_tunnel_connections_opened_total", map[string]string{"direction": "inbound", "mode": "plaintext"}); n < 1 {
		t.Errorf("inbound plaintext connections opened by the tunnel: %v, want 1 (captured, not bypassed)", n)
	}
}

// TestLiveEnrollNeverTakesUnmeshedPodsNetns: the view's stale IP for
// apps/web, 10.89.6.3, is legacy/db's now, a pod not in the mesh whose ADD
// this agent recorded (no listeners, no rules). Its record names the
// namespace: web is not served there, which would have captured db's
// traffic with web's identity. Before, it was.
func TestLiveEnrollNeverTakesUnmeshedPodsNetns(t *testing.T) {
	testenv.RequireRoot(t)
	var view *staleLocalView
	h := startAgent(t, "", invAmbient, func(o *Options) {
		view = &staleLocalView{Source: o.View.(*inventory.Source), name: "apps/web", uid: "uid-web"}
		o.View = view
	})
	dn := newNetns(t, "10.89.6.3/24")
	if resp, err := h.call(cniproto.OpAdd, "legacy", "db", "cid-db", dn, "10.89.6.3/24"); err != nil || resp.Decision != cniproto.Skip {
		t.Fatalf("ADD legacy/db: %+v %v", resp, err)
	}
	view.set(netip.MustParseAddr("10.89.6.3"))
	h.a.Resync()
	st := settled(t, h, "web")
	t.Logf("apps/web: %s %s: %s", st.State, st.Reason, st.Message)
	notServed(t, h, "web", map[uint64]string{inodeOfNetns(t, dn): "legacy/db's"})
	if st.State != admin.StateFailed || st.Reason != eventNetnsOwner || !strings.Contains(st.Message, "legacy/db") {
		t.Errorf("status of apps/web: %s %s %q; want failed %s naming legacy/db", st.State, st.Reason, st.Message, eventNetnsOwner)
	}
	if found, err := (Rules{}).Installed(context.Background(), dn.file); err != nil || len(found) != 0 {
		t.Errorf("rules in legacy/db's namespace: %v %v, want none", found, err)
	}
}

// TestAddTakesItsNetnsBackFromAPodFoundThere: apps/web was found by live
// enrollment in a namespace holding the view's stale IP, 10.89.7.3,
// before anything said whose it was (no ADD yet, no pod cgroup: the
// demo, podman). apps/other's ADD then brings that namespace: the
// runtime's word. other is served there and web let go: its listeners
// closed, its record and host entry gone, status saying why. Before,
// both were served in other's namespace until web's DEL.
func TestAddTakesItsNetnsBackFromAPodFoundThere(t *testing.T) {
	testenv.RequireRoot(t)
	hr, _ := testHostRules(t, hostrules.Config{})
	stale := netip.MustParseAddr("10.89.7.3")
	var view *staleLocalView
	h := startAgent(t, "", invAmbient, func(o *Options) {
		o.Host = hr
		view = &staleLocalView{Source: o.View.(*inventory.Source), name: "apps/web", uid: "uid-web"}
		o.View = view
	})
	on := newNetns(t, "10.89.7.3/24")
	view.set(stale)
	h.a.Resync()
	if st := settled(t, h, "web"); st.State != admin.StateEnrolled {
		t.Fatalf("apps/web found by its (stale) IP: %s %s %q; the setting needs it served", st.State, st.Reason, st.Message)
	}
	if resp, err := h.call(cniproto.OpAdd, "apps", "other", "cid-other", on, "10.89.7.3/24"); err != nil || resp.Decision != cniproto.Enroll {
		t.Fatalf("ADD apps/other: %+v %v", resp, err)
	}
	eventually(t, "apps/web let go", func() bool {
		p := h.podNow("apps/web")
		return (p == nil || !p.enrolled()) && h.tun.Live() == 1
	})
	if p := h.podNow("apps/other"); p == nil || !p.enrolled() || p.rec.NetnsInode != inodeOfNetns(t, on) {
		t.Errorf("apps/other: %+v, want served in its namespace", p)
	}
	st := adminPodOf(t, h, "web")
	t.Logf("apps/web: %s %s: %s", st.State, st.Reason, st.Message)
	if st.State != admin.StateFailed || st.Reason != eventNetnsOwner || !strings.Contains(st.Message, "apps/other") {
		t.Errorf("status of apps/web: %s %s %q; want failed %s naming apps/other", st.State, st.Reason, st.Message, eventNetnsOwner)
	}
	if _, err := h.a.store.Read(state.FileName(foundPrefix + "apps/web")); err == nil {
		t.Errorf("apps/web's found: record is still there")
	}
	eventually(t, "the host entry apps/other's", func() bool {
		return sameOwners(hr.Entries(), map[netip.Addr]string{stale: "uid-other"})
	})
}

// TestRecordedIn: a record names a namespace only while its netns path
// still opens it (a bind mount keeps it, inode and all): the inode of a
// namespace gone since may be a new one's, which a stale record must not
// keep from its pod. Nor does a record of the pod itself count.
func TestRecordedIn(t *testing.T) {
	testenv.RequireRoot(t)
	n := newNetns(t)
	ino := inodeOfNetns(t, n)
	web := podKey{"apps", "web", "uid-web"}
	ips := []netip.Addr{netip.MustParseAddr("10.89.8.3")}
	rec := state.Pod{Namespace: "apps", Name: "other", UID: "uid-other", ContainerID: "cid-other", Netns: n.path, NetnsInode: ino}
	if err := recordedIn([]state.Pod{rec}, ino, web, ips); reasonOf(err) != reasonNetnsOwner || !strings.Contains(err.Error(), "apps/other") {
		t.Errorf("another pod's record whose path opens the namespace: %v", err)
	}
	gone := rec
	gone.Netns = "/var/run/netns/amb-agt-gone-" + suffix()
	if err := recordedIn([]state.Pod{gone}, ino, web, ips); err != nil {
		t.Errorf("a record whose path is gone: %v, want none", err)
	}
	self := rec
	self.Name, self.UID = "web", "uid-web"
	if err := recordedIn([]state.Pod{self}, ino, web, ips); err != nil {
		t.Errorf("the pod's own record: %v, want none", err)
	}
	again := self
	again.UID = "uid-web-before"
	if err := recordedIn([]state.Pod{again}, ino, web, ips); err == nil {
		t.Errorf("a record of an earlier pod of the name (another UID): none, want refused")
	}
}
