package tunnel

import (
	"context"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// holdWindow is how long a Close that must wait for a lingering socket
// is watched for returning anyway. A broken Close returns within
// microseconds of closing the pool; a correct one cannot return at all
// while the peer sends (the linger runs to 10 x PingTimeout, the test's
// deadline is 20 s), so the window decides nothing by its length.
const holdWindow = 500 * time.Millisecond

// TestCloseHoldsWhileAnEvictedPooledSocketLingers: the pool evicted an
// idle connection before the pod's Close and its socket lingers, the
// peer still sending. TestCloseWaitsForAPooledSocketEvictedBefore
// stops the peer as soon as Close is started (the gauge said 1 before
// it began), so with Close's wait for lingering sockets removed it
// still passed 8 runs in 40: Close, returning at once, often returned
// only after the peer's stop had already ended the linger. Here the
// peer goes on until Close has closed the pool (all that is left to it
// is that wait) and a window has passed in which Close must not return.
func TestCloseHoldsWhileAnEvictedPooledSocketLingers(t *testing.T) {
	p, sv, c, pg := lingerPooled(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	res := make(chan error, 1)
	go func() { res <- sv.Close(ctx) }()
	if !pollUntil(true, sv.pool.closed) {
		t.Fatal("Close did not close the pod's pool within 10 s")
	}
	select {
	case err := <-res:
		t.Fatalf("Close returned (%v) while the evicted connection's socket lingered, its peer still sending: an agent exiting then has the kernel reset it", err)
	case <-c.Gone():
		t.Fatal("the evicted connection's socket closed while its peer still sent: the premise (a lingering socket) does not hold")
	case <-time.After(holdWindow):
	}
	pg.stop()
	select {
	case err := <-res:
		if err != nil {
			t.Errorf("Close = %v, want nil: the peer ended well within the deadline", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return 10 s after the peer's end")
	}
	select {
	case <-c.Gone():
	default:
		t.Error("Close returned with the evicted connection's socket open")
	}
	if got := testutil.ToFloat64(p.m.lingering); got != 0 {
		t.Errorf("ambit_tunnel_lingering_connections = %v once Close returned, want 0", got)
	}
}

// TestCloseHoldsWhileAnInboundSocketLingers: the same for the inbound
// connection Close itself shut down: once the peer read our
// close_notify and the gauge counts the socket lingering, Close must
// still be waiting, and stay so while the peer sends.
func TestCloseHoldsWhileAnInboundSocketLingers(t *testing.T) {
	p, sv, _, dial := lingerServer(t, Config{})
	pg := dial()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	res := make(chan error, 1)
	go func() { res <- sv.Close(ctx) }()
	recv(t, pg.notified, "B's close_notify")
	if got := pollUntil(1, func() float64 { return testutil.ToFloat64(p.m.lingering) }); got != 1 {
		t.Fatalf("ambit_tunnel_lingering_connections = %v after the clean close, want 1", got)
	}
	select {
	case err := <-res:
		t.Fatalf("Close returned (%v) while the inbound connection's socket lingered, its peer still sending", err)
	case <-time.After(holdWindow):
	}
	pg.stop()
	select {
	case err := <-res:
		if err != nil {
			t.Errorf("Close = %v, want nil: the peer ended well within the deadline", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return 10 s after the peer's end")
	}
	if got := testutil.ToFloat64(p.m.lingering); got != 0 {
		t.Errorf("ambit_tunnel_lingering_connections = %v once Close returned, want 0", got)
	}
}
