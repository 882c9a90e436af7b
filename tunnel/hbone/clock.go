package hbone

import "time"

// Elapsed time is measured on the monotonic clock. The timestamps a
// connection keeps as int64 in atomics (lastRecv, pingSent, lastOpen,
// openDeadline, the cork's blockedSince) are compared with durations
// (PingTimeout, writeStallAfter, probeSilence), and as wall-clock nanos
// (time.Now().UnixNano(), which drops the monotonic reading) every step
// of the wall clock moved them: NTP stepping after a VM's live migration
// or a suspend, chrony's makestep, an admin's date -s. A forward step
// longer than writeStallAfter or PingTimeout took every live connection
// for stalled or dead at once; a backward one stretched every timeout by
// the step. So they are nanoseconds since clockBase, on its monotonic
// reading (TestNoWallClockStamps keeps any wall-clock number out).

// clockBase is the origin of nanotime: an hour before the package was
// initialised, so that every reading is positive and none is the 0 that
// means "none" in pingSent, blockedSince and lastOpen.
var clockBase = time.Now().Add(-time.Hour)

// nanotime is now on the monotonic clock, in nanoseconds since
// clockBase: one read of the monotonic clock, no dearer than time.Now.
func nanotime() int64 { return int64(time.Since(clockBase)) }

// monoNanos is t on nanotime's scale, for a time from outside (a
// context's deadline, WriteStalled's now, a time.Now taken for other
// uses). Monotonic when t has a monotonic reading (time.Now's, and what
// Add derives from it: a WithTimeout deadline); from its wall clock
// otherwise (a deadline built with time.Date or time.Unix, which a step
// does move, as it would any wall-clock deadline).
func monoNanos(t time.Time) int64 { return int64(t.Sub(clockBase)) }
