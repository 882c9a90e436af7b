package tunnel

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/tunnel/hbone"
	"github.com/ambit-mesh/ambit/tunnel/internal/podtest"
	"github.com/ambit-mesh/ambit/tunnel/podnet"
)

// The set-up the internal tests share: a Proxy with its metrics and log,
// a loopback HBONE peer for the pool's tests, a pod served in its netns.

// testPeerCerts is a fresh root with leaves for idServer and idClient:
// both ends of an HBONE connection between the tests' agents.
func testPeerCerts(t *testing.T) *testCerts {
	t.Helper()
	root := mint(t, caTmpl("root"), nil)
	certs := newTestCerts(root.cert)
	certs.set(idServer, chain(mint(t, leafTmpl(t, idServer), root)))
	certs.set(idClient, chain(mint(t, leafTmpl(t, idClient), root)))
	return certs
}

// newTestProxy is New(cfg), failing the test on an error, with its
// metrics in a registry of its own and its log (Info and up) in a
// buffer: cfg's Registerer and Logger are replaced.
func newTestProxy(t *testing.T, cfg Config) (*Proxy, *prometheus.Registry, *testenv.Buffer) {
	t.Helper()
	reg, logs := prometheus.NewRegistry(), &testenv.Buffer{}
	cfg.Registerer, cfg.Logger = reg, slog.New(slog.NewTextHandler(logs, nil))
	p, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return p, reg, logs
}

// loopPeer serves idServer's HBONE, with p's certificates and settings,
// on a loopback listener closed with the test: the peer of the pool's
// tests, which dial it from the host (loopNet). handler answers its
// streams; handshake, if set, hears how each connection's handshake
// ended (a connection that came up is closed with the test). It returns
// the pool key of idClient's connections to it.
func loopPeer(t *testing.T, p *Proxy, handler func(*hbone.Stream), handshake func(*hbone.Conn, error)) poolKey {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			raw, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer cancel()
				hc, err := hbone.Server(ctx, raw, p.serverTLS(idServer, &peerState{}), p.hcfg, nil, handler)
				if err == nil {
					t.Cleanup(func() { hc.Close() })
				}
				if handshake != nil {
					handshake(hc, err)
				}
			}()
		}
	}()
	return poolKey{src: idClient, dst: idServer, addr: netip.MustParseAddrPort(ln.Addr().String())}
}

// servePod serves w, pod pp's workload, through p: listeners on ports
// (15001, 15006, 15008) in the pod's netns, and Pod.Net wrap(the pod's
// network), or the network itself when wrap is nil. The pod's network
// and its serving close with the test (the serving within 2 s).
func servePod(t *testing.T, p *Proxy, pp *podtest.Pod, w Workload, wrap func(*podnet.Net) PodNetwork, ports ...uint16) *Serving {
	t.Helper()
	pn, err := podnet.Open(pp.File(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pn.Close() })
	pod := Pod{Workload: w, Net: pn}
	if wrap != nil {
		pod.Net = wrap(pn)
	}
	for _, port := range ports {
		ln, err := pn.Listen(port, podnet.ListenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		switch port {
		case 15001:
			pod.Outbound = ln
		case 15006:
			pod.Inbound = ln
		case 15008:
			pod.HBONE = ln
		default:
			t.Fatalf("servePod: %d is not an agent port", port)
		}
	}
	return ServeForTest(t, p, pod)
}

// ServeForTest is p.Serve(pod) for a test, failing it on an error; the
// serving closes with the test, within 2 s. Exported for the external
// tests (tunnel_test): a _test.go file of package tunnel is compiled
// into it for the package's tests only.
func ServeForTest(t testing.TB, p *Proxy, pod Pod) *Serving {
	t.Helper()
	sv, err := p.Serve(pod)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		sv.Close(ctx)
	})
	return sv
}

// pollUntil polls get every 10 ms until it returns want or 10 s pass, and
// returns what it last returned.
func pollUntil[T comparable](want T, get func() T) T {
	deadline := time.Now().Add(10 * time.Second)
	got := get()
	for got != want && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
		got = get()
	}
	return got
}

// echoApp is an app in pp that echoes every connection on port (v4 and
// v6) until the test ends; open says how many of its connections are
// open now (the agent closed its side of the others).
func echoApp(t *testing.T, pp *podtest.Pod, port uint16) (open func() int64) {
	t.Helper()
	var ln net.Listener
	pp.Do(t, func() (err error) {
		ln, err = net.Listen("tcp", netip.AddrPortFrom(netip.IPv6Unspecified(), port).String())
		return
	})
	t.Cleanup(func() { ln.Close() })
	var n atomic.Int64
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			n.Add(1)
			go func() { io.Copy(c, c); c.Close(); n.Add(-1) }()
		}
	}()
	return n.Load
}

// meshedPair is two pods with the redirection in, the workloads the
// tests give them (A's client-pod as idClient, B's server-pod as
// idServer, both meshed) and a directory naming their IPv4 addresses.
func meshedPair(t *testing.T) (a, b *podtest.Pod, wa, wb Workload, dir mapDirectory) {
	t.Helper()
	a, b = podtest.Pair(t)
	podtest.Redirect(t, a)
	podtest.Redirect(t, b)
	wa = Workload{Namespace: "a", Name: "client-pod", IPs: []netip.Addr{a.IP4, a.IP6}, Identity: idClient, Meshed: true}
	wb = Workload{Namespace: "b", Name: "server-pod", IPs: []netip.Addr{b.IP4, b.IP6}, Identity: idServer, Meshed: true}
	return a, b, wa, wb, mapDirectory{a.IP4: wa, b.IP4: wb}
}
