package hbone

import (
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The data path's sockets are non-blocking: read(2) and write(2) return
// at once (EAGAIN when they would block, and then the poller waits).
// Reads, and writes of bulkSize or more, go through RawSyscall, which
// keeps the goroutine's P through the call and never tells the
// scheduler. A plain Syscall (entersyscall) wakes sysmon if it was
// parked (the process had gone idle), which then polls every 20 µs for
// a millisecond or more, and lets sysmon retake the P of a call that
// lasts over 20 µs (a 256 KiB copy into a TCP socket does) and hand it
// to another thread: futex wake-ups and context switches, each costly
// on this kind of VM (a receiving agent spent 12 % of its CPU in
// sysmon). Small writes (request/response) keep Syscall: a write to a
// local peer runs the receiver's TCP stack in the writer's call, and
// letting the other direction have the P meanwhile measured better
// (RTT p50 1.22 → 1.36× the relay pair with every write raw;
// docs/tunnel.md).
const bulkSize = 64 << 10

// readFD is read(2) on a non-blocking socket, retried on EINTR; raw
// keeps the P through the call.
func readFD(fd uintptr, b []byte, raw bool) (int, error) {
	if !raw || len(b) == 0 {
		for {
			n, err := unix.Read(int(fd), b)
			if err != unix.EINTR {
				return n, err
			}
		}
	}
	for {
		r, _, e := unix.RawSyscall(unix.SYS_READ, fd, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)))
		switch e {
		case 0:
			return int(r), nil
		case unix.EINTR:
			continue
		}
		return 0, e
	}
}

// writeFD is write(2) on a non-blocking socket, retried on EINTR; raw
// keeps the P through the call (bulk).
func writeFD(fd uintptr, b []byte, raw bool) (int, error) {
	if !raw || len(b) == 0 {
		for {
			n, err := unix.Write(int(fd), b)
			if err != unix.EINTR {
				if n < 0 {
					n = 0
				}
				return n, err
			}
		}
	}
	for {
		r, _, e := unix.RawSyscall(unix.SYS_WRITE, fd, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)))
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
			k, err := writeFD(fd, b[n:], len(b)-n >= bulkSize)
			if err != nil || k <= 0 {
				break
			}
			n += k
		}
		return true
	})
	return n
}

// writeAll writes b, waiting in the poller while the socket is full;
// raw: through RawSyscall whatever the size.
func writeAll(rc syscall.RawConn, b []byte, raw bool) (int, error) {
	var n int
	var werr error
	err := rc.Write(func(fd uintptr) bool {
		for n < len(b) {
			k, err := writeFD(fd, b[n:], raw || len(b)-n >= bulkSize)
			if err == unix.EAGAIN {
				return false
			}
			if err != nil {
				werr = err
				return true
			}
			n += k
		}
		return true
	})
	if err == nil {
		err = werr
	}
	return n, err
}
