package tunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/tunnel/hbone"
)

// waitingCerts is a certificate source that has no certificate for
// idClient yet and waits for one (the identity manager fetching it from
// an unreachable CA) for as long as its caller's context allows; it
// hands that context to ctxs. release ends the wait at the test's end.
type waitingCerts struct {
	*testCerts
	ctxs    chan context.Context
	release chan struct{}
}

func (c *waitingCerts) Certificate(ctx context.Context, id string) (*tls.Certificate, error) {
	if id != idClient {
		return c.testCerts.Certificate(ctx, id)
	}
	select {
	case c.ctxs <- ctx:
	default:
	}
	select {
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-c.release:
		return nil, errors.New("test: released")
	}
}

// TestClientCertificateWaitEndsWithTheDial: the pool's handshake asks
// for our client certificate with the dial's context, so a certificate
// that cannot be had (the CA unreachable: the identity manager waits up
// to its fetch timeout, 30 s, and longer behind other fetches) ends the
// dial at the connect timeout, and a closing pool ends it at once. The
// callback was given a context without cancel or deadline: the dial
// outlived the connect timeout and the pool's close (its goroutine and
// socket held, Serving.Close and Abort waiting for it), for as long as
// the certificate source chose to wait.
func TestClientCertificateWaitEndsWithTheDial(t *testing.T) {
	certs := &waitingCerts{testCerts: testPeerCerts(t), ctxs: make(chan context.Context, 1), release: make(chan struct{})}
	t.Cleanup(func() { close(certs.release) })
	p, _, _ := newTestProxy(t, Config{Directory: noDirectory{}, Certificates: certs,
		PoolIdleTimeout: time.Hour,
		ConnectTimeout:  300 * time.Millisecond})
	key := loopPeer(t, p, func(s *hbone.Stream) { s.Respond(200, nil) }, nil)
	pl := newPool(p, &loopNet{})
	defer pl.close()

	errs := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		_, err := pl.conn(ctx, key)
		errs <- err
	}()
	var asked context.Context
	select {
	case asked = <-certs.ctxs:
	case <-time.After(10 * time.Second):
		t.Fatal("the pool's handshake never asked for the client certificate")
	}
	select {
	case <-asked.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the client certificate is still awaited 10 s after the dial's connect timeout (300 ms): its context is not the dial's")
	}
	err := <-errs
	var de *dialError
	if !errors.As(err, &de) || de.reason != "tls" {
		t.Errorf("the dial ended with %v, want a dialError with reason tls (the handshake did not end in time)", err)
	}
}
