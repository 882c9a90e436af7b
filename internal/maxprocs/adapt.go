package maxprocs

import (
	"context"
	"math"
	"runtime"
	"syscall"
	"time"
)

// Adaptive moves GOMAXPROCS between Floor and Ceiling with the process's
// own CPU use. A second P gave one agent a quarter more bulk throughput
// on a 2-CPU node, but cost it 6–29 % more CPU at moderate loads (Go's
// scheduler wakes the idle P's thread to look for work, then parks it
// again; docs/tunnel.md, session 21). So the agent runs on Floor Ps
// while its load is light and takes another P as soon as its Ps are
// busy, giving it back only after a sustained quiet spell.
//
// It samples at two speeds. A burst (a bulk transfer) runs on the Ps it
// finds until a sample shows it, so sampling every Every alone left its
// first 60–160 ms on one P; sampling that fast all the time would wake
// an idle agent 50 times a second. So it samples every Every while the
// load is light and every FastEvery while the last sample showed real
// load and there is a P left to take. A step up then needs two fast
// samples in a row both busy (or one whole Every): one fast sample is
// 20 ms, short enough that a GC cycle filling the P can make it look
// busy, and a P taken for that is held for Hold.
type Adaptive struct {
	Floor, Ceiling int
	// Every is the slow sampling period (default 100 ms), that of an
	// idle or light load. Ten getrusage calls a second cost an idle agent
	// nothing measurable.
	Every time.Duration
	// FastEvery is the sampling period while the load is real and the
	// count below the ceiling (default Every/5, 20 ms): a burst that
	// finds such a load has its next P two or three of them later.
	FastEvery time.Duration
	// Hold is how long the load must stay low before a P is given back
	// (default 3 s), so a bursty load does not flap between counts (each
	// change is a brief stop of the world).
	Hold time.Duration
	// OnChange, if set, is told of every change (the agent logs it).
	OnChange func(from, to int, busy float64)

	// Injected by tests.
	cpu   func() (time.Duration, error)
	set   func(int)
	now   func() time.Time
	after func(time.Duration) <-chan time.Time
}

// Thresholds in CPUs per P. Up at 60 % rather than near 100 %: the
// goroutines of a busy P queue behind each other, and the queueing grows
// steeply past a few tens of per cent. Down only when one P fewer would
// still run at no more than 30 %, which leaves a wide band where neither
// applies.
const (
	upBusy   = 0.6
	downBusy = 0.3
)

// fastBusy is the load, in CPUs per P, from which the sampling is fast:
// the down threshold's 30 %. From there a burst has only to double the
// load to reach upBusy, so a sample there is worth following up soon.
// Below it sit an idle agent and the moderate loads session 21 measured
// the second P's cost at (0.07–0.19 CPUs on one P): they keep sampling
// ten times a second and are judged on whole 100 ms samples, as they
// were measured. A GC cycle at such a load can lift one slow sample into
// the fast band; the fast samples after it see the load without it. The
// price: a burst from idle whose first sample caught less than 30 % of
// it waits for the next slow sample, as before.
const fastBusy = downBusy

// next is the P count after a period in which the process used busy
// CPUs with p Ps, low being how long the load has stayed low enough to
// give one back.
// Up it goes by as many Ps as would bring them to upBusy, at least one
// (a saturated P shows at most about one CPU, so a big node doubles its
// way up), down by one at a time.
func next(p int, busy float64, low, hold time.Duration, floor, ceiling int) int {
	switch {
	case p < ceiling && busy >= upBusy*float64(p):
		return min(ceiling, max(p+1, int(math.Ceil(busy/upBusy))))
	case p > floor && low >= hold:
		return p - 1
	}
	return p
}

// lowEnough says whether busy could run on one P fewer than p at no more
// than downBusy each.
func lowEnough(p int, busy float64) bool {
	return p > 1 && busy <= downBusy*float64(p-1)
}

