package hbone

import (
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The data path's sockets are non-blocking: read(2) and write(2) return
// at once (EAGAIN when they would block, and then the poller waits), so
// they go through RawSyscall, which keeps the goroutine's P through the
// call and never tells the scheduler. A plain Syscall (entersyscall)
// wakes sysmon if it was parked (the process had gone idle), which then
// polls every 20 µs for a millisecond or more, and lets sysmon retake
// the P of a call that lasts over 20 µs (a 256 KiB copy into a TCP
// socket does) and hand it to another thread: futex wake-ups and context
// switches, each costly on this kind of VM. With plain system calls the
// agents spent ~35 % of their CPU in sysmon during 1 KB request/response
// and ~12 % when receiving in bulk. Raw, the proxies' CPU per 1 KB round
// trip is ~30 % lower (160 vs 230 µs, the relay pair's ~150). The price
// is latency: a write to a local peer runs the receiver's TCP stack in
// the writer's call, and with the P held the other direction waits for
// it. With small data writes left on Syscall the RTT p50 was 1.25× the
// relay pair against 1.30× (medians of six runs with the builds rotated
// through the benchmark's setups: within the spread, 1.10–1.54);
// session 3, with reads still plain, had seen 1.22 → 1.36×
// (docs/tunnel.md).

// readFD is read(2) on a non-blocking socket, retried on EINTR.
func readFD(fd uintptr, b []byte) (int, error) { return rawIO(unix.SYS_READ, fd, b) }

// writeFD is write(2) on a non-blocking socket, retried on EINTR.
func writeFD(fd uintptr, b []byte) (int, error) { return rawIO(unix.SYS_WRITE, fd, b) }

func rawIO(trap, fd uintptr, b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	for {
		r, _, e := unix.RawSyscall(trap, fd, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)))
		switch e {
		case 0:
			return int(r), nil
		case unix.EINTR:
			continue
		}
		return 0, e
	}
}

// writeNonBlocking writes what the socket takes now, never waiting.
func writeNonBlocking(rc syscall.RawConn, b []byte) int {
	var n int
	_ = rc.Write(func(fd uintptr) bool {
		for n < len(b) {
			k, err := writeFD(fd, b[n:])
			if err != nil || k <= 0 {
				break
			}
			n += k
		}
		return true
	})
	return n
}

// writeAll writes b, waiting in the poller while the socket is full.
// The first time the socket is full it stamps blockedSince and arms the
// burst's guard, if any (noteBlocked): a write the socket takes at once
// pays neither the clock nor the guard. mu held (flushLocked): the
// write's state lives in the cork and its step function was made once
// (newCorkConn), so a write allocates nothing; a closure over n, werr
// and b cost three allocations a write.
func (c *corkConn) writeAll(b []byte) (int, error) {
	c.wb, c.wn, c.werr = b, 0, nil
	err := c.raw.Write(c.writeStep)
	n, werr := c.wn, c.werr
	c.wb, c.werr = nil, nil
	// Only this writer stores it (under the cork's lock): the load
	// spares the fast path a store to a line WriteStalled reads.
	if c.blockedSince.Load() != 0 {
		c.blockedSince.Store(0)
	}
	if err == nil {
		err = werr
	}
	return n, err
}

// step is writeAll's call on the ready socket: false to wait in the
// poller.
func (c *corkConn) step(fd uintptr) bool {
	for c.wn < len(c.wb) {
		k, err := writeFD(fd, c.wb[c.wn:])
		if err == unix.EAGAIN {
			if c.blockedSince.Load() == 0 {
				c.noteBlocked()
			}
			return false
		}
		if err != nil {
			c.werr = err
			return true
		}
		c.wn += k
	}
	return true
}

// tcpProgress is the kernel's count of our bytes the peer's TCP has
// acknowledged and of new bytes it has sent us (TCP_INFO's
// tcpi_bytes_acked and tcpi_bytes_received, Linux 4.1+): neither moves
// for a pure ACK, a zero-window probe or a TCP keepalive probe. queued
// says bytes of ours wait in the socket, sent and unacknowledged or not
// yet sent (tcpi_unacked, tcpi_notsent_bytes). sinceAck is how long ago
// the peer's TCP last sent an ACK of any kind (tcpi_last_ack_recv, ms):
// a pure ACK answering a zero-window probe counts, so a live host
// renews it while its reader stalls and a dead one never does. ok is
// false when rc is not a TCP socket (a Unix socket, say) or is closed:
// the caller then has no evidence either way. A kernel whose TCP_INFO
// predates the counters leaves them 0, which never advance.
func tcpProgress(rc syscall.RawConn) (acked, received uint64, sinceAck time.Duration, queued, ok bool) {
	var info *unix.TCPInfo
	var err error
	if cerr := rc.Control(func(fd uintptr) {
		info, err = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
	}); cerr != nil || err != nil {
		return 0, 0, 0, false, false
	}
	sinceAck = time.Duration(info.Last_ack_recv) * time.Millisecond
	return info.Bytes_acked, info.Bytes_received, sinceAck, info.Unacked > 0 || info.Notsent_bytes > 0, true
}
