package hbone

import (
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// bulkSize is where a read or write counts as bulk transfer: it goes
// through RawSyscall, which keeps the goroutine's P for the call. A
// plain Syscall lets sysmon retake the P of a call that lasts over 20 µs
// (a 256 KiB copy into a TCP socket does) and hand it to another
// thread: futex wake-ups and context switches, and sysmon itself stays
// on its 20 µs tick, each costly on this kind of VM. Small reads and
// writes (request/response) keep Syscall: there the hand-off lets the
// other direction run meanwhile, and holding the P measured worse
// (RTT p50 1.22 → 1.36× the relay pair; docs/tunnel.md).
const bulkSize = 64 << 10

// readFD is read(2) on a non-blocking socket, retried on EINTR; raw
// keeps the P through the call (bulk).
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

// writeAll writes b, waiting in the poller while the socket is full.
func writeAll(rc syscall.RawConn, b []byte) (int, error) {
	var n int
	var werr error
	err := rc.Write(func(fd uintptr) bool {
		for n < len(b) {
			k, err := writeFD(fd, b[n:], len(b)-n >= bulkSize)
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
