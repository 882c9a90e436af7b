package podnet

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// ListenerUID owns the agent's listening sockets in every pod (the
// thread's fsuid at socket(), which the kernel records as the socket's
// owner). The kernel lets a socket join a SO_REUSEPORT group only if it
// has the same owner, so an application of the pod, even one running
// as root with SO_REUSEPORT of its own, is refused the port (EADDRINUSE)
// instead of receiving a share of the agent's connections. It is above
// what Kubernetes lets a container run as (runAsUser <= 2^31-1) and the
// ranges the kubelet maps pods' user namespaces to; 0x539 echoes the
// agent's mark. Needs CAP_SETUID; without it the listeners are the
// process's own (root) and only the check of the pod's sockets around
// the bind (Listen) remains, see Exclusive.
const ListenerUID = 0x80000539

// Holder is a socket of the pod listening on a port.
type Holder struct {
	Addr  netip.AddrPort
	UID   uint32
	Mark  uint32
	Inode uint32
}

func (h Holder) String() string {
	return fmt.Sprintf("%v (uid %d, socket inode %d)", h.Addr, h.UID, h.Inode)
}

// PortInUseError: a socket of the pod that is not the agent's listens on
// a port the agent needs. errors.Is(err, unix.EADDRINUSE) holds.
type PortInUseError struct {
	Port    uint16
	Holders []Holder // the sockets that are not the agent's
	Err     error
}

func (e *PortInUseError) Error() string {
	hs := make([]string, len(e.Holders))
	for i, h := range e.Holders {
		hs[i] = h.String()
	}
	return fmt.Sprintf("podnet: port %d is in use in the pod by a socket that is not the agent's: %s", e.Port, strings.Join(hs, ", "))
}

func (e *PortInUseError) Unwrap() error { return e.Err }

// notMarked returns the holders without the agent's mark: an application
// cannot set SO_MARK without CAP_NET_ADMIN, which pods do not get by
// default.
func notMarked(hs []Holder, mark uint32) []Holder {
	var out []Holder
	for _, h := range hs {
		if h.Mark != mark || mark == 0 {
			out = append(out, h)
		}
	}
	return out
}

// Holders lists the pod's TCP sockets listening on port, any address, both
// families (sock_diag, from a netlink socket made inside the pod; the
// marks need CAP_NET_ADMIN, as the agent has).
func (n *Net) Holders(port uint16) ([]Holder, error) {
	// On a goroutine of its own (async): Listen's callers may hold their
	// thread, and a thread stuck in the pod must die with its goroutine.
	fd, err := inPod(n, true, func(leave func() error) (int, error) {
		fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
		if lerr := leave(); lerr != nil {
			if err == nil {
				unix.Close(fd)
			}
			return -1, lerr
		}
		return fd, err
	})
	if err != nil {
		return nil, fmt.Errorf("podnet: sock_diag socket: %w", err)
	}
	defer unix.Close(fd)
	var out []Holder
	for _, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
		hs, err := diagListeners(fd, family, port)
		if err != nil {
			return nil, fmt.Errorf("podnet: sock_diag: %w", err)
		}
		out = append(out, hs...)
	}
	return out, nil
}

const (
	sockDiagByFamily = 20 // SOCK_DIAG_BY_FAMILY
	inetDiagMark     = 15 // INET_DIAG_MARK
	tcpListen        = 10 // TCP_LISTEN
	inetDiagReqLen   = 56 // struct inet_diag_req_v2
	inetDiagMsgLen   = 72 // struct inet_diag_msg
)

