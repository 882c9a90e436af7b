package podnet

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// nsGetNSType is ioctl NS_GET_NSTYPE (_IO(0xb7, 0x3)).
const nsGetNSType = 0xb703

// DefaultMark is the agent's socket mark, the same value as
// redirect.DefaultMark (not imported, so this package depends on nothing
// of the plugin).
const DefaultMark = 0x539

// DefaultBacklog is the listen backlog when none is given; the kernel caps
// it at the namespace's net.core.somaxconn.
const DefaultBacklog = 4096

// DefaultDialTimeout bounds a Dial whose context has no deadline.
const DefaultDialTimeout = 10 * time.Second

// Net is one pod network namespace, held open by a private duplicate of
// its file descriptor until Close.
type Net struct {
	mark uint32

	mu     sync.RWMutex // held for reading while a socket is being created
	fd     int          // -1 once closed
	closed bool
}

// Option adjusts a Net at Open.
type Option func(*Net)

// WithMark sets the SO_MARK carried by every socket of the Net (default
// DefaultMark). 0 disables marking.
func WithMark(mark uint32) Option { return func(n *Net) { n.mark = mark } }

// Open keeps a duplicate of the netns fd (the caller keeps and closes its
// own) after checking it really is a network namespace.
func Open(netns *os.File, opts ...Option) (*Net, error) {
	if netns == nil {
		return nil, errors.New("podnet: nil netns file")
	}
	rc, err := netns.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("podnet: %s: %w", netns.Name(), err)
	}
	dup := -1
	var opErr error
	if err := rc.Control(func(fd uintptr) {
		if opErr = checkNetns(int(fd)); opErr != nil {
			return
		}
		dup, opErr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return nil, fmt.Errorf("podnet: %s: %w", netns.Name(), err)
	}
	if opErr != nil {
		return nil, fmt.Errorf("podnet: %s: %w", netns.Name(), opErr)
	}
	n := &Net{fd: dup, mark: DefaultMark}
	for _, o := range opts {
		o(n)
	}
	return n, nil
}

// checkNetns tells a network namespace from any other file.
func checkNetns(fd int) error {
	var st unix.Statfs_t
	if err := unix.Fstatfs(fd, &st); err != nil {
		return fmt.Errorf("fstatfs: %w", err)
	}
	if st.Type != unix.NSFS_MAGIC {
		return errors.New("not a namespace file (expected nsfs, e.g. /proc/<pid>/ns/net or /var/run/netns/<name>)")
	}
	t, err := unix.IoctlRetInt(fd, nsGetNSType)
	if err != nil {
		return fmt.Errorf("NS_GET_NSTYPE: %w", err)
	}
	if t != unix.CLONE_NEWNET {
		return fmt.Errorf("namespace type %#x is not a network namespace", t)
	}
	return nil
}

// Close releases the namespace. Sockets already opened keep working.
func (n *Net) Close() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return nil
	}
	n.closed = true
	err := unix.Close(n.fd)
	n.fd = -1
	return err
}

// Mark is the SO_MARK of the Net's sockets.
func (n *Net) Mark() uint32 { return n.mark }

// socket creates a non-blocking, close-on-exec socket inside the pod netns.
func (n *Net) socket(family, typ, proto int) (int, error) {
	n.mu.RLock()
	defer n.mu.RUnlock()
	if n.closed {
		return -1, errors.New("podnet: namespace closed")
	}
	type result struct {
		fd  int
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		// The namespace to come back to: the one this (fresh, unlocked
		// until now) thread is in, which is the process's own: Go
		// starts new threads from a clean template thread, never from
		// one switched elsewhere. Opened once and kept: opening it per
		// socket was a tenth of the agent's cost per new connection.
		self, err := ownNetns()
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{-1, fmt.Errorf("podnet: own netns: %w", err)}
			return
		}
		if err := unix.Setns(n.fd, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			ch <- result{-1, fmt.Errorf("podnet: setns into pod: %w", err)}
			return
		}
		fd, serr := unix.Socket(family, typ|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, proto)
		if err := unix.Setns(self, unix.CLONE_NEWNET); err != nil {
			// Leave the thread locked: when this goroutine returns the
			// runtime terminates the thread rather than reuse it in the
			// pod's namespace.
			if serr == nil {
				unix.Close(fd)
			}
			ch <- result{-1, fmt.Errorf("podnet: setns back to own netns: %w", err)}
			return
		}
		runtime.UnlockOSThread()
		if serr != nil {
			ch <- result{-1, fmt.Errorf("podnet: socket: %w", serr)}
			return
		}
		ch <- result{fd, nil}
	}()
	r := <-ch
	return r.fd, r.err
}

