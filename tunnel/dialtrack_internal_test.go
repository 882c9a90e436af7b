package tunnel

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/tunnel/internal/podtest"
	"github.com/ambit-mesh/ambit/tunnel/podnet"
)

// panicDialNet is a pod network whose dials panic (a bug in the dialing
// code, say). It has no DialLocal: 15006's app dial goes through Dial
// too.
type panicDialNet struct{ PodNetwork }

func (panicDialNet) Dial(context.Context, netip.Addr, netip.AddrPort) (net.Conn, error) {
	panic("test: Dial panics")
}

// TestDialPanicUntracks: a passthrough dial (15001) or an app dial
// (15006) that panics leaves the pod's closers as they were before it.
// The dial's cancel is tracked for Close's cut; the untrack after the
// dial was a plain call, skipped by the panic (the accept loop's recover
// resets the client), so the cancel stayed in sv.closers until the
// pod's serving closed, one per panic. Real pods (root): B redirected
// and served, its network's Dial panicking.
func TestDialPanicUntracks(t *testing.T) {
	testenv.RequireRoot(t)
	a, b := podtest.Pair(t)
	podtest.Redirect(t, b)
	p, reg, _ := newTestProxy(t, Config{Directory: noDirectory{}, Certificates: newTestCerts()})
	w := Workload{Namespace: "b", Name: "server-pod", IPs: []netip.Addr{b.IP4, b.IP6}, Identity: idServer, Meshed: true}
	sv := servePod(t, p, b, w, func(pn *podnet.Net) PodNetwork { return panicDialNet{pn} }, 15001, 15006)
	closers := func() int {
		sv.mu.Lock()
		defer sv.mu.Unlock()
		return len(sv.closers)
	}
	before := closers()

	for i, tc := range []struct {
		name string
		from *podtest.Pod
		dst  netip.AddrPort
	}{
		// B's app to an address outside the mesh: 15001's passthrough.
		{"passthrough", b, netip.AddrPortFrom(a.IP4, 80)},
		// Plaintext from A to B's app: 15006's app dial.
		{"inbound plaintext", a, netip.AddrPortFrom(b.IP4, 8080)},
	} {
		var c net.Conn
		var err error
		tc.from.Do(t, func() error {
			c, err = net.DialTimeout("tcp", tc.dst.String(), 10*time.Second)
			return nil
		})
		if err == nil {
			// Nothing written: a write could take the reset's error,
			// and the read then sees a plain EOF.
			c.SetDeadline(time.Now().Add(10 * time.Second))
			_, err = io.ReadAll(c)
			c.Close()
		}
		// The agent's reset may come before connect has returned: the
		// dial panics as soon as the connection is accepted.
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("%s: the client got %v after the dial panicked, want a reset", tc.name, err)
		}
		want := float64(i + 1)
		if got := pollUntil(want, func() float64 {
			return testenv.Metric(t, reg, "ambit_tunnel_connections_failed_total", map[string]string{"reason": "internal_error"})
		}); got != want {
			t.Fatalf("%s: failed_total{reason=internal_error} %v, want %v (the panic recovered)", tc.name, got, want)
		}
		if n := closers(); n != before {
			t.Errorf("%s: %d closers tracked after the panicked dial, want %d as before it", tc.name, n, before)
		}
	}
}