// diagListeners dumps the listening TCP sockets of one family and keeps
// those on port.
func diagListeners(fd int, family uint8, port uint16) ([]Holder, error) {
	req := make([]byte, unix.NLMSG_HDRLEN+inetDiagReqLen)
	binary.NativeEndian.PutUint32(req[0:], uint32(len(req)))
	binary.NativeEndian.PutUint16(req[4:], sockDiagByFamily)
	binary.NativeEndian.PutUint16(req[6:], unix.NLM_F_REQUEST|unix.NLM_F_DUMP)
	binary.NativeEndian.PutUint32(req[8:], 1)
	r := req[unix.NLMSG_HDRLEN:]
	r[0] = family
	r[1] = unix.IPPROTO_TCP
	binary.NativeEndian.PutUint32(r[4:], 1<<tcpListen) // idiag_states
	if err := unix.Sendto(fd, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, err
	}
	var out []Holder
	buf := make([]byte, 32<<10)
	for {
		nr, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			if errors.Is(err, syscall.EINTR) {
				continue
			}
			return nil, err
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:nr])
		if err != nil {
			return nil, err
		}
		for _, m := range msgs {
			switch m.Header.Type {
			case unix.NLMSG_DONE:
				return out, nil
			case unix.NLMSG_ERROR:
				if len(m.Data) >= 4 {
					if e := int32(binary.NativeEndian.Uint32(m.Data)); e != 0 {
						return nil, syscall.Errno(-e)
					}
				}
				return out, nil
			case sockDiagByFamily:
				if h, ok := parseDiag(m.Data, port); ok {
					out = append(out, h)
				}
			}
		}
	}
}

// parseDiag reads one inet_diag_msg and its attributes.
func parseDiag(b []byte, port uint16) (Holder, bool) {
	if len(b) < inetDiagMsgLen {
		return Holder{}, false
	}
	sport := binary.BigEndian.Uint16(b[4:])
	if sport != port {
		return Holder{}, false
	}
	var addr netip.Addr
	if b[0] == unix.AF_INET {
		addr = netip.AddrFrom4([4]byte(b[8:12]))
	} else {
		addr = netip.AddrFrom16([16]byte(b[8:24]))
	}
	h := Holder{
		Addr:  netip.AddrPortFrom(addr, sport),
		UID:   binary.NativeEndian.Uint32(b[64:]),
		Inode: binary.NativeEndian.Uint32(b[68:]),
	}
	for a := b[inetDiagMsgLen:]; len(a) >= unix.SizeofRtAttr; {
		l := int(binary.NativeEndian.Uint16(a[0:]))
		t := binary.NativeEndian.Uint16(a[2:])
		if l < unix.SizeofRtAttr || l > len(a) {
			break
		}
		if t == inetDiagMark && l >= unix.SizeofRtAttr+4 {
			h.Mark = binary.NativeEndian.Uint32(a[unix.SizeofRtAttr:])
		}
		a = a[min((l+3)&^3, len(a)):]
	}
	return h, true
}

// currentFsuid is the calling thread's fsuid (setfsuid(-1) changes
// nothing and returns it).
func currentFsuid() int {
	uid, _ := unix.SetfsuidRetUid(-1)
	return uid
}

var exclusiveUIDs sync.Map // uid → bool: Exclusive(uid) == nil

// exclusive is Exclusive(uid) == nil, asked once per uid.
func exclusive(uid int) bool {
	if v, ok := exclusiveUIDs.Load(uid); ok {
		return v.(bool)
	}
	ok := Exclusive(uid) == nil
	exclusiveUIDs.Store(uid, ok)
	return ok
}

// Exclusive reports whether this process can own its listeners as uid
// (ListenerUID), which is what keeps applications out of the agent's
// reuseport groups; an error says why not (no CAP_SETUID). The agent logs
// it once at start.
func Exclusive(uid int) error {
	if uid < 0 {
		return errors.New("listeners are the process's own (no listener uid)")
	}
	ch := make(chan error, 1)
	go func() {
		// A goroutine of its own: should switching back fail, it ends
		// locked and Go discards the thread.
		runtime.LockOSThread()
		prev, _ := unix.SetfsuidRetUid(uid)
		got := currentFsuid()
		unix.SetfsuidRetUid(prev)
		if currentFsuid() != prev {
			ch <- fmt.Errorf("setfsuid %d: could not switch back", prev)
			return
		}
		runtime.UnlockOSThread()
		if got != uid {
			ch <- fmt.Errorf("setfsuid %d did not take (fsuid stays %d): CAP_SETUID missing; an application of a pod running as root with SO_REUSEPORT can then join the agent's listeners after they are made", uid, got)
			return
		}
		ch <- nil
	}()
	return <-ch
}