var (
	ownOnce sync.Once
	ownFD   int
	ownErr  error
)

// ownNetns returns a kept fd of the process's network namespace. Called
// on a locked thread that has not left it.
func ownNetns() (int, error) {
	ownOnce.Do(func() {
		ownFD, ownErr = unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	})
	return ownFD, ownErr
}

// ListenOptions tunes Listen. The zero value is the agent's default.
type ListenOptions struct {
	// Mark overrides the Net's SO_MARK when non-zero.
	Mark uint32
	// Backlog of the listen queue; 0 means DefaultBacklog.
	Backlog int
	// NoReusePort disables SO_REUSEPORT. By default it is on so a new
	// agent can bind beside the old one during an upgrade.
	NoReusePort bool
	// NoTransparent disables IP_TRANSPARENT (otherwise set best effort).
	NoTransparent bool
	// Address binds a specific address instead of the dual-stack
	// wildcard [::].
	Address netip.Addr
}

// Listen opens a TCP listener on port inside the pod, dual-stack [::]:port
// (0.0.0.0:port when IPv6 is disabled in the pod).
func (n *Net) Listen(port uint16, opts ListenOptions) (net.Listener, error) {
	mark := n.mark
	if opts.Mark != 0 {
		mark = opts.Mark
	}
	backlog := opts.Backlog
	if backlog <= 0 {
		backlog = DefaultBacklog
	}
	addr := opts.Address
	family := unix.AF_INET6
	if addr.Is4() {
		family = unix.AF_INET
	}
	fd, err := n.socket(family, unix.SOCK_STREAM, 0)
	if err != nil && family == unix.AF_INET6 && !addr.IsValid() && errors.Is(err, unix.EAFNOSUPPORT) {
		family = unix.AF_INET
		fd, err = n.socket(family, unix.SOCK_STREAM, 0)
	}
	if err != nil {
		return nil, err
	}
	var sa unix.Sockaddr
	if family == unix.AF_INET6 {
		s := &unix.SockaddrInet6{Port: int(port)}
		if addr.IsValid() {
			s.Addr = addr.As16()
		} else if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0); err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("podnet: IPV6_V6ONLY=0: %w", err)
		}
		sa = s
	} else {
		s := &unix.SockaddrInet4{Port: int(port)}
		if addr.IsValid() {
			s.Addr = addr.As4()
		}
		sa = s
	}
	must := []struct {
		name       string
		level, opt int
		val        int
		bestEffort bool
		skip       bool
	}{
		{"SO_REUSEADDR", unix.SOL_SOCKET, unix.SO_REUSEADDR, 1, false, false},
		{"SO_REUSEPORT", unix.SOL_SOCKET, unix.SO_REUSEPORT, 1, false, opts.NoReusePort},
		{"SO_MARK", unix.SOL_SOCKET, unix.SO_MARK, int(mark), false, mark == 0},
		{"IP_TRANSPARENT", unix.SOL_IP, unix.IP_TRANSPARENT, 1, true, opts.NoTransparent},
		{"IPV6_TRANSPARENT", unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1, true, opts.NoTransparent || family != unix.AF_INET6},
	}
	for _, o := range must {
		if o.skip {
			continue
		}
		if err := unix.SetsockoptInt(fd, o.level, o.opt, o.val); err != nil && !o.bestEffort {
			unix.Close(fd)
			return nil, fmt.Errorf("podnet: listen :%d: %s: %w", port, o.name, err)
		}
	}
	if err := unix.Bind(fd, sa); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("podnet: bind :%d: %w", port, err)
	}
	if err := unix.Listen(fd, backlog); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("podnet: listen :%d: %w", port, err)
	}
	f := os.NewFile(uintptr(fd), fmt.Sprintf("podnet-listener-%d", port))
	defer f.Close() // FileListener holds its own dup
	ln, err := net.FileListener(f)
	if err != nil {
		return nil, fmt.Errorf("podnet: listener :%d: %w", port, err)
	}
	return ln, nil
}

