package agent

import (
	"context"
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	types100 "github.com/containernetworking/cni/pkg/types/100"
	cniversion "github.com/containernetworking/cni/pkg/version"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/plugin/redirect"
	"github.com/containernetworking/plugins/pkg/ns"
)

// chainNode is a node netns with a CNI chain (the reference bridge,
// host-local and portmap, then the real ambit-cni asking h's agent) that
// a test drives with runtime arguments of its own: an interface name, a
// CNI_ARGS, a netns prepared beforehand.
type chainNode struct {
	t    *testing.T
	ns   *testNetns
	cni  *libcni.CNIConfig
	list *libcni.NetworkConfigList
	gw4  netip.Addr
}

// newChainNode builds the node; ranges are host-local's ranges (one
// subnet each: "10.81.0.0/24", "fd00:81::/64").
func newChainNode(t *testing.T, h *harness, ambit map[string]any, ranges ...string) *chainNode {
	t.Helper()
	set := testenv.PluginSets(t)[0]
	bin := testenv.Binary(t, "ambit-cni")
	n := &chainNode{t: t, ns: newNetns(t)}
	run(t, "ip", "netns", "exec", n.ns.name, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
	dir := t.TempDir()
	var rs []any
	for _, r := range ranges {
		rs = append(rs, []any{map[string]any{"subnet": r}})
		if p := netip.MustParsePrefix(r); p.Addr().Is4() {
			n.gw4 = p.Masked().Addr().Next()
		}
	}
	entry := map[string]any{"type": "ambit-cni", "agentSocket": h.sock, "snapshotFile": filepath.Join(h.dir, "enrollment-snapshot.json"),
		"logFile": filepath.Join(dir, "cni.log"), "agentTimeout": "10s"}
	for k, v := range ambit {
		entry[k] = v
	}
	conf, _ := json.Marshal(map[string]any{"cniVersion": set.MaxCNIVersion, "name": "shapes", "plugins": []any{
		map[string]any{"type": "bridge", "bridge": "ambs" + suffix()[:6], "isGateway": true, "isDefaultGateway": true, "ipMasq": false,
			"ipam": map[string]any{"type": "host-local", "dataDir": filepath.Join(dir, "ipam"), "ranges": rs}},
		map[string]any{"type": "portmap", "capabilities": map[string]bool{"portMappings": true}},
		entry,
	}})
	var err error
	if n.list, err = libcni.ConfListFromBytes(conf); err != nil {
		t.Fatal(err)
	}
	exe := &invoke.DefaultExec{RawExec: &invoke.RawExec{Stderr: os.Stderr}, PluginDecoder: cniversion.PluginDecoder{}}
	n.cni = libcni.NewCNIConfigWithCacheDir([]string{set.Dir, filepath.Dir(bin)}, filepath.Join(dir, "cache"), exe)
	return n
}

// chainPod is one sandbox's runtime arguments.
type chainPod struct {
	ns  *testNetns
	rt  *libcni.RuntimeConf
	res *types100.Result
}

func (n *chainNode) pod(namespace, name string, netns *testNetns) *chainPod {
	if netns == nil {
		netns = newNetns(n.t)
	}
	return &chainPod{ns: netns, rt: &libcni.RuntimeConf{ContainerID: "c" + suffix() + suffix(), NetNS: netns.path, IfName: "eth0",
		Args: [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", namespace}, {"K8S_POD_NAME", name},
			{"K8S_POD_INFRA_CONTAINER_ID", "infra"}, {"K8S_POD_UID", "uid-" + name}}}}
}

func (n *chainNode) do(fn func(ctx context.Context) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var err error
	inNetns(n.t, n.ns, func() error { err = fn(ctx); return nil })
	return err
}

func (n *chainNode) add(p *chainPod) error {
	return n.do(func(ctx context.Context) error {
		r, err := n.cni.AddNetworkList(ctx, n.list, p.rt)
		if err != nil {
			return err
		}
		p.res, err = types100.NewResultFromResult(r)
		return err
	})
}

func (n *chainNode) del(p *chainPod) error {
	return n.do(func(ctx context.Context) error { return n.cni.DelNetworkList(ctx, n.list, p.rt) })
}

func (n *chainNode) check(p *chainPod) error {
	return n.do(func(ctx context.Context) error { return n.cni.CheckNetworkList(ctx, n.list, p.rt) })
}

// podNow is a copy of the agent's pod key (namespace/name) taken under
// the pod's lock and a.mu, in the agent's order; nil if the agent has
// none. The agent changes most of a pod's fields under the pod's lock
// alone: a DEL clears its serving (detachRelease) outside a.mu. Read
// from the test goroutine after podByName (a.mu only), they race with
// the plugin request the test sends next: the race detector caught
// servedWithRules reading p.serve, then the DEL of eth0 clearing it.
func (h *harness) podNow(key string) *pod {
	namespace, name, _ := strings.Cut(key, "/")
	unlock := h.a.lock(namespace, name)
	defer unlock()
	h.a.mu.Lock()
	defer h.a.mu.Unlock()
	p := h.a.byName[key]
	if p == nil {
		return nil
	}
	cp := *p
	return &cp
}

// servedWithRules fails t unless the agent serves key with every rule
// of its spec in p's netns.
func servedWithRules(t *testing.T, h *harness, key string, p *chainPod) {
	t.Helper()
	q := h.podNow(key)
	if q == nil || !q.enrolled() {
		t.Fatalf("%s is not served (%+v)", key, q)
	}
	n, err := ns.GetNS(p.ns.path)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	if err := redirect.Verify(context.Background(), n, q.spec); err != nil {
		t.Fatalf("%s: %v", key, err)
	}
}

// TestSecondAttachmentDelKeepsThePodEnrolled: a sandbox with two
// attachments through a chain holding ambit-cni (Multus: the cluster
// network as eth0 and a NetworkAttachmentDefinition built from the same
// chain as net1; CNI calls ADD and DEL once per attachment, same
// container ID, another CNI_IFNAME). The agent serves the sandbox, not an
// interface: the DEL of net1 (hot-unplugged, or its failed ADD cleaned
// up) must leave the pod enrolled while eth0 lives. Before, it removed
// the rules and released the listeners, and the running pod's traffic
// went out plaintext, uncaptured, with its annotation still "enabled".
func TestSecondAttachmentDelKeepsThePodEnrolled(t *testing.T) {
	testenv.RequireRoot(t)
	h := startAgent(t, "", invAmbient)
	n, eth0, net1 := twoAttachments(t, h, "10.81.5.0/24")
	servedWithRules(t, h, "apps/multi", eth0)
	// The directory (a static inventory learns pod IPs from ADD) still
	// knows the pod by eth0's address, the one its peers reach.
	ip := netip.MustParsePrefix(eth0.res.IPs[0].Address.String()).Addr()
	if w, ok := h.inv.WorkloadByIP(ip); !ok || w.Name != "multi" {
		t.Fatalf("directory after the ADD of net1: %s is %+v %v, want apps/multi", ip, w, ok)
	}
	if err := n.check(net1); err != nil {
		t.Fatalf("CHECK of the second attachment: %v", err)
	}
	if err := n.del(net1); err != nil {
		t.Fatalf("DEL of the second attachment: %v", err)
	}
	servedWithRules(t, h, "apps/multi", eth0)
	if err := n.check(eth0); err != nil {
		t.Fatalf("CHECK of eth0 after the DEL of net1: %v", err)
	}
	if _, line, err := dialFrom(t, eth0.ns, n.gw4.String()+":9"); err != nil || line != "captured:15001" {
		t.Fatalf("outbound after the DEL of net1: %q %v, want captured", line, err)
	}
	// The attachment that enrolled the pod goes last (Multus deletes
	// the cluster network last): the pod is released.
	if err := n.del(eth0); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the pod released after the DEL of eth0", func() bool { return h.a.podByName("apps/multi") == nil && h.tun.Live() == 0 })
}

// twoAttachments adds apps/multi through the chain on node h twice, as
// Multus does for a pod with a second network made from the same chain:
// eth0, then net1 in the same netns under the same container ID.
func twoAttachments(t *testing.T, h *harness, subnet string) (n *chainNode, eth0, net1 *chainPod) {
	t.Helper()
	n = newChainNode(t, h, nil, subnet)
	eth0 = n.pod("apps", "multi", nil)
	if err := n.add(eth0); err != nil {
		t.Fatal(err)
	}
	rt := *eth0.rt
	rt.IfName = "net1"
	net1 = &chainPod{ns: eth0.ns, rt: &rt}
	if err := n.add(net1); err != nil {
		t.Fatalf("ADD of the second attachment: %v", err)
	}
	return n, eth0, net1
}
