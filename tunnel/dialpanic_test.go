package tunnel_test

import (
	"errors"
	"io"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
)

// TestOutboundDialPanic: a panic in the client-certificate callback of
// an outbound HBONE dial (B's Certificates panics once, B's app calls
// A) resets that app's connection, counts it as internal_error, and the
// agent goes on: the next connection dials again and reaches A. The
// pool's dial runs on its own goroutine, outside the connection's
// recover: the panic used to end the agent's process (here the test
// binary).
func TestOutboundDialPanic(t *testing.T) {
	testenv.RequireRoot(t)
	m, po := meshPanicOnceB(t)
	go peerEcho(m.A.Listen(t, "[::]:8080"))
	po.armed.Store(true)

	// The agent resets the app's connection as soon as the dial panics,
	// which on a loaded machine can be before the app's connect(2) has
	// returned: a reset there is the same outcome (1 in ~6 runs here).
	c, err := m.B.Dial(netip.AddrPortFrom(m.A.Pod.IP4, 8080))
	switch {
	case errors.Is(err, syscall.ECONNRESET):
	case err != nil:
		t.Fatal(err)
	default:
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, "who\n")
		if _, err := io.ReadAll(c); !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("B's app read %v from a connection whose dial panicked, want a reset", err)
		}
	}
	if po.armed.Load() {
		t.Fatal("B's Certificate was not called by the dial")
	}
	waitMetric(t, m.B, "ambit_tunnel_connections_failed_total",
		map[string]string{"direction": "outbound", "reason": "internal_error"}, 1)

	c2, err := m.B.Dial(netip.AddrPortFrom(m.A.Pod.IP4, 8080))
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	c2.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(c2, "who\n")
	if b, err := io.ReadAll(c2); len(b) == 0 {
		t.Fatalf("B does not reach A after the panicked dial: %v", err)
	}
	if n := m.B.Metric(t, "ambit_tunnel_connections_opened_total", map[string]string{"direction": "outbound"}); n != 1 {
		t.Errorf("B's outbound connections_opened_total %v, want 1", n)
	}
}
