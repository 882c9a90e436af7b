package tunnel_test

import (
	"context"
	"crypto/tls"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testca"
	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/tunnel"
	"github.com/ambit-mesh/ambit/tunnel/internal/meshtest"
)

// panicOnce is B's certificate source whose next Certificate call,
// once armed, panics (a bug in the identity manager, say).
type panicOnce struct {
	*testca.Store
	armed atomic.Bool
}

func (p *panicOnce) Certificate(ctx context.Context, identity string) (*tls.Certificate, error) {
	if p.armed.CompareAndSwap(true, false) {
		panic("test: Certificate panics")
	}
	return p.Store.Certificate(ctx, identity)
}

// meshPanicOnceB is a mesh whose B agent takes its certificates from
// the panicOnce returned, not armed yet.
func meshPanicOnceB(t *testing.T) (*meshtest.Mesh, *panicOnce) {
	po := &panicOnce{}
	m := meshtest.New(t, meshtest.Options{CertificatesB: func(s *testca.Store) tunnel.Certificates {
		po.Store = s
		return po
	}})
	return m, po
}

// TestHandshakePanicEndsPending: a panic in B's GetCertificate during an
// inbound HBONE handshake still ends that handshake's pending state.
// It used to stay listed (gauge at 1, a slot of the pod's and the
// agent's limits held) until an eviction pass or the pod's close
// reached it: the panic skipped the plain calls after hbone.Server, and
// only the accept loop's recover ran.
func TestHandshakePanicEndsPending(t *testing.T) {
	testenv.RequireRoot(t)
	m, po := meshPanicOnceB(t)
	go peerEcho(m.B.Listen(t, "[::]:8080"))
	po.armed.Store(true)

	raw, err := m.A.Net.Dial(context.Background(), netip.Addr{}, netip.AddrPortFrom(m.B.Pod.IP4, 15008))
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	raw.SetDeadline(time.Now().Add(10 * time.Second))
	tc := tls.Client(raw, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}})
	if err := tc.Handshake(); err == nil {
		t.Fatal("handshake succeeded although B's GetCertificate panicked")
	}
	if po.armed.Load() {
		t.Fatal("B's Certificate was not called by the handshake")
	}
	waitMetric(t, m.B, "ambit_tunnel_connections_failed_total", map[string]string{"reason": "internal_error"}, 1)

	// The agent goes on serving, and the panicked handshake's entry is
	// gone: only this request's own handshake was pending since, and
	// it finished.
	if !reaches(t, m) {
		t.Fatal("A does not reach B after the panic")
	}
	waitMetric(t, m.B, "ambit_tunnel_pending_handshakes", nil, 0)
}
