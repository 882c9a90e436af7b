package podnet

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"sync"
	"syscall"
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
	// uid owns the listeners (fsuid at socket()); -1: the process's own.
	uid int

	mu     sync.RWMutex // held for reading while a socket is being created
	fd     int          // -1 once closed
	closed bool
}

// Option adjusts a Net at Open.
type Option func(*Net)

// WithMark sets the SO_MARK carried by every socket of the Net (default
// DefaultMark). 0 disables marking.
func WithMark(mark uint32) Option { return func(n *Net) { n.mark = mark } }

// WithListenerUID sets the uid that owns the Net's listening sockets
// (default ListenerUID); -1 leaves them the process's own, as agents
// before ListenerUID made them (tests of the hand-over from those).
func WithListenerUID(uid int) Option { return func(n *Net) { n.uid = uid } }

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
	n := &Net{fd: dup, mark: DefaultMark, uid: ListenerUID}
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

var errClosed = errors.New("podnet: namespace closed")

// ErrThreadStuck: the OS thread that made a socket could not be switched
// back from the pod's namespace (never seen: setns(2) into the namespace
// the thread came from). The thread stays locked to the goroutine that
// used it, so the Go runtime discards it when that goroutine ends instead
// of running anyone else in the pod's namespace; see DialLocal.
var ErrThreadStuck = errors.New("podnet: thread could not leave the pod's namespace")

// inPod runs fn with the current OS thread switched into the pod's
// network namespace: on a fresh goroutine (async, for callers that may
// hold their thread or live long), or on the calling goroutine, which
// then must not have locked its thread and must end soon if the error
// is ErrThreadStuck. fn makes its socket with net's own Dialer or
// ListenConfig and calls leave from their Control hook, that is right
// after socket(): the thread switches back and is unlocked there, so
// binding, connecting and above all waiting for a connect run on any
// thread and pin none. Going through net's Dialer rather than wrapping
// a raw fd (os.NewFile + net.FileConn) saves a dozen system calls per
// connection (dup, fcntl, getsockopt/getsockname/getpeername again, a
// second poller registration, keepalive options), and system calls are
// what a new connection costs.
//
// If fn returns without having left (socket() failed, so Control never
// ran), inPod switches back itself. If switching back fails the thread
// stays locked to its goroutine, so the Go runtime throws it away when
// the goroutine ends rather than reuse it in the pod's namespace.
func inPod[T any](n *Net, async bool, fn func(leave func() error) (T, error)) (T, error) {
	return inPodAs(n, async, -1, fn)
}

// inPodAs is inPod with the thread's fsuid set to uid (>= 0) while fn
// makes its socket: the socket is owned by uid (see ListenerUID).
func inPodAs[T any](n *Net, async bool, uid int, fn func(leave func() error) (T, error)) (T, error) {
	if !async {
		return inPodHere(n, uid, fn)
	}
	type result struct {
		v   T
		err error
	}
	ch := make(chan result, 1)
	go func() {
		v, err := inPodHere(n, uid, fn)
		ch <- result{v, err}
		// On ErrThreadStuck this goroutine ends locked: the thread goes.
	}()
	r := <-ch
	return r.v, r.err
}

