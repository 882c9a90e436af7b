package benchkit

import (
	"context"
	"io"
	"net"
	"net/netip"
	"testing"

	"github.com/ambit-mesh/ambit/tunnel/internal/meshtest"
	"github.com/ambit-mesh/ambit/tunnel/internal/podtest"
	"github.com/ambit-mesh/ambit/tunnel/podnet"
)

// Plain is two pods on a veth link without any redirection, the apps
// served in B, and unmarked socket factories for both pods.
type Plain struct {
	A, B   *podtest.Pod
	NA, NB *podnet.Net
}

// NewPlain builds a Plain pair with the apps in B.
func NewPlain(tb testing.TB) *Plain {
	a, b := podtest.Pair(tb)
	p := &Plain{A: a, B: b, NA: open(tb, a), NB: open(tb, b)}
	ServeApps(func(port uint16) net.Listener { return listen(tb, p.NB, port) })
	ServeIperf(tb, p.B.Name)
	return p
}

func open(tb testing.TB, p *podtest.Pod) *podnet.Net {
	n, err := podnet.Open(p.File(tb), podnet.WithMark(0))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { n.Close() })
	return n
}

func listen(tb testing.TB, n *podnet.Net, port uint16) net.Listener {
	ln, err := n.Listen(port, podnet.ListenOptions{NoTransparent: true})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { ln.Close() })
	return ln
}

// Direct: the client in A connects straight to B's app.
func Direct(tb testing.TB) Setup {
	p := NewPlain(tb)
	return Setup{Name: "direct", Dial: func(port uint16) (net.Conn, error) {
		return p.NA.Dial(context.Background(), netip.Addr{}, netip.AddrPortFrom(p.B.IP4, port))
	}, Iperf: &IperfTarget{Netns: p.A.Name, Addr: netip.AddrPortFrom(p.B.IP4, PortIperf)}}
}

// RelayPair: one plain TCP relay in each pod, no crypto; the client in A
// connects to its local relay, which connects to B's relay, which
// connects to the app: the floor for any two userspace hops here.
func RelayPair(tb testing.TB) Setup {
	p := NewPlain(tb)
	for _, port := range []uint16{PortSink, PortRR, PortPing, PortIperf} {
		relay(listen(tb, p.NB, 27000+port), func() (net.Conn, error) {
			return p.NB.Dial(context.Background(), netip.Addr{}, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port))
		})
		relay(listen(tb, p.NA, 17000+port), func() (net.Conn, error) {
			return p.NA.Dial(context.Background(), netip.Addr{}, netip.AddrPortFrom(p.B.IP4, 27000+port))
		})
	}
	return Setup{Name: "relay pair", Dial: func(port uint16) (net.Conn, error) {
		return p.NA.Dial(context.Background(), netip.Addr{}, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), 17000+port))
	}, Iperf: LocalIperf(p.A.Name)}
}

// relay forwards every connection of ln to a new upstream connection.
func relay(ln net.Listener, up func() (net.Conn, error)) {
	go accept(ln, func(c net.Conn) {
		u, err := up()
		if err != nil {
			return
		}
		defer u.Close()
		Pipe(c, u)
	})
}

// Pipe copies both ways (splice(2) between TCP sockets) carrying
// half-closes, until both directions end.
func Pipe(a, b net.Conn) {
	done := make(chan struct{})
	go func() {
		io.Copy(b, a)
		if cw, ok := b.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
		}
		close(done)
	}()
	io.Copy(a, b)
	if cw, ok := a.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
	<-done
}

// Ambit: the mesh of meshtest (redirection in both pods, an agent per
// pod); the client in A connects to B's app address and is captured.
func Ambit(tb testing.TB, o meshtest.Options) (Setup, *meshtest.Mesh) {
	m := meshtest.New(tb, o)
	ServeApps(func(port uint16) net.Listener {
		var ln net.Listener
		m.B.Pod.Do(tb, func() (err error) { ln, err = net.Listen("tcp", ":"+itoa(port)); return })
		tb.Cleanup(func() { ln.Close() })
		return ln
	})
	ServeIperf(tb, m.B.Pod.Name)
	client := open(tb, m.A.Pod)
	return Setup{Name: "ambit", Dial: func(port uint16) (net.Conn, error) {
		return client.Dial(context.Background(), netip.Addr{}, netip.AddrPortFrom(m.B.Pod.IP4, port))
	}, Iperf: &IperfTarget{Netns: m.A.Pod.Name, Addr: netip.AddrPortFrom(m.B.Pod.IP4, PortIperf)}}, m
}

func itoa(p uint16) string {
	b := []byte{}
	for p > 0 || len(b) == 0 {
		b = append([]byte{byte('0' + p%10)}, b...)
		p /= 10
	}
	return string(b)
}
