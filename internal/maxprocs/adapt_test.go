package maxprocs

import (
	"context"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
)

func TestNext(t *testing.T) {
	hold := 3 * time.Second
	for _, c := range []struct {
		name        string
		p           int
		busy        float64
		low         time.Duration
		floor, ceil int
		want        int
	}{
		{"light load stays on one", 1, 0.15, 0, 1, 2, 1},
		{"a busy P takes the second", 1, 0.95, 0, 1, 2, 2},
		{"at the threshold", 1, 0.6, 0, 1, 2, 2},
		{"never past the ceiling", 2, 1.9, 0, 1, 2, 2},
		{"a big node doubles its way up", 2, 1.9, 0, 1, 8, 4},
		{"and jumps when calls outside the Ps show more", 1, 2.5, 0, 1, 8, 5},
		{"low, but not for long enough", 2, 0.1, 2 * time.Second, 1, 2, 2},
		{"low long enough: one back", 2, 0.1, 3 * time.Second, 1, 2, 1},
		{"never below the floor", 1, 0, time.Hour, 1, 2, 1},
		{"down one at a time", 8, 0.2, 3 * time.Second, 1, 8, 7},
	} {
		if got := next(c.p, c.busy, c.low, hold, c.floor, c.ceil); got != c.want {
			t.Errorf("%s: next(%d, %.2f, %v, floor %d, ceiling %d) = %d, want %d", c.name, c.p, c.busy, c.low, c.floor, c.ceil, got, c.want)
		}
	}
	// The band between the thresholds moves neither way: two Ps at 0.5
	// CPUs is too busy to give one back (one P would run at 50 %) and
	// too idle to take a third.
	if lowEnough(2, 0.5) {
		t.Error("0.5 CPUs on two Ps counted as low enough for one")
	}
	if !lowEnough(2, 0.3) {
		t.Error("0.3 CPUs on two Ps not counted as low enough for one")
	}
}

// fakeLoad is a process whose CPU use is set by the test: busy CPUs,
// accrued against wall time.
type fakeLoad struct {
	mu    sync.Mutex
	busy  float64
	at    time.Time
	total time.Duration
}

func (f *fakeLoad) cpu() (time.Duration, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	now := time.Now()
	if !f.at.IsZero() {
		f.total += time.Duration(f.busy * float64(now.Sub(f.at)))
	}
	f.at = now
	return f.total, nil
}

func (f *fakeLoad) setBusy(b float64) {
	f.cpu() // accrue at the old rate first
	f.mu.Lock()
	f.busy = b
	f.mu.Unlock()
}