// inPodHere is inPod on the calling goroutine.
func inPodHere[T any](n *Net, uid int, fn func(leave func() error) (T, error)) (T, error) {
	var zero T
	n.mu.RLock()
	if n.closed {
		n.mu.RUnlock()
		return zero, errClosed
	}
	runtime.LockOSThread()
	// The namespace to come back to: the process's own, the one every
	// unlocked thread is in (Go starts new threads from a clean
	// template thread, and nobody leaves a thread elsewhere unlocked).
	// Opened once and kept: opening it per socket was a tenth of the
	// agent's cost per new connection.
	self, err := ownNetns()
	if err != nil {
		runtime.UnlockOSThread()
		n.mu.RUnlock()
		return zero, fmt.Errorf("podnet: own netns: %w", err)
	}
	if err := unix.Setns(n.fd, unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		n.mu.RUnlock()
		return zero, fmt.Errorf("podnet: setns into pod: %w", err)
	}
	inside := true
	// The socket's owner is the thread's fsuid at socket(); setfsuid is
	// per thread and this one is locked. Without CAP_SETUID it does not
	// take (the kernel says so only by the value it returns): the socket
	// is then the process's own, as before ListenerUID.
	prevUID := -1
	if uid >= 0 {
		if prev, _ := unix.SetfsuidRetUid(uid); currentFsuid() == uid {
			prevUID = prev
		}
	}
	leave := func() error {
		if !inside {
			return nil
		}
		if prevUID >= 0 {
			if unix.SetfsuidRetUid(prevUID); currentFsuid() != prevUID {
				return fmt.Errorf("%w: setfsuid %d back", ErrThreadStuck, prevUID)
			}
			prevUID = -1
		}
		if err := unix.Setns(self, unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("%w: setns: %w", ErrThreadStuck, err)
		}
		inside = false
		runtime.UnlockOSThread()
		n.mu.RUnlock()
		return nil
	}
	v, err := fn(leave)
	if inside {
		if lerr := leave(); lerr != nil {
			// Stay locked (see inPod); fn failed (its Control hook
			// returned the error) or never got a socket.
			if c, ok := any(v).(io.Closer); ok && err == nil {
				c.Close()
			}
			n.mu.RUnlock()
			return zero, lerr
		}
	}
	return v, err
}

// control runs set on the raw fd of a socket being made by net's Dialer
// or ListenConfig.
func control(rc syscall.RawConn, set func(fd int) error) error {
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = set(int(fd)) }); err != nil {
		return err
	}
	return serr
}

// opError strips net's "dial tcp4 a:p: " / "listen tcp6 a:p: " prefix
// (our own message names the address already); errors.Is still sees the
// errno or the context error underneath.
func opError(err error) error {
	var oe *net.OpError
	if errors.As(err, &oe) && oe.Err != nil {
		return oe.Err
	}
	return err
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
	// KeepAlive is the idle time before TCP keepalive probes on accepted
	// connections, as net.ListenConfig.KeepAlive: 0 is Go's default
	// (15 s), negative turns probes off. Off suits a listener whose
	// peers live in the pod itself (the outbound capture port, 15001):
	// probes to a local socket never find anything, and turning them on
	// costs four setsockopt calls per accepted connection.
	KeepAlive time.Duration
	// Fresh says no application of the pod can have a socket yet (CNI
	// ADD: the runtime starts the pod's containers only after it), so
	// the check of the pod's sockets after a bind in a root-owned group
	// is skipped (it costs more than the listener itself). An
	// EADDRINUSE is still explained.
	Fresh bool
}

