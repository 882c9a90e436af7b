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
type Adaptive struct {
	Floor, Ceiling int
	// Every is the sampling period (default 100 ms): how late a burst
	// gets its next P at most, about. Ten getrusage calls a second cost
	// an idle agent nothing measurable.
	Every time.Duration
	// Hold is how long the load must stay low before a P is given back
	// (default 3 s), so a bursty load does not flap between counts (each
	// change is a brief stop of the world).
	Hold time.Duration
	// OnChange, if set, is told of every change (the agent logs it).
	OnChange func(from, to int, busy float64)

	// Injected by tests.
	cpu func() (time.Duration, error)
	set func(int)
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
	every, hold := a.Every, a.Hold
	if every <= 0 {
		every = 100 * time.Millisecond
	}
	if hold <= 0 {
		hold = 3 * time.Second
	}
	cpu, set := a.cpu, a.set
	if cpu == nil {
		cpu = processCPU
	}
	if set == nil {
		set = func(n int) { runtime.GOMAXPROCS(n) }
	}
	floor := max(1, a.Floor)
	l := &loop{p: floor, floor: floor, ceiling: max(floor, a.Ceiling), hold: hold}
	set(l.p)
	t := time.NewTicker(every)
	defer t.Stop()
	// A failed read leaves the baseline where it was: the next good one
	// then measures the longer period whole, where a zero taken as the
	// process's CPU would have made it look as busy as its whole life.
	if c, err := cpu(); err == nil {
		l.lastCPU, l.lastAt = c, time.Now()
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		c, err := cpu()
		switch {
		case err != nil:
			continue
		case l.lastAt.IsZero():
			l.lastCPU, l.lastAt = c, time.Now()
			continue
		}
		from := l.p
		if busy, n := l.sample(c, time.Now()); n != from {
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
	hold              time.Duration
	lastCPU           time.Duration
	lastAt, lowSince  time.Time
}

// sample takes the process's CPU time c at time at and returns the busy
// CPUs since the last sample and the P count to run with from now on.
func (l *loop) sample(c time.Duration, at time.Time) (float64, int) {
	busy := float64(c-l.lastCPU) / float64(at.Sub(l.lastAt))
	l.lastCPU, l.lastAt = c, at
	var low time.Duration
	if lowEnough(l.p, busy) {
		// From the end of the first period found low, not its start:
		// that period may have begun while the load was still high (its
		// average low all the same) or been cut short by a late tick, and
		// Hold is the least quiet time before a P goes.
		if l.lowSince.IsZero() {
			l.lowSince = at
		}
		low = at.Sub(l.lowSince)
	} else {
		l.lowSince = time.Time{}
	}
	if n := next(l.p, busy, low, l.hold, l.floor, l.ceiling); n != l.p {
		l.p, l.lowSince = n, time.Time{}
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