// Dial connects to dst from inside the pod, marked. A valid src binds the
// socket to it transparently (IP_TRANSPARENT + IP_FREEBIND), so the peer
// sees src even though it is not an address of the pod; the pod's
// connmark/routing rules bring the replies back. It implements
// tunnel.PodNetwork.
func (n *Net) Dial(ctx context.Context, src netip.Addr, dst netip.AddrPort) (net.Conn, error) {
	if !dst.IsValid() || dst.Port() == 0 {
		return nil, fmt.Errorf("podnet: dial: invalid destination %v", dst)
	}
	dstIP := dst.Addr().Unmap()
	family := unix.AF_INET
	if dstIP.Is6() {
		family = unix.AF_INET6
	}
	if src.IsValid() {
		src = src.Unmap()
		if src.Is4() != dstIP.Is4() {
			return nil, fmt.Errorf("podnet: dial %v from %v: address families differ", dst, src)
		}
	}
	fd, err := n.socket(family, unix.SOCK_STREAM, 0)
	if err != nil {
		return nil, err
	}
	fail := func(what string, err error) (net.Conn, error) {
		unix.Close(fd)
		return nil, fmt.Errorf("podnet: dial %v: %s: %w", dst, what, err)
	}
	if n.mark != 0 {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, int(n.mark)); err != nil {
			return fail("SO_MARK", err)
		}
	}
	_ = unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	if src.IsValid() {
		// Choose the source port at connect() from the whole 4-tuple,
		// not at bind() from the address alone: otherwise every
		// connection from one client IP competes for one port range
		// (TIME_WAIT included) and binds slow down, then fail, under a
		// high connection rate.
		_ = unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1)
		if family == unix.AF_INET {
			if err := unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_TRANSPARENT, 1); err != nil {
				return fail("IP_TRANSPARENT", err)
			}
			if err := unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_FREEBIND, 1); err != nil {
				return fail("IP_FREEBIND", err)
			}
			if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: src.As4()}); err != nil {
				return fail("bind "+src.String(), err)
			}
		} else {
			if err := unix.SetsockoptInt(fd, unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1); err != nil {
				return fail("IPV6_TRANSPARENT", err)
			}
			if err := unix.SetsockoptInt(fd, unix.SOL_IPV6, unix.IPV6_FREEBIND, 1); err != nil {
				return fail("IPV6_FREEBIND", err)
			}
			if err := unix.Bind(fd, &unix.SockaddrInet6{Addr: src.As16()}); err != nil {
				return fail("bind "+src.String(), err)
			}
		}
	}
	var sa unix.Sockaddr
	if family == unix.AF_INET {
		sa = &unix.SockaddrInet4{Addr: dstIP.As4(), Port: int(dst.Port())}
	} else {
		sa = &unix.SockaddrInet6{Addr: dstIP.As16(), Port: int(dst.Port())}
	}
	err = unix.Connect(fd, sa)
	if err != nil && err != unix.EINPROGRESS && err != unix.EINTR {
		return fail("connect", err)
	}
	pending := err != nil
	// From here the fd belongs to f (registered with the poller).
	f := os.NewFile(uintptr(fd), "podnet-dial")
	defer f.Close() // FileConn holds its own dup
	if pending {
		if err := waitConnected(ctx, f); err != nil {
			return nil, fmt.Errorf("podnet: dial %v: %w", dst, err)
		}
	}
	c, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("podnet: dial %v: %w", dst, err)
	}
	return c, nil
}

var longAgo = time.Unix(1, 0)

// waitConnected waits in the poller (no thread held) until a non-blocking
// connect completes, fails, or ctx ends.
func waitConnected(ctx context.Context, f *os.File) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultDialTimeout)
		defer cancel()
	}
	stop := context.AfterFunc(ctx, func() { _ = f.SetWriteDeadline(longAgo) })
	defer stop()
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var cerr error
	// The callback runs once before any wait: the connect may have
	// finished before the fd reached the poller, and that edge is gone.
	werr := rc.Write(func(fd uintptr) bool {
		soerr, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ERROR)
		if err != nil {
			cerr = err
			return true
		}
		switch e := unix.Errno(soerr); e {
		case 0:
			if _, err := unix.Getpeername(int(fd)); err == unix.ENOTCONN {
				return false // still connecting
			}
			return true
		case unix.EINPROGRESS, unix.EALREADY, unix.EINTR:
			return false
		default:
			cerr = fmt.Errorf("connect: %w", e)
			return true
		}
	})
	if werr != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("connect: %w", ctx.Err())
		}
		return werr
	}
	return cerr
}