// TestAdaptiveFollowsTheLoad: the count starts at the floor, rises as
// soon as the P is busy and comes back only after the load has stayed
// low for Hold.
func TestAdaptiveFollowsTheLoad(t *testing.T) {
	load := &fakeLoad{}
	var procs atomic.Int64
	var changes atomic.Int64
	a := &Adaptive{Floor: 1, Ceiling: 2, Every: 5 * time.Millisecond, Hold: 300 * time.Millisecond,
		OnChange: func(from, to int, busy float64) { changes.Add(1) },
		cpu:      load.cpu, set: func(n int) { procs.Store(int64(n)) }}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { a.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()

	testenv.Eventually(t, "the floor set at the start", func() bool { return procs.Load() == 1 })
	load.setBusy(0.95)
	testenv.Eventually(t, "a second P for a busy one", func() bool { return procs.Load() == 2 })
	start := time.Now()
	load.setBusy(0.05)
	testenv.Eventually(t, "the second P given back once the load stayed low", func() bool { return procs.Load() == 1 })
	if waited := time.Since(start); waited < 300*time.Millisecond {
		t.Errorf("the P was given back after %v of low load, before Hold (300ms)", waited)
	}
	if n := changes.Load(); n != 2 {
		t.Errorf("%d changes reported, want 2 (up, then down)", n)
	}
}

// quiet feeds l samples every period for d at busy CPUs and returns
// whether a P was given back during them.
func quiet(l *loop, at *time.Time, every, d time.Duration, busy float64) (down bool) {
	for end := at.Add(d); at.Before(end); {
		*at = at.Add(every)
		p := l.p
		if _, n := l.sample(l.lastCPU+time.Duration(busy*float64(every)), *at); n < p {
			down = true
		}
	}
	return down
}

// TestAdaptiveHoldsThroughABurstyLoad: a load that dips below the
// threshold for less than Hold between bursts keeps its P, and one that
// stays low for Hold gives it back. Samples at made-up times, so a
// loaded machine's late wake-ups cannot stretch a dip past Hold.
func TestAdaptiveHoldsThroughABurstyLoad(t *testing.T) {
	every, hold := 5*time.Millisecond, 400*time.Millisecond
	at := time.Unix(1000, 0)
	l := &loop{p: 2, floor: 1, ceiling: 2, hold: hold, lastAt: at}
	for i := 0; i < 6; i++ {
		if quiet(l, &at, every, 100*time.Millisecond, 0.05) {
			t.Fatalf("the P was given back in dip %d of 100 ms between bursts (Hold 400 ms)", i)
		}
		if quiet(l, &at, every, 50*time.Millisecond, 1.5) {
			t.Fatalf("the P was given back in burst %d", i)
		}
	}
	if !quiet(l, &at, every, hold+2*every, 0.05) || l.p != 1 {
		t.Errorf("a load low for Hold kept its P (%d)", l.p)
	}
}

// TestAdaptiveHoldCountsOnlyQuietTime: the P goes no sooner than Hold
// after the load fell, whether the first period found low began while
// the load was still high (its average low all the same) or was cut
// short by a tick that came early after a late one.
func TestAdaptiveHoldCountsOnlyQuietTime(t *testing.T) {
	every, hold := 100*time.Millisecond, 300*time.Millisecond
	for _, c := range []struct {
		name string
		// The first low period: how long, and how much of it, at its
		// start, still ran at one CPU.
		first, high time.Duration
	}{
		{"the period of the fall averaged low", every, 20 * time.Millisecond},
		{"a short period after a late tick", time.Millisecond, 0},
	} {
		fell := time.Unix(1000, 0)
		start := fell.Add(-c.high)
		l := &loop{p: 2, floor: 1, ceiling: 2, hold: hold, lastAt: start}
		at := start.Add(c.first)
		if _, n := l.sample(c.high, at); n != 2 {
			t.Fatalf("%s: the P went with the first low period", c.name)
		}
		for i := 0; l.p == 2; i++ {
			if i == 10 {
				t.Fatalf("%s: the P stayed through 10 quiet periods after Hold", c.name)
			}
			at = at.Add(every)
			if _, n := l.sample(l.lastCPU, at); n == 1 && at.Sub(fell) < hold {
				t.Errorf("%s: the P went %v after the load fell, before Hold (%v)", c.name, at.Sub(fell), hold)
			}
		}
	}
}

// TestAdaptiveSkipsAFailedRead: a failed read of the process's CPU is
// no sample, neither an idle one nor, against the read after it, a
// burst of the process's whole life that sends the count to the ceiling.
func TestAdaptiveSkipsAFailedRead(t *testing.T) {
	load := &fakeLoad{busy: 1, total: time.Hour}
	var calls, top atomic.Int64
	cpu := func() (time.Duration, error) {
		if calls.Add(1) == 20 {
			return 0, syscall.EIO
		}
		return load.cpu()
	}
	set := func(n int) {
		if int64(n) > top.Load() {
			top.Store(int64(n))
		}
	}
	a := &Adaptive{Floor: 1, Ceiling: 8, Every: 5 * time.Millisecond, cpu: cpu, set: set}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { a.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	testenv.Eventually(t, "reads past the failed one", func() bool { return calls.Load() >= 30 })
	// One busy CPU takes two Ps and keeps them (a third only past 1.2).
	if n := top.Load(); n != 2 {
		t.Errorf("one busy CPU with a failed read went up to %d Ps, want 2", n)
	}
}

// TestAdaptiveRealLoad: with the real process CPU and GOMAXPROCS, a
// goroutine spinning on the one P brings the second, and when it stops
// the count goes back to one.
func TestAdaptiveRealLoad(t *testing.T) {
	if runtime.NumCPU() < 2 {
		t.Skip("SKIPPED: needs two CPUs")
	}
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(0))
	a := &Adaptive{Floor: 1, Ceiling: 2, Every: 20 * time.Millisecond, Hold: 200 * time.Millisecond}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { a.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	testenv.Eventually(t, "one P at the start", func() bool { return runtime.GOMAXPROCS(0) == 1 })
	var stop atomic.Bool
	spun := make(chan struct{})
	go func() {
		defer close(spun)
		for !stop.Load() {
		}
	}()
	testenv.Eventually(t, "a second P while a goroutine spins", func() bool { return runtime.GOMAXPROCS(0) == 2 })
	stop.Store(true)
	<-spun
	testenv.Eventually(t, "back to one P once the spinning stopped", func() bool { return runtime.GOMAXPROCS(0) == 1 })
}

func TestAdapts(t *testing.T) {
	for _, c := range []struct {
		env        string
		configured int
		n          int
		want       bool
	}{
		{"", 0, 2, true},
		{"", 0, 8, true},
		{"", 0, 1, false},  // nothing to adapt
		{"", 2, 2, false},  // configured: fixed
		{"2", 0, 2, false}, // GOMAXPROCS: fixed
		{"x", 0, 2, true},  // ignored, as Go ignores it
	} {
		if got := adapts(c.env, c.configured, c.n); got != c.want {
			t.Errorf("adapts(%q, %d, %d) = %v, want %v", c.env, c.configured, c.n, got, c.want)
		}
	}
}