// Listen opens a TCP listener on port inside the pod, dual-stack [::]:port
// (0.0.0.0:port when the kernel has no IPv6), owned by the Net's
// listener uid (ListenerUID): with SO_REUSEPORT, only sockets of that
// uid can join its group, so an application of the pod cannot share the
// port later, while the next agent (an upgrade, a restart beside the
// keeper's copies) still can.
//
// A socket of the pod already listening on the port that is not an
// agent's (it lacks the agent's SO_MARK) makes Listen fail with a
// *PortInUseError (errors.Is EADDRINUSE) naming it: the agent never
// joins an application's reuseport group. Listening sockets of an agent
// made by another uid (agents before ListenerUID made them as root) are
// joined as that uid, so the hand-over from such an agent still works.
func (n *Net) Listen(port uint16, opts ListenOptions) (net.Listener, error) {
	mark := n.mark
	if opts.Mark != 0 {
		mark = opts.Mark
	}
	uid := n.uid
	ln, err := n.listenAs(uid, port, mark, opts)
	if err != nil && errors.Is(err, unix.EADDRINUSE) && !opts.NoReusePort {
		// Who holds it: an application, or agents of another uid?
		hs, derr := n.Holders(port)
		if derr != nil {
			return nil, fmt.Errorf("podnet: listen :%d: %w (listing the pod's sockets on it: %v)", port, opError(err), derr)
		}
		if foreign := notMarked(hs, mark); len(foreign) > 0 {
			return nil, &PortInUseError{Port: port, Holders: foreign, Err: unix.EADDRINUSE}
		}
		if len(hs) > 0 && int(hs[0].UID) != uid {
			uid = int(hs[0].UID)
			ln, err = n.listenAs(uid, port, mark, opts)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("podnet: listen :%d: %w", port, err)
	}
	// A group owned by ListenerUID let nobody else in: the bind is the
	// check (the dump below costs twice the listener itself,
	// BenchmarkListen). A root-owned group (ours without CAP_SETUID, an
	// older agent's) lets a root application in too, maybe before us.
	if uid >= 0 && uid == n.uid && exclusive(uid) || opts.Fresh {
		return ln, nil
	}
	if hs, derr := n.Holders(port); derr == nil {
		if foreign := notMarked(hs, mark); len(foreign) > 0 {
			ln.Close()
			return nil, &PortInUseError{Port: port, Holders: foreign, Err: unix.EADDRINUSE}
		}
	}
	return ln, nil
}

// listenAs is Listen's socket, made by uid (-1: the process's own).
func (n *Net) listenAs(uid int, port uint16, mark uint32, opts ListenOptions) (net.Listener, error) {
	backlog := opts.Backlog
	if backlog <= 0 {
		backlog = DefaultBacklog
	}
	addr := opts.Address
	network, host := "tcp6", "::"
	if addr.IsValid() {
		host = addr.String()
		if addr.Is4() {
			network = "tcp4"
		}
	}
	ln, err := n.listen(network, host, port, mark, uid, opts)
	if err != nil && !addr.IsValid() && errors.Is(err, unix.EAFNOSUPPORT) {
		network = "tcp4"
		ln, err = n.listen(network, "0.0.0.0", port, mark, uid, opts)
	}
	if err != nil {
		return nil, opError(err)
	}
	// net listens with the process's somaxconn; ask for ours (listen(2)
	// again only changes the backlog; the kernel caps it at the pod's
	// net.core.somaxconn).
	if rc, err := ln.(*net.TCPListener).SyscallConn(); err == nil {
		err = control(rc, func(fd int) error { return unix.Listen(fd, backlog) })
		if err != nil {
			ln.Close()
			return nil, fmt.Errorf("backlog: %w", err)
		}
	}
	return ln, nil
}

func (n *Net) listen(network, host string, port uint16, mark uint32, uid int, opts ListenOptions) (net.Listener, error) {
	wildcard6 := network == "tcp6" && !opts.Address.IsValid()
	return inPodAs(n, true, uid, func(leave func() error) (net.Listener, error) {
		made := false
		lc := net.ListenConfig{KeepAlive: opts.KeepAlive, Control: func(_, _ string, rc syscall.RawConn) error {
			if made {
				// A second socket() would be made outside the pod.
				return errors.New("net made a second socket, outside the pod")
			}
			made = true
			if err := leave(); err != nil {
				return err
			}
			return control(rc, func(fd int) error {
				// net has set SO_REUSEADDR, and IPV6_V6ONLY=1 for tcp6.
				must := []struct {
					name       string
					level, opt int
					val        int
					bestEffort bool
					skip       bool
				}{
					{"IPV6_V6ONLY=0", unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0, false, !wildcard6},
					{"SO_REUSEPORT", unix.SOL_SOCKET, unix.SO_REUSEPORT, 1, false, opts.NoReusePort},
					{"SO_MARK", unix.SOL_SOCKET, unix.SO_MARK, int(mark), false, mark == 0},
					{"IP_TRANSPARENT", unix.SOL_IP, unix.IP_TRANSPARENT, 1, true, opts.NoTransparent},
					{"IPV6_TRANSPARENT", unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1, true, opts.NoTransparent || network != "tcp6"},
				}
				for _, o := range must {
					if o.skip {
						continue
					}
					if err := unix.SetsockoptInt(fd, o.level, o.opt, o.val); err != nil && !o.bestEffort {
						return fmt.Errorf("%s: %w", o.name, err)
					}
				}
				return nil
			})
		}}
		// Plain TCP. Go (1.24+) listens with MPTCP by default and, when
		// that fails (EADDRINUSE among others), silently listens again
		// with TCP: a second socket(), on this thread that has left the
		// pod by then, so the listener ended up in the agent's own (the
		// host's) network namespace and the enrollment "succeeded"
		// (TestListenRefusesAnApplicationsPort, before).
		lc.SetMultipathTCP(false)
		return lc.Listen(context.Background(), network, net.JoinHostPort(host, strconv.Itoa(int(port))))
	})
}

// Dial connects to dst from inside the pod, marked. A valid src binds the
// socket to it transparently (IP_TRANSPARENT), so the peer
// sees src even though it is not an address of the pod; the pod's
// connmark/routing rules bring the replies back. The connection has Go's
// default TCP keepalive (see DialLocal). It implements tunnel.PodNetwork.
func (n *Net) Dial(ctx context.Context, src netip.Addr, dst netip.AddrPort) (net.Conn, error) {
	return n.dial(ctx, src, dst, 0, true, false, nil)
}

// DialLocal is Dial for a peer inside the pod itself (the agent
// delivering to the pod's app): no TCP keepalive, since probes to a local
// socket never find anything and cost four setsockopt calls per
// connection. It implements tunnel.LocalDialer.
//
// Unlike Dial it runs on the calling goroutine (no goroutine and two
// hand-offs per connection), which must not have locked its OS thread,
// like the tunnel's per-connection goroutines. If the error is
// ErrThreadStuck (never seen), the calling goroutine stays locked to a
// thread still in the pod's namespace: it must open no socket and end
// soon (the runtime then discards the thread).
func (n *Net) DialLocal(ctx context.Context, src netip.Addr, dst netip.AddrPort) (net.Conn, error) {
	return n.dial(ctx, src, dst, -1, false, false, nil)
}

// DialLocalOwnPort is DialLocal for a plaintext client's connection: a
// valid src binds a source port of our own range (see
// transparentPortMin), below the ephemeral ranges clients draw from, so
// the dial never shares its conntrack tuple with a connection of that
// client redirected to the inbound port; never a port avoid reports (nil:
// none), such as the pod's app ports. It implements
// tunnel.OwnPortDialer.
func (n *Net) DialLocalOwnPort(ctx context.Context, src netip.Addr, dst netip.AddrPort, avoid func(port uint16) bool) (net.Conn, error) {
	return n.dial(ctx, src, dst, -1, false, true, avoid)
}

func (n *Net) dial(ctx context.Context, src netip.Addr, dst netip.AddrPort, keepAlive time.Duration, async, ownPort bool, avoid func(uint16) bool) (net.Conn, error) {
	if !dst.IsValid() || dst.Port() == 0 {
		return nil, fmt.Errorf("podnet: dial: invalid destination %v", dst)
	}
	dstIP := dst.Addr().Unmap()
	network := "tcp4"
	if dstIP.Is6() {
		network = "tcp6"
	}
	if src.IsValid() {
		src = src.Unmap()
		if src.Is4() != dstIP.Is4() {
			return nil, fmt.Errorf("podnet: dial %v from %v: address families differ", dst, src)
		}
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultDialTimeout)
		defer cancel()
	}
	raddr := netip.AddrPortFrom(dstIP, dst.Port())
	if !src.IsValid() || !ownPort {
		// The kernel chooses the port at connect (and the address,
		// when src is not valid).
		c, err := n.dialOnce(ctx, network, netip.AddrPortFrom(src, 0), raddr, keepAlive, async)
		if err != nil {
			return nil, fmt.Errorf("podnet: dial %v: %w", dst, opError(err))
		}
		return c, nil
	}
	// From the client's address and a port of our own range (none avoid
	// reports), another at random when one is taken (bound by an app's
	// listener, or the whole 4-tuple in use by a live delivery), and the
	// kernel's choice in the pod's range after transparentTries (never
	// worse than before).
	var err error
	for try := 0; ; try++ {
		port := uint16(0)
		if try < transparentTries {
			port = pickPort()
			for draws := 1; avoid != nil && avoid(port) && draws < transparentTries; draws++ {
				port = pickPort()
			}
			if avoid != nil && avoid(port) {
				continue // (a test's draws; 16 app ports in 31,744 never get here)
			}
		}
		var c net.Conn
		c, err = n.dialOnce(ctx, network, netip.AddrPortFrom(src, port), raddr, keepAlive, async)
		if err == nil {
			return c, nil
		}
		if port == 0 || !(errors.Is(err, unix.EADDRINUSE) || errors.Is(err, unix.EADDRNOTAVAIL)) || ctx.Err() != nil {
			break
		}
	}
	return nil, fmt.Errorf("podnet: dial %v: %w", dst, opError(err))
}

