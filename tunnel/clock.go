package tunnel

import "time"

// A pending handshake's owedSince is kept as an int64 in an atomic and
// compared with hsStaleAfter. As wall-clock nanos (UnixNano drops the
// monotonic reading) a step of the wall clock moved it: NTP stepping
// after a VM's live migration or a suspend, chrony's makestep, an
// admin's date -s. A forward step of a second or more made every
// handshake waiting on its peer stale at once, evicted at the next
// arrival past a limit; a backward one kept a stalled flood's for the
// step. So it is nanoseconds since clockBase (monoNanos), and back
// (monoTime), on the monotonic reading (TestNoWallClockStamps keeps any
// wall-clock number out).

// clockBase is the origin of monoNanos: an hour before the package was
// initialised, so that no time.Now of the process maps to the 0 that
// means "not waiting" in owedSince.
var clockBase = time.Now().Add(-time.Hour)

// monoNanos is t in nanoseconds since clockBase: on the monotonic clock
// when t has a monotonic reading (time.Now's), on the wall clock
// otherwise (a test's fixed clock, which monoTime gives back as it was).
func monoNanos(t time.Time) int64 { return int64(t.Sub(clockBase)) }

// monoTime is the time n nanoseconds after clockBase: it carries a
// monotonic reading, so it compares with a time.Now on that clock, and
// with a time that has none on the wall clock.
func monoTime(n int64) time.Time { return clockBase.Add(time.Duration(n)) }
