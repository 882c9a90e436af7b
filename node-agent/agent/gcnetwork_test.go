package agent

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	cniversion "github.com/containernetworking/cni/pkg/version"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/state"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

// twoNetworks is a node with two CNI networks whose chains both end in
// the real ambit-cni asking h's agent: "cluster" (where the installer
// puts it; the pods' eth0) and "net-b" (a NetworkAttachmentDefinition's
// chain; net1). The reference plugins of spec 1.1.0, so libcni runs GC
// through every plugin of a chain, ambit-cni's included, per network.
func twoNetworks(t *testing.T, h *harness) (cluster, netB *chainNode) {
	t.Helper()
	set := testenv.PluginSets(t)[1]
	bin := testenv.Binary(t, "ambit-cni")
	node := newNetns(t)
	run(t, "ip", "netns", "exec", node.name, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	dir := t.TempDir()
	exe := &invoke.DefaultExec{RawExec: &invoke.RawExec{Stderr: os.Stderr}, PluginDecoder: cniversion.PluginDecoder{}}
	cni := libcni.NewCNIConfigWithCacheDir([]string{set.Dir, filepath.Dir(bin)}, filepath.Join(dir, "cache"), exe)
	mk := func(name, subnet string, gw bool) *chainNode {
		conf, _ := json.Marshal(map[string]any{"cniVersion": set.MaxCNIVersion, "name": name, "plugins": []any{
			map[string]any{"type": "bridge", "bridge": "ambg" + suffix()[:6], "isGateway": true, "isDefaultGateway": gw, "ipMasq": false,
				"ipam": map[string]any{"type": "host-local", "dataDir": filepath.Join(dir, name, "ipam"), "ranges": []any{[]any{map[string]any{"subnet": subnet}}}}},
			map[string]any{"type": "ambit-cni", "agentSocket": h.sock, "snapshotFile": filepath.Join(h.dir, "enrollment-snapshot.json"),
				"logFile": filepath.Join(dir, name, "cni.log"), "agentTimeout": "10s"},
		}})
		list, err := libcni.ConfListFromBytes(conf)
		if err != nil {
			t.Fatal(err)
		}
		return &chainNode{t: t, ns: node, cni: cni, list: list}
	}
	return mk("cluster", "10.83.1.0/24", true), mk("net-b", "10.83.2.0/24", false)
}

// gc runs the runtime's GC of n's network with these attachments valid.
// libcni first DELs the attachments it has cached for the network and
// the list leaves out, then runs GC through the chain; to see what the
// agent's GC does alone (a runtime whose cache lost the entry), tests
// send the gc request themselves (gcCall).
func (n *chainNode) gc(valid ...*chainPod) {
	n.t.Helper()
	args := &libcni.GCArgs{}
	for _, p := range valid {
		args.ValidAttachments = append(args.ValidAttachments, types.GCAttachment{ContainerID: p.rt.ContainerID, IfName: p.rt.IfName})
	}
	if err := n.do(func(ctx context.Context) error { return n.cni.GCNetworkList(ctx, n.list, args) }); err != nil {
		n.t.Fatalf("GC of network %s: %v", n.list.Name, err)
	}
}

func (h *harness) record(t *testing.T, cid string) (state.Pod, bool) {
	t.Helper()
	store, err := state.Open(h.dir)
	if err != nil {
		t.Fatal(err)
	}
	rec, err := store.Read(state.FileName(cid))
	if errors.Is(err, os.ErrNotExist) {
		return rec, false
	}
	if err != nil {
		t.Fatal(err)
	}
	return rec, true
}

// capturedIn fails t unless the agent's listener takes p's outbound
// connection (captured, served), or, with want false, unless p is no
// longer served.
func capturedIn(t *testing.T, h *harness, key string, p *chainPod, want bool) {
	t.Helper()
	if !want {
		eventually(t, key+" no longer served", func() bool { return h.a.podByName(key) == nil })
		return
	}
	servedWithRules(t, h, key, p)
	c, line, err := dialFrom(t, p.ns, "127.0.0.1:15001")
	if err != nil || line != "captured:15001" {
		t.Fatalf("%s: outbound %q %v, want captured by the agent's listener", key, line, err)
	}
	c.Close()
}

// TestGCOfAnotherNetworkKeepsThePods: with ambit-cni in two networks'
// chains, the runtime's GC of net-b lists net-b's attachments only
// (none here). Until session 18 the agent took that for the node's whole
// list and forgot every pod of the cluster network: listeners closed,
// their connections refused. Now it forgets only what it knows to be of
// net-b; the cluster network's GC still forgets a pod it no longer lists.
func TestGCOfAnotherNetworkKeepsThePods(t *testing.T) {
	testenv.RequireRoot(t)
	h := startAgent(t, "", invAmbient)
	cluster, netB := twoNetworks(t, h)
	web0, web1 := cluster.pod("apps", "web-0", nil), cluster.pod("apps", "web-1", nil)
	for _, p := range []*chainPod{web0, web1} {
		if err := cluster.add(p); err != nil {
			t.Fatal(err)
		}
	}
	if rec, ok := h.record(t, web0.rt.ContainerID); !ok || !slices.Equal(rec.Networks, []string{"cluster"}) {
		t.Fatalf("web-0's record after ADD: %+v (found %v), want networks [cluster]", rec, ok)
	}

	netB.gc()
	for _, p := range []struct {
		key string
		p   *chainPod
	}{{"apps/web-0", web0}, {"apps/web-1", web1}} {
		capturedIn(t, h, p.key, p.p, true)
		if _, ok := h.record(t, p.p.rt.ContainerID); !ok {
			t.Fatalf("net-b's GC removed %s's record", p.key)
		}
	}

	h.gcCall(t, "cluster", cniproto.Attachment{ContainerID: web0.rt.ContainerID, IfName: "eth0"})
	capturedIn(t, h, "apps/web-1", web1, false)
	if _, ok := h.record(t, web1.rt.ContainerID); ok {
		t.Fatal("the cluster network's GC kept web-1's record, which it no longer lists")
	}
	capturedIn(t, h, "apps/web-0", web0, true)
}

// TestGCOfOneNetworkKeepsASandboxTheOtherLists: one sandbox, eth0 in the
// cluster network and net1 in net-b (same container ID). A GC of one
// network that no longer lists it leaves it served while the other
// network's attachment lives; the GC of that one then forgets it.
func TestGCOfOneNetworkKeepsASandboxTheOtherLists(t *testing.T) {
	testenv.RequireRoot(t)
	h := startAgent(t, "", invAmbient)
	cluster, netB := twoNetworks(t, h)
	eth0 := cluster.pod("apps", "multi", nil)
	if err := cluster.add(eth0); err != nil {
		t.Fatal(err)
	}
	rt := *eth0.rt
	rt.IfName = "net1"
	net1 := &chainPod{ns: eth0.ns, rt: &rt}
	if err := netB.add(net1); err != nil {
		t.Fatalf("ADD of net1 in net-b: %v", err)
	}
	rec, ok := h.record(t, eth0.rt.ContainerID)
	if !ok || rec.IfName != "eth0" || !slices.Equal(rec.Networks, []string{"cluster", "net-b"}) {
		t.Fatalf("record after both ADDs: %+v (found %v), want eth0's, networks [cluster net-b]", rec, ok)
	}

	h.gcCall(t, "cluster")
	capturedIn(t, h, "apps/multi", eth0, true)
	if rec, ok := h.record(t, eth0.rt.ContainerID); !ok || !slices.Equal(rec.Networks, []string{"net-b"}) {
		t.Fatalf("record after the cluster network's GC: %+v (found %v), want networks [net-b]", rec, ok)
	}
	netB.gc(net1)
	capturedIn(t, h, "apps/multi", eth0, true)
	// libcni DELs net1 (another attachment: the sandbox stays), then
	// runs net-b's GC, which no longer lists the sandbox anywhere.
	netB.gc()
	capturedIn(t, h, "apps/multi", eth0, false)
	if _, ok := h.record(t, eth0.rt.ContainerID); ok {
		t.Fatal("the record outlived the GC of the last network that listed the sandbox")
	}
}

// gcCall sends a gc the way a plugin of the given network does ("" and
// version 1: a plugin from before networks were named).
func (h *harness) gcCall(t *testing.T, network string, valid ...cniproto.Attachment) {
	t.Helper()
	req := &cniproto.Request{Version: cniproto.GCVersion, Op: cniproto.OpGC, Valid: valid}
	if network != "" {
		req.Version, req.Network = cniproto.NetworkVersion, network
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if resp, err := cniproto.Call(ctx, h.sock, req, nil); err != nil || resp.Error != "" {
		t.Fatalf("gc of %q: %+v %v", network, resp, err)
	}
}

// TestGCOfRecordsWithoutANetwork: a record of a plugin (or agent) from
// before networks were named does not know its own attachment's network.
// A named GC never forgets it on that account; one that lists its own
// attachment (container ID and interface) teaches it the network, whose
// later GC then collects it. An unnamed GC (an older plugin) is the
// node's whole list, as before.
func TestGCOfRecordsWithoutANetwork(t *testing.T) {
	testenv.RequireRoot(t)
	h := startAgent(t, "", invAmbient)
	add := func(name, ip string) *testNetns {
		n := newNetns(t, ip)
		req := &cniproto.Request{Version: 2, Op: cniproto.OpAdd, Pod: cniproto.Pod{Namespace: "apps", Name: name, UID: "uid-" + name,
			ContainerID: "cid-" + name, IfName: "eth0", Netns: n.path}}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if resp, err := cniproto.Call(ctx, h.sock, req, n.file); err != nil || resp.Decision != cniproto.Enroll {
			t.Fatalf("version 2 ADD of %s: %+v %v", name, resp, err)
		}
		return n
	}
	add("web-0", "10.83.3.2/24")
	add("web-1", "10.83.3.3/24")
	if rec, ok := h.record(t, "cid-web-0"); !ok || rec.Networks != nil {
		t.Fatalf("record of a version 2 ADD: %+v (found %v), want no networks", rec, ok)
	}
	served := func(name string) bool {
		unlock := h.a.lock("apps", name)
		defer unlock()
		p := h.a.podByName("apps/" + name)
		return p != nil && p.enrolled()
	}

	h.gcCall(t, "net-b")
	if !served("web-0") || !served("web-1") {
		t.Fatal("a named GC forgot a record that does not know its network")
	}
	h.gcCall(t, "cluster", cniproto.Attachment{ContainerID: "cid-web-0", IfName: "eth0"}, cniproto.Attachment{ContainerID: "cid-web-1", IfName: "net1"})
	if rec, _ := h.record(t, "cid-web-0"); !slices.Equal(rec.Networks, []string{"cluster"}) {
		t.Fatalf("web-0 after the cluster GC listed its eth0: networks %q, want [cluster]", rec.Networks)
	}
	// web-1's net1, not its own eth0, was listed: its own network stays
	// unknown, and the cluster network is one more.
	if rec, _ := h.record(t, "cid-web-1"); !slices.Equal(rec.Networks, []string{"", "cluster"}) {
		t.Fatalf("web-1 after the cluster GC listed its net1: networks %q, want [\"\" cluster]", rec.Networks)
	}
	h.gcCall(t, "net-b")
	h.gcCall(t, "cluster")
	if served("web-0") {
		t.Fatal("web-0 still served after the GC of its network left it out")
	}
	if !served("web-1") {
		t.Fatal("web-1 forgotten, though its own attachment's network is unknown")
	}
	h.gcCall(t, "")
	if served("web-1") {
		t.Fatal("an unnamed GC (an older plugin) left web-1 served; it is the node's whole list")
	}
	eventually(t, "no pod served", func() bool { return h.tun.Live() == 0 })
}

func TestGCNetworks(t *testing.T) {
	for _, c := range []struct {
		nets        []string
		n           string
		listed, own bool
		want        []string
		wantGone    bool
	}{
		{nil, "a", false, false, nil, false},
		{nil, "a", true, true, []string{"a"}, false},
		{nil, "a", true, false, []string{"", "a"}, false},
		{[]string{"a"}, "a", false, false, nil, true},
		{[]string{"a"}, "b", false, false, []string{"a"}, false},
		{[]string{"a", "b"}, "a", false, false, []string{"b"}, false},
		{[]string{"a"}, "b", true, false, []string{"a", "b"}, false},
		{[]string{"", "b"}, "b", false, false, nil, false},
		{[]string{"", "b"}, "a", true, true, []string{"b", "a"}, false},
	} {
		got, gone := gcNetworks(c.nets, c.n, c.listed, c.own)
		if !slices.Equal(got, c.want) || gone != c.wantGone {
			t.Errorf("gcNetworks(%q, %q, listed %v, own %v) = %q, %v; want %q, %v", c.nets, c.n, c.listed, c.own, got, gone, c.want, c.wantGone)
		}
	}
}