// The source ports of DialLocalOwnPort from a client's address (the
// agent delivering a plaintext client's connection to the app as that
// client, IP_TRANSPARENT) are taken from [transparentPortMin,
// transparentPortMax], below the ephemeral ranges clients draw their
// own ports from by default (Linux 32768–60999; Windows, macOS and IANA
// 49152–65535). Inside the pod's conntrack such a dial and a plaintext
// connection of the same client (redirected to the agent's inbound port)
// would otherwise share their tuple whenever the two ports met:
// conntrack takes them for one connection, and the second to come hangs
// — the agent's dial until its timeout, or the client's SYN for as long
// as the agent's connection lives. The kernel, choosing in the pod's
// ephemeral range, cannot know the client's ports, which live in another
// kernel (TestPlaintextClientsNeverMeetTheAgentsPorts). A client whose
// own range reaches below 32768 can still meet one. Dials for HBONE
// clients keep the kernel's choice: those clients send the pod no
// plaintext, and an app binding a port of that range after the agent
// (without SO_REUSEADDR) could otherwise meet one of our dials.
const (
	transparentPortMin = 1024
	transparentPortMax = 32767
	transparentTries   = 8
)

// pickPort is transparentPort (tests replace it).
var pickPort = transparentPort

func transparentPort() uint16 {
	return uint16(transparentPortMin + rand.IntN(transparentPortMax-transparentPortMin+1))
}

