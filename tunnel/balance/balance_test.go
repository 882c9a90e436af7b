package balance

import (
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"
)

func eps(n int) []netip.AddrPort {
	out := make([]netip.AddrPort, n)
	for i := range out {
		out[i] = netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), 8080)
	}
	return out
}

func client(i int) netip.Addr { return netip.AddrFrom4([4]byte{10, 2, byte(i >> 8), byte(i)}) }

var (
	vip  = netip.MustParseAddrPort("10.96.0.10:80")
	vip2 = netip.MustParseAddrPort("203.0.113.7:80")
	t0   = time.Now()
)

func at(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }

// Without affinity every connection is a fresh random choice, even from
// one client (and the table stays empty).
func TestNoAffinityIsRandomPerConnection(t *testing.T) {
	tb := NewTable(0)
	seen := map[netip.AddrPort]int{}
	for i := 0; i < 200; i++ {
		seen[tb.Choose(client(1), vip, "shop/web:http", eps(4), 0, at(0))]++
	}
	if len(seen) != 4 {
		t.Fatalf("200 connections from one client without affinity reached %v, want all 4 endpoints", seen)
	}
	if n := tb.Len(); n != 0 {
		t.Fatalf("no affinity recorded %d entries", n)
	}
}

// ClientIP: one client keeps its endpoint across connections, however
// many; different clients are spread.
func TestAffinityHoldsPerClient(t *testing.T) {
	tb := NewTable(0)
	all := eps(2)
	first := map[int]netip.AddrPort{}
	for c := 0; c < 20; c++ {
		first[c] = tb.Choose(client(c), vip, "shop/web:http", all, time.Hour, at(0))
	}
	for i := 1; i <= 50; i++ {
		for c := 0; c < 20; c++ {
			if got := tb.Choose(client(c), vip, "shop/web:http", all, time.Hour, at(float64(i))); got != first[c] {
				t.Fatalf("connection %d of client %d went to %v, its first went to %v", i, c, got, first[c])
			}
		}
	}
	used := map[netip.AddrPort]bool{}
	for _, ep := range first {
		used[ep] = true
	}
	if len(used) != 2 {
		t.Fatalf("20 clients all stuck to %v: the first choice must be random", used)
	}
}

// kube-proxy's "recent" semantics: the timeout counts from the client's
// last connection, not its first; past it, the choice is made afresh.
func TestAffinityTimeoutCountsFromLastConnection(t *testing.T) {
	tb := NewTable(0)
	all := eps(2)
	first := map[int]netip.AddrPort{}
	for c := 0; c < 20; c++ {
		first[c] = tb.Choose(client(c), vip, "p", all, 10*time.Second, at(0))
	}
	// Every 8 s for 40 s: always within 10 s of the previous one.
	for s := 8.0; s <= 40; s += 8 {
		for c := 0; c < 20; c++ {
			if got := tb.Choose(client(c), vip, "p", all, 10*time.Second, at(s)); got != first[c] {
				t.Fatalf("client %d at %vs (8 s after its last connection, timeout 10 s) went to %v, not %v", c, s, got, first[c])
			}
		}
	}
	// 10 s after the last connection: expired, a new random choice
	// (some of the 20 clients change endpoint).
	changed := 0
	for c := 0; c < 20; c++ {
		if tb.Choose(client(c), vip, "p", all, 10*time.Second, at(50)) != first[c] {
			changed++
		}
	}
	if changed == 0 {
		t.Fatal("after the timeout no client chose afresh: affinity did not expire")
	}
}

// A shorter timeout set on the Service applies to what is remembered.
func TestAffinityShortenedTimeout(t *testing.T) {
	tb := NewTable(0)
	all := eps(2)
	first := map[int]netip.AddrPort{}
	for c := 0; c < 20; c++ {
		first[c] = tb.Choose(client(c), vip, "p", all, time.Hour, at(0))
	}
	changed := 0
	for c := 0; c < 20; c++ {
		if tb.Choose(client(c), vip, "p", all, 5*time.Second, at(6)) != first[c] {
			changed++
		}
	}
	if changed == 0 {
		t.Fatal("timeout lowered to 5 s, 6 s after the last connection: no client chose afresh")
	}
}

