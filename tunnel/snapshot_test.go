package tunnel_test

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/tunnel"
	"github.com/ambit-mesh/ambit/tunnel/internal/meshtest"
)

// hidden is the mesh's directory with one address left out: a
// destination outside the mesh, for passthrough. Set once the mesh is
// built (the proxies are made with it).
type hidden struct {
	mu   sync.Mutex
	dir  *meshtest.Directory
	addr netip.Addr
}

func (h *hidden) set(dir *meshtest.Directory, addr netip.Addr) {
	h.mu.Lock()
	h.dir, h.addr = dir, addr
	h.mu.Unlock()
}

func (h *hidden) get() (*meshtest.Directory, netip.Addr) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.dir, h.addr
}

func (h *hidden) WorkloadByIP(ip netip.Addr) (tunnel.Workload, bool) {
	dir, addr := h.get()
	if ip == addr {
		return tunnel.Workload{}, false
	}
	return dir.WorkloadByIP(ip)
}

func (h *hidden) ServiceEndpoints(vip netip.AddrPort) ([]netip.AddrPort, bool) {
	dir, _ := h.get()
	return dir.ServiceEndpoints(vip)
}

// TestConnCounts: what `ambit-agent status` shows per pod follows the
// pod's connections of each kind while they are open, and goes back to
// zero once they end. A (client side) opens an HBONE connection to B's
// app on B's IPv4, and a passthrough one to B's IPv6, which A's
// directory does not know (B's agent takes it in plaintext on 15006); a
// connection A's rules do not capture (the agent's mark) reaches B in
// plaintext too.
func TestConnCounts(t *testing.T) {
	testenv.RequireRoot(t)
	dir := &hidden{}
	m := meshtest.New(t, meshtest.Options{Config: tunnel.Config{Directory: dir}})
	dir.set(m.Dir, m.B.Pod.IP6)
	serve := func(ln net.Listener) {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				fmt.Fprintf(c, "hi\n")
				buf := make([]byte, 64)
				for {
					if _, err := c.Read(buf); err != nil {
						return
					}
				}
			}()
		}
	}
	go serve(m.B.Listen(t, ":8080"))
	greeted := func(c net.Conn, err error) net.Conn {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if l, err := bufio.NewReader(c).ReadString('\n'); err != nil || l != "hi\n" {
			t.Fatalf("%v: %q %v", c.RemoteAddr(), l, err)
		}
		return c
	}
	hb := greeted(m.A.Dial(netip.AddrPortFrom(m.B.Pod.IP4, 8080)))
	pt := greeted(m.A.Dial(netip.AddrPortFrom(m.B.Pod.IP6, 8080)))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	plain := greeted(m.A.Net.Dial(ctx, netip.Addr{}, netip.AddrPortFrom(m.B.Pod.IP4, 8080)))

	want := func(what string, a, b tunnel.ConnCounts) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			ga, gb := m.A.Serving.ConnCounts(), m.B.Serving.ConnCounts()
			if ga == a && gb == b {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: A %+v (want %+v), B %+v (want %+v)", what, ga, a, gb, b)
			}
			time.Sleep(20 * time.Millisecond)
		}
		if got := m.A.Proxy.ConnCounts()[m.A.Serving]; got != a {
			t.Fatalf("%s: the Proxy's map has A at %+v, the Serving %+v", what, got, a)
		}
	}
	want("all open",
		tunnel.ConnCounts{Held: 2, OutboundHBONE: 1, HBONEConnsOut: 1},
		tunnel.ConnCounts{Held: 3, InboundHBONE: 1, InboundPlaintext: 2, HBONEConnsIn: 1})
	if a := m.A.Serving.ConnCounts(); a.OutboundOther() != 1 {
		t.Fatalf("A's passthrough: %d, want 1 (%+v)", a.OutboundOther(), a)
	}
	if b := m.B.Serving.ConnCounts(); b.OutboundOther() != 0 {
		t.Fatalf("B has no outbound connection, OutboundOther %d (%+v)", b.OutboundOther(), b)
	}
	hb.Close()
	pt.Close()
	plain.Close()
	// The pooled HBONE connection stays (idle) for the next stream.
	want("all closed",
		tunnel.ConnCounts{HBONEConnsOut: 1},
		tunnel.ConnCounts{HBONEConnsIn: 1})
}
