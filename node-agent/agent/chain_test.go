package agent

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/e2e/lab"
	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/plugin/redirect"
)

// TestEnrollThroughRealChain: the runtime's view. libcni runs bridge,
// host-local, portmap and the real ambit-cni binary, which asks this
// agent; the enrolled pod's outbound traffic lands on the agent's
// listener, the other pod's does not. Against both reference plugin sets.
func TestEnrollThroughRealChain(t *testing.T) {
	testenv.RequireRoot(t)
	cni := testenv.Binary(t, "ambit-cni")
	for i, set := range testenv.PluginSets(t) {
		t.Run(set.Name, func(t *testing.T) {
			h := startAgent(t, "", invAmbient)
			cidr := netip.MustParsePrefix(fmt.Sprintf("10.80.%d.0/24", i))
			node := labNode(t, h, set, cni, cidr)
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()

			web, err := node.AddPod(ctx, "apps", "web")
			if err != nil {
				t.Fatal(err)
			}
			if h.tun.Live() != 1 {
				t.Fatalf("agent serves %d pods after ADD, want 1", h.tun.Live())
			}
			p := h.podNow("apps/web")
			if p == nil || p.rec.ContainerID != web.ContainerID || len(p.rec.IPs) != 1 || p.rec.IPs[0] != web.IP {
				t.Fatalf("agent's record %+v, pod %+v", p, web)
			}
			if err := redirect.Verify(context.Background(), web.NetNS, p.spec); err != nil {
				t.Fatalf("rules installed by the plugin: %v", err)
			}
			// The directory learned the pod's IP from prevResult.
			if w, ok := h.inv.WorkloadByIP(web.IP); !ok || w.Name != "web" || w.ServiceAccount != "web-sa" {
				t.Fatalf("directory: %+v %v", w, ok)
			}
			gw := cidr.Addr().Next().String()
			webNS := &testNetns{name: web.NetnsName, path: web.Path, file: openFile(t, web.Path)}
			c, line, err := dialFrom(t, webNS, gw+":9")
			if err != nil || line != "captured:15001" {
				t.Fatalf("enrolled pod's outbound: %q %v", line, err)
			}
			c.Close()

			old, err := node.AddPod(ctx, "legacy", "old")
			if err != nil {
				t.Fatal(err)
			}
			oldNS := &testNetns{name: old.NetnsName, path: old.Path, file: openFile(t, old.Path)}
			if _, line, err := dialFrom(t, oldNS, gw+":9"); err == nil {
				t.Fatalf("unenrolled pod's traffic captured: %q", line)
			}
			if err := web.Check(ctx); err != nil {
				t.Fatalf("CNI CHECK of the enrolled pod: %v", err)
			}
			if err := web.Delete(ctx); err != nil {
				t.Fatal(err)
			}
			eventually(t, "listeners closed after CNI DEL", func() bool { return h.tun.Live() == 0 })
		})
	}
}

// labNode is a lab node whose CNI chain (the plugin set's bridge,
// host-local and portmap, then the ambit-cni binary cni) asks h's agent;
// removed when t ends. opts adjust its options before it is made.
func labNode(t *testing.T, h *harness, set testenv.PluginSet, cni string, cidr netip.Prefix, opts ...func(*lab.NodeOptions)) *lab.Node {
	t.Helper()
	dir, _ := os.MkdirTemp("", "amb-agt-lab-")
	t.Cleanup(func() { os.RemoveAll(dir) })
	o := lab.NodeOptions{
		Name:       "amb-agt-" + lab.RandSuffix(),
		PodCIDR:    cidr,
		PluginDirs: []string{set.Dir, filepath.Dir(cni)},
		CNIVersion: set.MaxCNIVersion,
		Ambit:      map[string]any{"agentSocket": h.sock, "snapshotFile": filepath.Join(h.dir, "enrollment-snapshot.json")},
		Dir:        dir,
	}
	for _, fn := range opts {
		fn(&o)
	}
	node, err := lab.NewNode(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { node.Close() })
	return node
}
