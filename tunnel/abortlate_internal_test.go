package tunnel

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"
)

// TestAbortResetsAHandshakeAcceptedAsItBegan: a connection to the pod's
// 15008, accepted just before Abort closed the listener, whose handler
// has not registered it yet (testHBONEAccepted holds it there) while
// Abort resets the pod's sockets and evicts its pending handshakes. Once
// it goes on, its handshake must end at once with a reset, as the ones
// Abort saw did. It was added after the eviction and waited for its
// peer up to the handshake timeout (10 s), holding the pod's release
// that long, and then closed with a FIN, in a namespace whose interface
// was gone. Close's cut left such a handshake the same way.
func TestAbortResetsAHandshakeAcceptedAsItBegan(t *testing.T) {
	p, _, _ := newTestProxy(t, Config{Directory: noDirectory{}, Certificates: testPeerCerts(t),
		HandshakeTimeout: 5 * time.Second})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	accepted, release := make(chan struct{}), make(chan struct{})
	testHBONEAccepted = func() {
		close(accepted)
		<-release
	}
	t.Cleanup(func() { testHBONEAccepted = nil })
	sv := ServeForTest(t, p, Pod{Net: &loopNet{}, HBONE: ln, Workload: Workload{Namespace: "b", Name: "server-pod",
		IPs: []netip.Addr{netip.MustParseAddr("127.0.0.1")}, Identity: idServer, Meshed: true}})
	// A client that sends nothing: its handshake waits on it.
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	select {
	case <-accepted:
	case <-time.After(5 * time.Second):
		t.Fatal("the pod's 15008 never accepted the connection")
	}

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	sv.Abort(ctx) // its handler is still held: Abort's wait ends with ctx
	cancel()
	close(release)
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	_, err = c.Read(make([]byte, 1))
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatal("the handshake accepted as Abort began is still pending 3 s after it")
	}
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("the client read %v, want a reset", err)
	}
}
