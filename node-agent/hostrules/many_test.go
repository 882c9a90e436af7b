package hostrules

import (
	"context"
	"fmt"
	"net/netip"
	"testing"
)

// TestManyEntries: a node with more pod IPs than one netlink attribute
// holds (~1090 IPv4 elements with their UID comments). The nftables
// backend put the whole set in one message, whose element list wrapped
// its 16-bit length: the kernel took 407 of 1500 elements (every check
// then "repaired" it) and refused 3000 outright (ENOBUFS).
func TestManyEntries(t *testing.T) {
	for _, bc := range backends() {
		t.Run(bc.name, func(t *testing.T) {
			tp := newTopo(t)
			tp.server(t)
			m, _ := newManager(t, tp, bc.backend)
			want := map[string][]netip.Addr{"probed": {podV4}}
			for i := 0; i < 3000; i++ {
				uid := fmt.Sprintf("%08x-0000-4000-8000-000000000000", i)
				want[uid] = []netip.Addr{
					netip.AddrFrom4([4]byte{10, 100, byte(i >> 8), byte(i)}),
					netip.MustParseAddr(fmt.Sprintf("fd00:100::%x", i)),
				}
			}
			if err := m.Sync(want); err != nil {
				t.Fatal(err)
			}
			if err := m.Reconcile(); err != nil {
				t.Fatal(err)
			}
			if n := m.Repairs(); n != 0 {
				t.Errorf("%d repairs right after Sync", n)
			}
			m.mu.Lock()
			drift, err := m.be.check(context.Background(), m.owners)
			m.mu.Unlock()
			if err != nil || drift != "" {
				t.Errorf("kernel vs the 6001 entries: drift %q, err %v", drift, err)
			}
			if got := sourceSeen(t, tp.hostNS, "10.77.1.2:8080"); got != probe4 {
				t.Errorf("local v4 probe: source %s, want %s", got, probe4)
			}
		})
	}
}

// TestManyEntriesAcks: the kernel acknowledges each message of a
// transaction, all at once after the commit, into the socket's receive
// buffer. With elements 200 a message, past ~250 messages (~50000
// entries) the default receive buffer overflowed: the transaction was
// committed, yet the write failed (ENOBUFS), so every reconcile rewrote
// and counted a failure.
func TestManyEntriesAcks(t *testing.T) {
	tp := newTopo(t)
	m, _ := newManager(t, tp, BackendNFTables)
	want := map[string][]netip.Addr{}
	for i := 0; i < 30000; i++ {
		uid := fmt.Sprintf("%08x-0000-4000-8000-000000000000", i)
		want[uid] = []netip.Addr{
			netip.AddrFrom4([4]byte{10, byte(100 + i>>16), byte(i >> 8), byte(i)}),
			netip.MustParseAddr(fmt.Sprintf("fd00:100::%x", i)),
		}
	}
	if err := m.Sync(want); err != nil {
		t.Fatal(err)
	}
	m.mu.Lock()
	drift, err := m.be.check(context.Background(), m.owners)
	m.mu.Unlock()
	if err != nil || drift != "" {
		t.Errorf("kernel vs the 60000 entries: drift %q, err %v", drift, err)
	}
}
