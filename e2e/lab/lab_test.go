package lab

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
)

// The lab itself must give what a real node gives: pods on a bridge that
// reach each other, on one node and across nodes.
func TestTwoNodesPodsReachEachOther(t *testing.T) {
	testenv.RequireRoot(t)
	for _, set := range testenv.PluginSets(t) {
		t.Run(set.Name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			wire, err := NewWire("amb-lw-"+RandSuffix(), netip.MustParsePrefix("10.98.0.0/24"))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { wire.Close() })
			var nodes []*Node
			for i, cidr := range []string{"10.97.1.0/24", "10.97.2.0/24"} {
				n, err := NewNode(NodeOptions{
					Name:       "amb-lab-" + RandSuffix(),
					PodCIDR:    netip.MustParsePrefix(cidr),
					PluginDirs: []string{set.Dir},
					CNIVersion: set.MaxCNIVersion,
				})
				if err != nil {
					t.Fatalf("node %d: %v", i, err)
				}
				t.Cleanup(func() { n.Close() })
				if _, err := wire.Attach(n); err != nil {
					t.Fatal(err)
				}
				nodes = append(nodes, n)
			}
			a, err := nodes[0].AddPod(ctx, "default", "a")
			if err != nil {
				t.Fatal(err)
			}
			b, err := nodes[0].AddPod(ctx, "default", "b")
			if err != nil {
				t.Fatal(err)
			}
			c, err := nodes[1].AddPod(ctx, "default", "c")
			if err != nil {
				t.Fatal(err)
			}
			if !a.IP.IsValid() || !nodes[0].Opts.PodCIDR.Contains(a.IP) {
				t.Fatalf("pod a got %v, want an address in %v", a.IP, nodes[0].Opts.PodCIDR)
			}
			for _, dst := range []*Pod{b, c} {
				if err := a.Exec("ping", "-c1", "-W2", dst.IP.String()); err != nil {
					t.Errorf("a → %s (%s): %v", dst.Name, dst.IP, err)
				}
			}
		})
	}
}
