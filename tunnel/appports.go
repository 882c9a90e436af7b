package tunnel

import "sync/atomic"

// appPorts remembers the ports a pod's apps listen on, as the tunnel
// learns them: every successful delivery's destination (a failed one's
// may be a scan of closed ports, which would fill the set). A plaintext client's
// delivery binds a source port below the clients' ephemeral ranges
// (podnet.Net.DialLocalOwnPort), where apps listen too; a socket of ours
// there (live, or in TIME_WAIT for 60 s after the client closed first)
// would make an app that binds that port again without SO_REUSEADDR (a
// restarted container) fail with EADDRINUSE. Skipping the ports the
// pod's apps are known to use keeps that from happening to them; an app
// port that never received a delivery is not known.
//
// Append-only, lock-free: a delivery checks a handful of words. Apps
// listen on few ports; past len(slots) the rest are not remembered.
type appPorts struct {
	slots [16]atomic.Uint32 // port numbers; 0 ends the list
}

func (a *appPorts) add(port uint16) {
	p := uint32(port)
	for i := range a.slots {
		switch v := a.slots[i].Load(); {
		case v == p:
			return
		case v == 0:
			if a.slots[i].CompareAndSwap(0, p) || a.slots[i].Load() == p {
				return
			}
		}
	}
}

func (a *appPorts) has(port uint16) bool {
	p := uint32(port)
	for i := range a.slots {
		switch a.slots[i].Load() {
		case p:
			return true
		case 0:
			return false
		}
	}
	return false
}
