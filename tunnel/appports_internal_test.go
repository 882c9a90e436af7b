package tunnel

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"testing"
	"time"
)

// TestAppPorts: the ports a pod's apps were delivered to are remembered,
// each once, from any number of deliveries at once; past the slots the
// rest are not (and nothing breaks).
func TestAppPorts(t *testing.T) {
	var a appPorts
	if a.has(8080) {
		t.Fatal("an empty set has 8080")
	}
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for _, p := range []uint16{8080, 9090, 8080, 3000} {
				a.add(p)
			}
		}()
	}
	wg.Wait()
	n := 0
	for i := range a.slots {
		if a.slots[i].Load() != 0 {
			n++
		}
	}
	if n != 3 || !a.has(8080) || !a.has(9090) || !a.has(3000) || a.has(3001) {
		t.Fatalf("after 8 × {8080, 9090, 8080, 3000}: %d slots used, has 8080/9090/3000/3001 = %v/%v/%v/%v; want 3, true, true, true, false",
			n, a.has(8080), a.has(9090), a.has(3000), a.has(3001))
	}
	for p := uint16(10000); p < 10100; p++ {
		a.add(p)
	}
	if !a.has(8080) || !a.has(10000) || a.has(10099) {
		t.Fatalf("past the slots: has 8080/10000/10099 = %v/%v/%v, want true, true, false", a.has(8080), a.has(10000), a.has(10099))
	}
}

// ownPortNet is a PodNetwork whose plaintext deliveries fail unless the
// port is open, and which records what avoid reports for some ports.
type ownPortNet struct {
	open   uint16
	avoids map[uint16]bool
}

func (n *ownPortNet) Dial(context.Context, netip.Addr, netip.AddrPort) (net.Conn, error) {
	return nil, errors.New("not used")
}

func (n *ownPortNet) DialLocalOwnPort(_ context.Context, _ netip.Addr, dst netip.AddrPort, avoid func(uint16) bool) (net.Conn, error) {
	n.avoids = map[uint16]bool{}
	for _, p := range []uint16{8080, 9090, dst.Port()} {
		n.avoids[p] = avoid(p)
	}
	if dst.Port() != n.open {
		return nil, syscall.ECONNREFUSED
	}
	c, s := net.Pipe()
	s.Close()
	return c, nil
}

// TestDeliveriesLearnAppPorts: a plaintext delivery avoids its own
// destination port and the app ports learned so far; only a delivery the
// app answered teaches its port (a scan of closed ports would otherwise
// fill the set and leave the real app ports unprotected).
func TestDeliveriesLearnAppPorts(t *testing.T) {
	n := &ownPortNet{open: 8080}
	sv := &Serving{p: &Proxy{connectTimeout: time.Second}, pod: Pod{Net: n}}
	client, pod := netip.MustParseAddr("10.1.0.1"), netip.MustParseAddr("10.1.0.2")
	for p := uint16(1); p <= 40; p++ {
		sv.dialApp(context.Background(), client, netip.AddrPortFrom(pod, p), true)
	}
	if sv.appPorts.has(1) || sv.appPorts.slots[0].Load() != 0 {
		t.Fatalf("after 40 refused deliveries the set holds %d, want nothing", sv.appPorts.slots[0].Load())
	}
	c, err := sv.dialApp(context.Background(), client, netip.AddrPortFrom(pod, 8080), true)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if !n.avoids[8080] || n.avoids[9090] {
		t.Errorf("delivery to 8080 avoided %v, want its own port and nothing else yet", n.avoids)
	}
	sv.dialApp(context.Background(), client, netip.AddrPortFrom(pod, 9090), true)
	if !n.avoids[8080] || !n.avoids[9090] || !sv.appPorts.has(8080) || sv.appPorts.has(9090) {
		t.Errorf("then a refused delivery to 9090 avoided %v, set has 8080 %v 9090 %v; want both avoided, only 8080 learned",
			n.avoids, sv.appPorts.has(8080), sv.appPorts.has(9090))
	}
}
