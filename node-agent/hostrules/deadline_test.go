package hostrules

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
)

// TestAddContextEndsByItsDeadline: the host's xtables lock is held (a
// busy kube-proxy) when a pod's ADD adds its probe SNAT entry with the
// iptables-legacy backend and the rules must be written (the first pod,
// or the sets went missing). AddContext returns by the request's
// deadline, its error wrapping the deadline and naming the lock, so the
// agent can answer "retry" in time; and it does so as well when the
// Manager's own lock is held by an Add without a deadline, itself
// waiting for the xtables lock (its own bound: iptWait a run). Once the
// lock is free the entry is written and the probe is SNATed. Before,
// Add had no deadline: each iptables run waited up to 5 s for the lock,
// a rewrite a dozen runs, whatever the request's time.
func TestAddContextEndsByItsDeadline(t *testing.T) {
	tp := newTopo(t)
	tp.server(t)
	m, _ := newManager(t, tp, "iptables-legacy")
	release := testenv.HoldXtablesLock(t)
	ips := []netip.Addr{podV4, podV6}

	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	start := time.Now()
	err := m.AddContext(ctx, "uid-1", ips)
	t.Logf("AddContext while the xtables lock is held: %v after %v", err, time.Since(start).Round(time.Millisecond))
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "xtables lock") || !strings.Contains(err.Error(), "at the caller's deadline") {
		t.Fatalf("AddContext while the xtables lock is held: %v, want the deadline and the lock named", err)
	}

	// An Add without a deadline takes the Manager's lock and waits for
	// the xtables lock with its own bound.
	added := make(chan error, 1)
	go func() { added <- m.Add("uid-2", []netip.Addr{netip.MustParseAddr("10.77.1.3")}) }()
	testenv.Eventually(t, "the Add holding the Manager's lock", func() bool {
		if m.mu.lockContext(canceled()) == nil {
			m.mu.Unlock()
			return false
		}
		return true
	})
	ctx2, cancel2 := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel2()
	err = m.AddContext(ctx2, "uid-1", ips)
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "host rules' lock") {
		t.Fatalf("AddContext while another Add holds the Manager's lock: %v, want the deadline and that lock named", err)
	}
	err = <-added
	t.Logf("Add without a deadline while the xtables lock is held: %v", err)
	if err == nil || errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Add without a deadline while the lock is held: %v, want iptables' own failure at its --wait bound", err)
	}

	release()
	if err := m.AddContext(context.Background(), "uid-1", ips); err != nil {
		t.Fatalf("AddContext once the lock is free: %v", err)
	}
	if got := sourceSeen(t, tp.hostNS, "10.77.1.2:8080"); got != probe4 {
		t.Fatalf("probe source %s, want %s", got, probe4)
	}
}

func canceled() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}

// TestRunStoppedAtItsOwnBoundIsNotADeadline: an iptables run that
// outlasts its own bound (Config.RunTimeout; here 500 ms, shorter than
// the 5 s lock wait, so the held xtables lock stands in for a hung
// tool) while the caller's deadline is far off is the tool's failure:
// its error names the bound and does not wrap context.DeadlineExceeded,
// so an ADD whose requestTimeout is above the bound does not answer
// "out of time, retry" for it but logs it like any other host-rule
// error. A run the caller's deadline stops still wraps it. Before, both
// wrapped DeadlineExceeded.
func TestRunStoppedAtItsOwnBoundIsNotADeadline(t *testing.T) {
	tp := newTopo(t)
	m, err := New(Config{Backend: "iptables-legacy", NetNS: tp.hostNS, Interval: time.Hour, RunTimeout: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Uninstall() })
	release := testenv.HoldXtablesLock(t)

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err = m.AddContext(ctx, "uid-1", []netip.Addr{podV4})
	t.Logf("AddContext, deadline a minute away, run bound 500ms, xtables lock held: %v", err)
	if err == nil || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		t.Fatalf("AddContext stopped at the run's own bound: %v, want an error that is not the caller's deadline", err)
	}
	for _, want := range []string{"at its own 500ms bound", "xtables lock"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not say %q: %v", want, err)
		}
	}

	short, cancel2 := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel2()
	if err := m.AddContext(short, "uid-1", []netip.Addr{podV4}); !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "at the caller's deadline") {
		t.Fatalf("AddContext stopped at the caller's deadline: %v, want it wrapping DeadlineExceeded", err)
	}

	release()
	if err := m.Reconcile(); err != nil {
		t.Fatalf("reconcile once the lock is free: %v", err)
	}
	if got := m.Entries()[podV4]; got != "uid-1" {
		t.Fatalf("entry after the repair: owner %q, want uid-1", got)
	}
}