// The remembered endpoint goes away: the client gets another one and
// keeps that one, also once the first comes back. A reordered list does
// not break affinity.
func TestAffinityEndpointGone(t *testing.T) {
	tb := NewTable(0)
	all := eps(3)
	a := tb.Choose(client(1), vip, "p", all, time.Hour, at(0))
	var rest []netip.AddrPort
	for _, e := range all {
		if e != a {
			rest = append(rest, e)
		}
	}
	b := tb.Choose(client(1), vip, "p", rest, time.Hour, at(1))
	if b == a {
		t.Fatalf("went to %v, which is no longer an endpoint", a)
	}
	reordered := []netip.AddrPort{all[2], all[1], all[0]}
	for i := 0; i < 20; i++ {
		if got := tb.Choose(client(1), vip, "p", reordered, time.Hour, at(2)); got != b {
			t.Fatalf("after %v came back (list reordered) the client went to %v, want it kept on %v", a, got, b)
		}
	}
}

// One Service port reached through two of its addresses (clusterIP and
// an externalIP): one affinity, as kube-proxy keys on the Service port.
// Without a port identity, each address is its own.
func TestAffinitySharedAcrossAddressesOfAPort(t *testing.T) {
	tb := NewTable(0)
	all := eps(8)
	for c := 0; c < 10; c++ {
		a := tb.Choose(client(c), vip, "shop/web:http", all, time.Hour, at(0))
		if b := tb.Choose(client(c), vip2, "shop/web:http", all, time.Hour, at(1)); b != a {
			t.Fatalf("client %d: clusterIP → %v, externalIP of the same port → %v", c, a, b)
		}
	}
	if n := tb.Len(); n != 10 {
		t.Fatalf("%d entries for 10 clients of one Service port, want 10", n)
	}
	tb.Choose(client(0), vip, "", all, time.Hour, at(2))
	tb.Choose(client(0), vip2, "", all, time.Hour, at(2))
	if n := tb.Len(); n != 12 {
		t.Fatalf("keyed by address: %d entries, want 12", n)
	}
}

// Memory stays bounded: past the cap the least recently used client is
// forgotten, the recent ones keep their endpoint; expired entries are
// reaped as new clients come.
func TestTableBounded(t *testing.T) {
	tb := NewTable(4)
	all := eps(1000)
	got := map[int]netip.AddrPort{}
	for c := 0; c < 10; c++ {
		got[c] = tb.Choose(client(c), vip, "p", all, time.Hour, at(float64(c)))
	}
	if n := tb.Len(); n != 4 {
		t.Fatalf("cap 4, %d entries", n)
	}
	for c := 6; c < 10; c++ {
		if e := tb.Choose(client(c), vip, "p", all, time.Hour, at(20)); e != got[c] {
			t.Fatalf("recent client %d lost its endpoint under the cap", c)
		}
	}

	tb = NewTable(1000)
	for c := 0; c < 50; c++ {
		tb.Choose(client(c), vip, "p", all, time.Second, at(0))
	}
	for c := 50; c < 100; c++ {
		tb.Choose(client(c), vip, "p", all, time.Hour, at(2))
	}
	if n := tb.Len(); n != 50 {
		t.Fatalf("50 expired and 50 live clients: %d entries held, want the 50 live", n)
	}
}

// Concurrent connections (run with -race): each client keeps one
// endpoint while others come and go.
func TestAffinityConcurrent(t *testing.T) {
	tb := NewTable(256)
	all := eps(16)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			first := tb.Choose(client(g), vip, "p", all, time.Hour, time.Now())
			for i := 0; i < 2000; i++ {
				tb.Choose(client(100+i%100), vip, "p", all, time.Hour, time.Now())
				if e := tb.Choose(client(g), vip, "p", all, time.Hour, time.Now()); e != first {
					errs <- fmt.Errorf("client %d moved from %v to %v", g, first, e)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}
