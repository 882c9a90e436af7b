package hostrules

import (
	"crypto/rand"
	"encoding/hex"
	"net/netip"
	"os/exec"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/ambit-mesh/ambit/internal/testenv"
)

// BenchmarkHostRules: enrolling one pod (Add + Remove, incremental set
// element changes) against a full rewrite of the table (Sync) with 300
// pods on the node, in the same run, for each backend. The incremental
// path is what a burst of pod starts pays.
func BenchmarkHostRules(b *testing.B) {
	for _, be := range []string{BackendNFTables, "iptables-nft"} {
		b.Run(be, func(b *testing.B) {
			ns := benchNS(b)
			m, err := New(Config{Backend: be, NetNS: ns, Interval: time.Hour})
			if err != nil {
				b.Fatal(err)
			}
			defer m.Uninstall()
			want := map[string][]netip.Addr{}
			for i := 0; i < 300; i++ {
				want[string(rune('a'+i%26))+string(rune('a'+i/26))] = []netip.Addr{netip.AddrFrom4([4]byte{10, 9, byte(i >> 8), byte(i)})}
			}
			if err := m.Sync(want); err != nil {
				b.Fatal(err)
			}
			ip := []netip.Addr{netip.MustParseAddr("10.8.0.1")}
			b.Run("add+remove", func(b *testing.B) {
				for i := 0; i < b.N; i++ {
					if err := m.Add("bench", ip); err != nil {
						b.Fatal(err)
					}
					if err := m.Remove("bench", ip); err != nil {
						b.Fatal(err)
					}
				}
			})
			b.Run("sync-rewrite-baseline", func(b *testing.B) {
				for i := 0; i < b.N; i++ {
					want["bench"] = ip
					if i%2 == 1 {
						delete(want, "bench")
					}
					if err := m.Sync(want); err != nil {
						b.Fatal(err)
					}
				}
			})
			b.Run("reconcile-check", func(b *testing.B) {
				for i := 0; i < b.N; i++ {
					if err := m.Reconcile(); err != nil {
						b.Fatal(err)
					}
				}
			})
		})
	}
}

// benchNS is an empty network namespace of our own, standing in for the
// host.
func benchNS(b *testing.B) netns.NsHandle {
	b.Helper()
	testenv.RequireRoot(b)
	buf := make([]byte, 4)
	rand.Read(buf)
	name := "amb-kub-b-" + hex.EncodeToString(buf)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		b.Fatalf("ip netns add: %v %s", err, out)
	}
	b.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	h, err := netns.GetFromName(name)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { h.Close() })
	return h
}
