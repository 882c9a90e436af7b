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
	// Stopped on a failure too: left spinning, it would load every later
	// test in the process (-count), and its scheduling delays between a
	// fake load's read and Run's clock read made one of them see 8 Ps.
	defer stop.Store(true)
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

// stepper runs an Adaptive on made-up time: each wait Run asks for is
// handed to the test, which moves the clock and the process's CPU on by
// it and lets Run take its sample. The hand-offs order every access to
// the fields, and a sample's result is in procs once step returns.
type stepper struct {
	t       *testing.T
	now     time.Time
	total   time.Duration // the process's CPU time
	calls   int           // cpu() reads
	procs   int
	pending time.Duration // the wait Run asked for last
	waits   chan time.Duration
	fire    chan time.Time
	cancel  context.CancelFunc
	done    chan struct{}
}

func startStepper(t *testing.T, a *Adaptive) *stepper {
	s := &stepper{t: t, now: time.Unix(1000, 0), waits: make(chan time.Duration, 1), fire: make(chan time.Time), done: make(chan struct{})}
	a.cpu = func() (time.Duration, error) { s.calls++; return s.total, nil }
	a.set = func(n int) { s.procs = n }
	a.now = func() time.Time { return s.now }
	a.after = func(d time.Duration) <-chan time.Time { s.waits <- d; return s.fire }
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel = cancel
	go func() { a.Run(ctx); close(s.done) }()
	t.Cleanup(func() { s.cancel(); <-s.done })
	s.pending = s.wait()
	return s
}

func (s *stepper) wait() time.Duration {
	select {
	case d := <-s.waits:
		return d
	case <-time.After(10 * time.Second):
		s.t.Fatal("Run asked for no wait in 10 s")
		return 0
	}
}

// step lets Run's pending wait pass, the process busy at before for its
// first split and at after for the rest, and returns the wait.
func (s *stepper) step(before float64, split time.Duration, after float64) time.Duration {
	d := s.pending
	split = min(split, d)
	s.total += time.Duration(before*float64(split) + after*float64(d-split))
	s.now = s.now.Add(d)
	s.fire <- s.now
	s.pending = s.wait()
	return d
}

// run steps at a steady busy.
func (s *stepper) run(busy float64) time.Duration { return s.step(busy, 0, busy) }

// untilTwo steps at busy until Run takes the second P and returns how
// long that took; at most n steps.
func (s *stepper) untilTwo(busy float64, n int) time.Duration {
	var took time.Duration
	for i := 0; s.procs < 2; i++ {
		if i == n {
			s.t.Fatalf("still %d P after %v at %.2f busy", s.procs, took, busy)
		}
		took += s.run(busy)
	}
	return took
}

const (
	testEvery = 100 * time.Millisecond
	testFast  = 20 * time.Millisecond
)

func newStepped(t *testing.T) *stepper {
	return startStepper(t, &Adaptive{Floor: 1, Ceiling: 2, Every: testEvery, FastEvery: testFast, Hold: 3 * time.Second})
}

// TestAdaptiveRampsFastFromRealLoad: a burst that finds the load real
// gets its second P within three fast periods (60 ms), where sampling
// only every Every took the rest of a slow period (82–100 ms here).
func TestAdaptiveRampsFastFromRealLoad(t *testing.T) {
	for _, c := range []struct {
		name string
		// How far into a fast period the burst starts.
		offset time.Duration
	}{
		{"at a sample", 0},
		{"just after one", 2 * time.Millisecond},
		{"mid-period", 10 * time.Millisecond},
		{"just before one", 18 * time.Millisecond},
	} {
		s := newStepped(t)
		for i := 0; i < 6; i++ {
			s.run(0.4) // real load, below upBusy
		}
		if s.procs != 1 {
			t.Fatalf("%s: %d Ps at 0.4 busy, want 1", c.name, s.procs)
		}
		took := s.step(0.4, c.offset, 1) - c.offset
		if s.procs < 2 {
			took += s.untilTwo(1, 5)
		}
		if took > 3*testFast {
			t.Errorf("%s: the second P came %v after the burst began, want at most three fast periods (%v)", c.name, took, 3*testFast)
		}
	}
}

// TestAdaptiveRampsFastFromIdle: a burst from idle whose first (slow)
// sample shows it at 30–60 % gets its second P two fast periods later,
// not a slow period later.
func TestAdaptiveRampsFastFromIdle(t *testing.T) {
	s := newStepped(t)
	for i := 0; i < 3; i++ {
		s.run(0)
	}
	// The burst began 40 ms before this sample.
	s.step(0, testEvery-40*time.Millisecond, 1)
	if s.procs != 1 {
		t.Fatalf("a slow sample 40 %% busy took a second P")
	}
	if took := s.untilTwo(1, 5); took > 2*testFast {
		t.Errorf("the second P came %v after the first sample that showed the burst, want %v", took, 2*testFast)
	}
}

// TestAdaptiveIgnoresAFastBlip: one fast sample at 0.9 busy between
// moderate ones (a GC cycle filling the P) takes no P, though its
// average with either neighbour is past upBusy.
func TestAdaptiveIgnoresAFastBlip(t *testing.T) {
	for _, base := range []float64{0.3, 0.5} {
		s := newStepped(t)
		for i := 0; i < 4; i++ {
			s.run(base)
		}
		if s.pending != testFast {
			t.Fatalf("%.1f busy: a wait of %v, want the fast %v", base, s.pending, testFast)
		}
		s.run(0.9)
		for i := 0; i < 10; i++ {
			s.run(base)
		}
		if s.procs != 1 {
			t.Errorf("a fast sample at 0.9 busy between ones at %.1f took a second P", base)
		}
	}
}

// TestAdaptiveIdleSamplesSlowly: an idle process, and one whose load is
// light, keep to Every: ten reads of the CPU a second, not fifty.
func TestAdaptiveIdleSamplesSlowly(t *testing.T) {
	for _, busy := range []float64{0, 0.01, 0.2} {
		s := newStepped(t)
		start := s.calls
		var span time.Duration
		for span < 10*time.Second {
			span += s.run(busy)
		}
		if n := s.calls - start; n != 100 {
			t.Errorf("%.2f busy: %d reads of the CPU in %v, want 100 (every %v)", busy, n, span, testEvery)
		}
	}
}

// TestAdaptiveSlowsDownAtTheCeiling: at the ceiling there is no P to
// take, so even a busy process samples at the slow period, and the down
// path (Hold of wall time) is the one it had.
func TestAdaptiveSlowsDownAtTheCeiling(t *testing.T) {
	s := newStepped(t)
	s.run(1)
	s.untilTwo(1, 5)
	for i := 0; i < 3; i++ {
		if d := s.run(1.5); d != testEvery {
			t.Fatalf("a wait of %v at the ceiling, want the slow %v", d, testEvery)
		}
	}
	var low time.Duration
	for s.procs == 2 {
		if low > 4*time.Second {
			t.Fatalf("still 2 Ps after %v of low load", low)
		}
		low += s.run(0.1)
	}
	if low < 3*time.Second {
		t.Errorf("the P went after %v of low load, before Hold (3s)", low)
	}
}