// Run sets GOMAXPROCS to Floor and adapts it until ctx ends; it leaves
// the count where it is when it returns.
func (a *Adaptive) Run(ctx context.Context) {
	every, fast, hold := a.Every, a.FastEvery, a.Hold
	if every <= 0 {
		every = 100 * time.Millisecond
	}
	if fast <= 0 {
		fast = every / 5
	}
	if fast <= 0 || fast > every {
		fast = every
	}
	if hold <= 0 {
		hold = 3 * time.Second
	}
	cpu, set, now, after := a.cpu, a.set, a.now, a.after
	if cpu == nil {
		cpu = processCPU
	}
	if set == nil {
		set = func(n int) { runtime.GOMAXPROCS(n) }
	}
	if now == nil {
		now = time.Now
	}
	if after == nil {
		// A timer, not a ticker: the period changes from sample to
		// sample, and each is measured from the last.
		t := time.NewTimer(every)
		defer t.Stop()
		after = func(d time.Duration) <-chan time.Time {
			t.Reset(d)
			return t.C
		}
	}
	floor := max(1, a.Floor)
	l := &loop{p: floor, floor: floor, ceiling: max(floor, a.Ceiling), hold: hold, every: every, fastEvery: fast}
	set(l.p)
	// A failed read leaves the baseline where it was: the next good one
	// then measures the longer period whole, where a zero taken as the
	// process's CPU would have made it look as busy as its whole life.
	if c, err := cpu(); err == nil {
		l.lastCPU, l.lastAt = c, now()
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-after(l.period()):
		}
		c, err := cpu()
		switch {
		case err != nil:
			continue
		case l.lastAt.IsZero():
			l.lastCPU, l.lastAt = c, now()
			continue
		}
		from := l.p
		if busy, n := l.sample(c, now()); n != from {
			set(n)
			if a.OnChange != nil {
				a.OnChange(from, n, busy)
			}
		}
	}
}

// loop is Run's state between samples.
type loop struct {
	p, floor, ceiling int
	// every and fastEvery are the two sampling periods; a period shorter
	// than every is a fast one (zero: every period is judged alone).
	hold, every, fastEvery time.Duration
	lastCPU                time.Duration
	lastAt, lowSince       time.Time
	// The last period's busy CPUs, and whether it was a fast one.
	lastBusy  float64
	lastShort bool
}

// period is how long to wait for the next sample: fastEvery while the
// last sample showed real load (fastBusy) and there is a P to take.
func (l *loop) period() time.Duration {
	if l.p < l.ceiling && l.lastBusy >= fastBusy*float64(l.p) && l.fastEvery > 0 {
		return l.fastEvery
	}
	return l.every
}

// sample takes the process's CPU time c at time at and returns the busy
// CPUs since the last sample and the P count to run with from now on.
func (l *loop) sample(c time.Duration, at time.Time) (float64, int) {
	busy := float64(c-l.lastCPU) / float64(at.Sub(l.lastAt))
	short := at.Sub(l.lastAt) < l.every
	// What a step up is judged on: a whole slow period alone, a fast one
	// only with the fast one before it, both busy. Not their average: a
	// 20 ms burst at full CPU lifts a 40 ms average to upBusy from a load
	// of 0.2 per P, so at every load that samples fast one GC cycle
	// would take a P. With both, a burst within one fast period cannot
	// count; one centred on the sample between two counts only if it
	// lifts each half to upBusy: from 0.3, 17 ms at full CPU.
	up := busy
	if short {
		up = 0
		if l.lastShort {
			up = min(l.lastBusy, busy)
		}
	}
	l.lastCPU, l.lastAt, l.lastBusy, l.lastShort = c, at, busy, short
	var low time.Duration
	if lowEnough(l.p, busy) {
		// From the end of the first period found low, not its start:
		// that period may have begun while the load was still high (its
		// average low all the same) or been a short one, and Hold is the
		// least quiet time before a P goes.
		if l.lowSince.IsZero() {
			l.lowSince = at
		}
		low = at.Sub(l.lowSince)
	} else {
		l.lowSince = time.Time{}
	}
	if n := next(l.p, up, low, l.hold, l.floor, l.ceiling); n != l.p {
		// Fast samples from before the change were taken on the old
		// count: the next step is judged on the new one's.
		l.p, l.lowSince, l.lastShort = n, time.Time{}, false
	}
	return busy, l.p
}

// processCPU is the process's user and system CPU time so far.
func processCPU() (time.Duration, error) {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0, err
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), nil
}
