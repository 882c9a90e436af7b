// Package clockguard keeps wall-clock numbers out of a package's code.
//
// A time turned into a wall-clock number (t.UnixNano() and its kin) or
// built back from one (time.Unix) has lost Go's monotonic reading. A
// timestamp kept that way and compared with a duration moves with every
// step of the wall clock (NTP after a VM's migration or a suspend,
// chrony's makestep, date -s): a forward step takes live connections
// for stalled or dead at once, a backward one stretches every timeout.
// The machine's clock is shared, so no test can step it; Check reads
// the sources instead, so that such a number cannot come back silently.
package clockguard
