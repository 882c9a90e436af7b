package tunnel

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"
)

// abortBounded runs sv.Abort with a short bound it must run out of, and
// returns its error, which must wrap the deadline's.
func abortBounded(t *testing.T, sv *Serving) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	err := sv.Abort(ctx)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Abort = %v, want an error wrapping the deadline's", err)
	}
	t.Logf("Abort: %v", err)
	return err
}

// TestAbortErrorNamesPendingHandlers: Abort runs out of its bound with
// a handler still running (one counted in, never out): its error says
// so, for the agent's log line on a DEL.
func TestAbortErrorNamesPendingHandlers(t *testing.T) {
	p, _, _ := newTestProxy(t, Config{Directory: noDirectory{}, Certificates: testPeerCerts(t)})
	w := Workload{Namespace: "a", Name: "client-pod", IPs: []netip.Addr{netip.MustParseAddr("10.0.0.1")}, Identity: idClient, Meshed: true}
	sv := ServeForTest(t, p, Pod{Workload: w, Net: &loopNet{}})
	sv.enter()
	t.Cleanup(sv.leave)
	if err := abortBounded(t, sv); !strings.Contains(err.Error(), "handlers not all done") || !strings.Contains(err.Error(), "1 connections or streams") {
		t.Errorf("Abort's error %q does not name the handler still running", err)
	}
}

// TestAbortErrorNamesPendingSockets: the pod's handlers are all done,
// but a pool dial is still to end (held with its handshake done, so
// the reset of the pool does not cut it short) when Abort's bound
// runs out: the error must say it was sockets, not handlers (the
// agent's line said "some handlers not done" either way).
func TestAbortErrorNamesPendingSockets(t *testing.T) {
	_, sv, _, release, _ := lateDial(t)
	err := abortBounded(t, sv)
	release()
	if msg := err.Error(); !strings.Contains(msg, "handlers done, but not its sockets") || !strings.Contains(msg, "1 pool dials still ending") {
		t.Errorf("Abort's error %q does not say it was left with a dial, its handlers done", err)
	}
}
