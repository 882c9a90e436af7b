package redirect

import (
	"context"
	"errors"
	"testing"
	"time"
)

// TestInstallBudgetSizing: the reserve an install keeps for its own
// rollback, from the runs it made, with no clock involved: each run of
// the work ends at the caller's deadline less that reserve.
func TestInstallBudgetSizing(t *testing.T) {
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	dual := DefaultSpec()
	type run struct {
		name string
		took time.Duration
	}
	for _, c := range []struct {
		why  string
		left time.Duration
		runs []run
		want time.Duration
	}{
		{"nothing ran yet: the floor", 8 * time.Second, nil, reserveFloor},
		{"an idle node: 8+2 saves of 12 ms, under the floor", 8 * time.Second,
			[]run{{"iptables-legacy-save", 12 * time.Millisecond}, {"iptables-legacy-restore", 13 * time.Millisecond}}, reserveFloor},
		{"a loaded node: 8 saves and 2 restores at the slowest save", 8 * time.Second,
			[]run{{"iptables-legacy-save", 66 * time.Millisecond}, {"ip6tables-legacy-save", 90 * time.Millisecond}}, 10 * 90 * time.Millisecond},
		{"a lock-free restore (iptables-nft) slower than the saves counts", 8 * time.Second,
			[]run{{"iptables-nft-save", 40 * time.Millisecond}, {"iptables-nft-restore", 100 * time.Millisecond}}, 8*40*time.Millisecond + 2*100*time.Millisecond},
		// kube-proxy held the lock for 1.2 s of a 2 s request: the
		// install got it, and its IPv6 runs (~25 ms) must not be cut
		// by a reserve grown from that wait (before: 1 s, half the
		// time, which ended the work before the IPv6 save started).
		{"a legacy restore's wait for the xtables lock does not count", 2 * time.Second,
			[]run{{"iptables-legacy-save", 12 * time.Millisecond}, {"iptables-legacy-restore", 1200 * time.Millisecond}}, reserveFloor},
		// Nine busy processes on 2 vCPUs: saves up to ~185 ms, the
		// rollback 0.7-1.4 s; capped at 1 s (before), an 8 s request's
		// rollback ran past its deadline and the answer was lost.
		{"a heavily loaded node keeps up to 2 s of an agent's 8 s request", 7500 * time.Millisecond,
			[]run{{"iptables-legacy-save", 185 * time.Millisecond}}, 10 * 185 * time.Millisecond},
		{"the cap: 2 s", 7500 * time.Millisecond,
			[]run{{"iptables-legacy-save", 300 * time.Millisecond}}, 2 * time.Second},
		{"the cap: half the time of a short request", 1 * time.Second,
			[]run{{"iptables-legacy-save", 200 * time.Millisecond}}, 500 * time.Millisecond},
		{"a failed run sizes nothing", 8 * time.Second,
			[]run{{"iptables-legacy-save!", 700 * time.Millisecond}}, reserveFloor},
	} {
		b := budgetAt(start.Add(c.left), start, dual)
		for _, r := range c.runs {
			var err error
			name := r.name
			if name[len(name)-1] == '!' {
				name, err = name[:len(name)-1], errors.New("exit status 1")
			}
			b.ran(context.Background(), name, r.took, err)
		}
		if got := b.reserve(); got != c.want {
			t.Errorf("%s: reserve %v, want %v", c.why, got, c.want)
		}
		ctx, cancel := b.run(context.Background())
		if dl, _ := ctx.Deadline(); !dl.Equal(start.Add(c.left - c.want)) {
			t.Errorf("%s: the run ends %v before the caller's deadline, want the reserve %v", c.why, start.Add(c.left).Sub(dl), c.want)
		}
		cancel()
		if b.cut() {
			t.Errorf("%s: counted as cut with no run stopped at the reserve", c.why)
		}
	}
}

// TestInstallBudgetCut: a run that ends at the reserve marks the
// install cut (its rollback then runs, and its error wraps the
// deadline), a run that fails on its own does not; an install without
// a deadline has no budget and its runs keep the caller's context.
func TestInstallBudgetCut(t *testing.T) {
	b := budgetAt(time.Now().Add(time.Hour), time.Now(), DefaultSpec())
	b.ran(context.Background(), "iptables-legacy-restore", time.Second, errors.New("exit status 4"))
	if b.cut() {
		t.Error("a restore that failed on its own counted as a cut")
	}
	done, cancel := context.WithCancel(context.Background())
	cancel()
	b.ran(done, "ip6tables-legacy-restore", time.Second, context.Canceled)
	if !b.cut() {
		t.Error("a restore stopped at the reserve not counted as a cut")
	}

	var none *installBudget = newInstallBudget(context.Background(), DefaultSpec())
	if none != nil {
		t.Fatalf("a budget for a caller without a deadline: %+v", none)
	}
	ctx := context.WithValue(context.Background(), struct{}{}, 1)
	got, cancel2 := none.run(ctx)
	defer cancel2()
	if got != ctx {
		t.Error("without a deadline a run's context is not the caller's")
	}
	none.ran(ctx, "iptables-legacy-save", time.Second, nil)
	if none.cut() {
		t.Error("a nil budget counted as cut")
	}
}