// dialOnce is one attempt of dial: local is the zero AddrPort (the
// kernel chooses the address) or the client's address, with port 0 for
// the kernel's choice of port at connect.
func (n *Net) dialOnce(ctx context.Context, network string, local, raddr netip.AddrPort, keepAlive time.Duration, async bool) (net.Conn, error) {
	return inPod(n, async, func(leave func() error) (net.Conn, error) {
		d := net.Dialer{KeepAlive: keepAlive, Control: func(_, _ string, rc syscall.RawConn) error {
			// The socket exists (in the pod): leave before connect,
			// which may wait.
			if err := leave(); err != nil {
				return err
			}
			return control(rc, func(fd int) error { return n.dialOptions(fd, local) })
		}}
		if !local.IsValid() {
			return d.DialContext(ctx, network, raddr.String())
		}
		// net binds local after Control. DialTCP also skips the
		// address parsing and the per-dial deadline context (a timer)
		// of DialContext; it cannot leave the local address unbound,
		// hence DialContext above.
		c, err := d.DialTCP(ctx, network, local, raddr)
		if err != nil {
			return nil, err
		}
		return c, nil
	})
}

// dialOptions marks a dialing socket and, for a valid local address,
// makes it transparent (net binds local next). net sets TCP_NODELAY
// itself once connected.
func (n *Net) dialOptions(fd int, local netip.AddrPort) error {
	if n.mark != 0 {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, int(n.mark)); err != nil {
			return fmt.Errorf("SO_MARK: %w", err)
		}
	}
	if !local.IsValid() {
		return nil
	}
	src := local.Addr()
	if local.Port() == 0 {
		// Choose the source port at connect() from the whole 4-tuple,
		// not at bind() from the address alone: otherwise every
		// connection from one client IP competes for one port range
		// (TIME_WAIT included) and binds slow down, then fail, under a
		// high connection rate.
		_ = unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1)
	} else {
		// A port of our own: other dials from this client may hold it
		// towards other destinations (or in TIME_WAIT); only the whole
		// 4-tuple has to be free, which connect() checks.
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
			return fmt.Errorf("SO_REUSEADDR: %w", err)
		}
	}
	// IP_TRANSPARENT alone lets bind(2) take an address that is not the
	// pod's (the kernel's nonlocal-bind check accepts transparent or
	// freebind sockets alike) and lets the SYN leave from it; IP_FREEBIND
	// on top would be one more system call per connection for nothing.
	if src.Is4() {
		if err := unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_TRANSPARENT, 1); err != nil {
			return fmt.Errorf("IP_TRANSPARENT: %w", err)
		}
		return nil
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1); err != nil {
		return fmt.Errorf("IPV6_TRANSPARENT: %w", err)
	}
	return nil
}
