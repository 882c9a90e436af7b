package hbone

import (
	"testing"

	"github.com/ambit-mesh/ambit/internal/clockguard"
)

// wallClockAllowed lists the reads of a time as wall-clock numbers
// (clockguard) the package's code may keep, by "file.go:Func" (a
// method as "Type.Method"), each with its reason: for instance a time
// that leaves the process (a log's or a peer's timestamp), never one
// compared with a duration. None today: every elapsed time here is on
// the monotonic clock (clock.go).
var wallClockAllowed = map[string]string{}

// TestNoWallClockStamps: no code of the package turns a time into a
// wall-clock number (t.UnixNano() and its kin) or back (time.Unix), but
// what wallClockAllowed lists. Such a number lost the monotonic reading:
// a timestamp kept as one and compared with a duration moved with every
// step of the wall clock (NTP after a VM's migration or a suspend,
// chrony's makestep, date -s), closing live connections as stalled or
// dead at a forward step and stretching every timeout at a backward one.
// Stamps go through nanotime and monoNanos instead.
func TestNoWallClockStamps(t *testing.T) {
	clockguard.Check(t, ".", wallClockAllowed, "nanotime/monoNanos")
}
