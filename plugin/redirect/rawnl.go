package redirect

import (
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"syscall"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// The periodic check (Recheck) of every enrolled pod enters its netns and
// opens two netlink sockets there, each pass. With ns.NetNS.Do and the
// netlink library that was ~300 µs of CPU per pod, more than the requests
// themselves: Do opens and statfs's two namespace files through *os.File,
// and a library socket is non-blocking, registered with the runtime's
// poller and seeds a random source. The pieces below do the same with
// bare system calls.

// rawNetlink is a blocking netlink socket used with bare system calls,
// by one goroutine at a time. Every request it sends is answered by the
// kernel before sendto returns (the first part of a dump too; later
// parts are made while reading), so reading never waits for long; a
// receive timeout bounds it anyway.
type rawNetlink struct {
	fd  int
	seq uint32
}

// openRawNetlink opens a netlink socket of protocol proto in the calling
// thread's netns; it stays in that netns wherever it is used later.
func openRawNetlink(proto int) (*rawNetlink, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		return nil, err
	}
	tv := unix.Timeval{Sec: 5}
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return nil, err
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return &rawNetlink{fd: fd}, nil
}

func (r *rawNetlink) Close() error { return unix.Close(r.fd) }

// rawBufs holds receive buffers: the kernel makes dump parts of at most
// 32 KiB, and one buffer per request would be garbage each pass.
var rawBufs = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

// Execute sends m and returns the answer: every message of a dump up to
// NLMSG_DONE, or the single reply; an NLMSG_ERROR with a non-zero code is
// returned as its errno, an acknowledgement as no message.
func (r *rawNetlink) Execute(m netlink.Message) ([]netlink.Message, error) {
	r.seq++
	m.Header.Sequence = r.seq
	m.Header.Length = uint32(unix.NLMSG_HDRLEN + len(m.Data))
	req, err := m.MarshalBinary()
	if err != nil {
		return nil, err
	}
	if err := unix.Sendto(r.fd, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, err
	}
	bp := rawBufs.Get().(*[]byte)
	defer rawBufs.Put(bp)
	buf := *bp
	var out []netlink.Message
	for {
		n, _, err := unix.Recvfrom(r.fd, buf, unix.MSG_TRUNC)
		if err != nil {
			return nil, err
		}
		if n > len(buf) {
			return nil, fmt.Errorf("netlink answer of %d bytes does not fit %d", n, len(buf))
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return nil, err
		}
		more := false
		for _, nm := range msgs {
			if nm.Header.Seq != r.seq {
				continue // an answer to an earlier request that timed out
			}
			switch nm.Header.Type {
			case unix.NLMSG_DONE:
				return out, nil
			case unix.NLMSG_ERROR:
				if len(nm.Data) < 4 {
					return nil, errors.New("short netlink error message")
				}
				if code := int32(binary.NativeEndian.Uint32(nm.Data[:4])); code != 0 {
					return nil, unix.Errno(-code)
				}
				return out, nil // acknowledgement
			}
			out = append(out, netlink.Message{
				Header: netlink.Header{
					Length: nm.Header.Len, Type: netlink.HeaderType(nm.Header.Type),
					Flags: netlink.HeaderFlags(nm.Header.Flags), Sequence: nm.Header.Seq, PID: nm.Header.Pid,
				},
				Data: append([]byte(nil), nm.Data...), // buf is reused
			})
			more = more || nm.Header.Flags&unix.NLM_F_MULTI != 0
		}
		if len(out) > 0 && !more {
			return out, nil
		}
	}
}

// inNetns runs fn on a thread inside netns, the way ns.NetNS.Do does,
// with one namespace file opened instead of two through *os.File: a new
// goroutine locks its thread, enters netns, runs fn and returns to the
// thread's own netns; a thread that cannot return stays locked and ends
// with its goroutine, so no other goroutine ever runs in the wrong netns.
func inNetns(netns ns.NetNS, fn func()) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("opening the thread's netns: %w", err)
			return
		}
		defer unix.Close(orig)
		if err := unix.Setns(int(netns.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread() // still in its own netns
			errc <- fmt.Errorf("entering %s: %w", netns.Path(), err)
			return
		}
		fn()
		if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("returning from %s: %w", netns.Path(), err)
			return // locked: the thread dies with this goroutine
		}
		runtime.UnlockOSThread()
		errc <- nil
	}()
	return <-errc
}
