package cniproto

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// DefaultSocket is where the agent listens.
const DefaultSocket = "/var/run/ambit/cni.sock"

// ErrAgentUnavailable wraps every failure to reach the agent at all (socket
// missing, connection refused), as opposed to an agent that answered badly.
// The plugin uses it to tell "no agent" from "agent said no".
var ErrAgentUnavailable = errors.New("ambit-agent unavailable")

// growSendBufferAbove is the request size from which Call raises the
// socket's send buffer. A unix datagram must fit the sender's buffer
// whole (sk_sndbuf minus a little, else EMSGSIZE); the default
// (net.core.wmem_default, 208 KiB on most distributions) already fits
// anything below this, so add/del/check never pay the extra syscall.
const growSendBufferAbove = 128 << 10

// Call sends one request, with the netns fd attached when netns is not nil,
// and waits for the answer until ctx's deadline.
//
// The exchange is three blocking system calls on a bare socket whose send
// and receive timeouts are ctx's deadline, not the net package's dialer
// and poller: ambit-cni makes exactly one call per exec, and in a fresh
// process the poller's set-up, the dialer and the deadline timers cost
// page faults on every pod of the node (~15 per exec). So Call honours
// ctx's deadline, not a cancellation without one.
func Call(ctx context.Context, socket string, req *Request, netns *os.File) (*Response, error) {
	if err := req.Validate(); err != nil {
		return nil, err
	}
	b, err := encodeRequest(req)
	if err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socket for ambit-agent: %w", err)
	}
	defer unix.Close(fd)
	dl, hasDL := ctx.Deadline()
	if hasDL && time.Until(dl) <= 0 {
		return nil, context.DeadlineExceeded
	}
	timed := func(opt int, f func() error) error { return timedCall(fd, opt, dl, hasDL, f) }
	if err := timed(unix.SO_SNDTIMEO, func() error { return unix.Connect(fd, &unix.SockaddrUnix{Name: socket}) }); err != nil {
		if isTimeout(err) {
			return nil, fmt.Errorf("%w (connecting to ambit-agent at %s: its queue is full)", context.DeadlineExceeded, socket)
		}
		return nil, fmt.Errorf("%w: cannot connect to %s: %v", ErrAgentUnavailable, socket, &os.SyscallError{Syscall: "connect", Err: err})
	}
	var oob []byte
	if netns != nil {
		oob = unix.UnixRights(int(netns.Fd()))
	}
	if err := send(fd, req, b, oob, true, func(f func() error) error { return timed(unix.SO_SNDTIMEO, f) }); err != nil {
		return nil, fmt.Errorf("sending request to ambit-agent at %s: %w", socket, timeoutErr(err))
	}
	buf := make([]byte, MaxMessageSize+1)
	var n, flags int
	err = timed(unix.SO_RCVTIMEO, func() (err error) {
		n, _, flags, _, err = unix.Recvmsg(fd, buf, nil, 0)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("waiting for ambit-agent at %s: %w", socket, timeoutErr(err))
	}
	if flags&unix.MSG_TRUNC != 0 || n > MaxMessageSize {
		return nil, fmt.Errorf("ambit-agent answer exceeds %d bytes", MaxMessageSize)
	}
	if n == 0 {
		return nil, fmt.Errorf("ambit-agent at %s closed the connection without answering", socket)
	}
	resp, err := DecodeResponse(buf[:n])
	if err != nil {
		return nil, err
	}
	// An agent that refuses the request's version answers an error in its
	// own; anything else must be in the request's, whose meaning (who
	// installs the rules) the plugin relies on.
	if resp.Version != req.Version && resp.Error == "" {
		return nil, fmt.Errorf("ambit-agent answered a version %d request in version %d", req.Version, resp.Version)
	}
	explainOldAgent(req, len(b), resp)
	return resp, nil
}

// timedCall runs f, a blocking call on the socket fd, with what is left
// until dl (when hasDL) as its timeout opt (SO_SNDTIMEO, SO_RCVTIMEO),
// set again before every retry after EINTR: the kernel starts a socket
// timeout afresh in each call, so one timeout set up front let a connect
// that waited for the agent's queue and then the wait for the answer take
// twice the deadline, and a signal every so often (EINTR, retried) keep
// the caller waiting for ever. Past dl it returns EAGAIN, as the kernel's
// own timeout does.
func timedCall(fd, opt int, dl time.Time, hasDL bool, f func() error) error {
	for {
		if hasDL {
			left := time.Until(dl)
			if left <= 0 {
				return unix.EAGAIN
			}
			tv := unix.NsecToTimeval(max(left, time.Millisecond).Nanoseconds())
			// Not expected to fail on a fresh socket; an error
			// here must not read as an unreachable agent.
			unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, opt, &tv)
		}
		if err := f(); err != unix.EINTR {
			return err
		}
	}
}

// Probe reports whether an agent accepts connections on socket, without
// sending a request: a socket file left by an agent that died refuses
// (ErrAgentUnavailable), while a stat of the path says it is there.
func Probe(socket string, timeout time.Duration) error {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket for ambit-agent: %w", err)
	}
	defer unix.Close(fd)
	err = timedCall(fd, unix.SO_SNDTIMEO, time.Now().Add(timeout), true,
		func() error { return unix.Connect(fd, &unix.SockaddrUnix{Name: socket}) })
	switch {
	case err == nil:
		return nil
	case isTimeout(err):
		// Listening, with a full queue: busy, not down.
		return nil
	default:
		return fmt.Errorf("%w: cannot connect to %s: %v", ErrAgentUnavailable, socket, &os.SyscallError{Syscall: "connect", Err: err})
	}
}

// isTimeout: a blocking call on a socket with SO_SNDTIMEO/SO_RCVTIMEO
// that ran out of time.
func isTimeout(err error) bool { return err == unix.EAGAIN || err == unix.EINPROGRESS }

// timeoutErr makes a socket timeout recognisable as the deadline
// (errors.Is context.DeadlineExceeded).
func timeoutErr(err error) error {
	var errno unix.Errno
	if errors.As(err, &errno) && isTimeout(errno) {
		return fmt.Errorf("%w (%v)", context.DeadlineExceeded, err)
	}
	return err
}

// oldAgentRefusal is how an agent built before MaxRequestSize existed
// refuses any datagram over MaxMessageSize (its read buffer truncated it).
var oldAgentRefusal = fmt.Sprintf("request exceeds %d bytes", MaxMessageSize)

// explainOldAgent turns an older agent's terse refusal of a large request
// into something an operator can act on: the two binaries are of
// different versions, and what that costs.
func explainOldAgent(req *Request, size int, resp *Response) {
	if size <= MaxMessageSize || !strings.HasPrefix(resp.Error, oldAgentRefusal) {
		return
	}
	resp.Error = fmt.Sprintf("%s: this %s request lists %d attachments in %d bytes, but the ambit-agent on this node reads requests of at most %d bytes, "+
		"so it is older than this ambit-cni (agent and plugin versions differ; upgrade ambit-agent). Harmless meanwhile: the runtime retries GC, and nothing else is affected",
		resp.Error, req.Op, len(req.Valid), size, MaxMessageSize)
}

// send writes the request datagram on a blocking socket, through call
// (which retries it after EINTR). A large one (a gc on a busy node)
// first raises the socket's send buffer when grow is set (tests clear it
// to see the kernel refuse).
func send(fd int, req *Request, b, oob []byte, grow bool, call func(func() error) error) error {
	if grow && len(b) > growSendBufferAbove {
		growSendBuffer(fd, len(b))
	}
	err := call(func() error { return unix.Sendmsg(fd, b, oob, nil, 0) })
	if err == unix.EMSGSIZE {
		sndbuf, _ := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF)
		return fmt.Errorf("the %d-byte %s request (%d attachments) does not fit this socket's %d-byte send buffer and the kernel refused to raise it (net.core.wmem_max, CAP_NET_ADMIN): %w",
			len(b), req.Op, len(req.Valid), sndbuf, &os.SyscallError{Syscall: "sendmsg", Err: err})
	}
	if err != nil {
		return &os.SyscallError{Syscall: "sendmsg", Err: err}
	}
	return nil
}

// growSendBuffer asks for a send buffer that holds a size-byte datagram.
// SO_SNDBUFFORCE ignores net.core.wmem_max but needs CAP_NET_ADMIN, which
// the plugin has when the runtime runs it as root; SO_SNDBUF is capped by
// wmem_max. The kernel doubles the value for its own overhead. Errors are
// not reported here: if the buffer stays too small, the write fails with
// EMSGSIZE and send says so.
func growSendBuffer(fd, size int) {
	want := size + 4096
	if unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, want) != nil {
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, want)
	}
}

// Handler serves one decoded request. netns is the received namespace fd
// (nil when none was sent); the handler owns it and must close it, or keep
// it for as long as it needs the namespace.
type Handler func(ctx context.Context, req *Request, netns *os.File) *Response

// Server accepts plugin connections with bounded concurrency and a deadline
// on each exchange.
type Server struct {
	Handler Handler
	// Timeout bounds one exchange: read, handle, write. Default 10s.
	Timeout time.Duration
	// MaxConcurrent bounds requests handled at once; further connections
	// wait in the kernel's accept queue. Default 64.
	MaxConcurrent int
	// OnError, if set, is told of every failed exchange (malformed
	// message, peer gone); the server keeps serving.
	OnError func(error)
}

// Listen creates the agent socket: a fresh SOCK_SEQPACKET socket at path,
// its directory created 0700 if missing, the socket itself 0600 so only
// root can enroll pods. Whatever path named before (a previous agent's
// socket, live or dead) is replaced atomically: see OpenSocket.
func Listen(path string) (*net.UnixListener, error) {
	s, err := OpenSocket(path)
	if err != nil {
		return nil, err
	}
	return s.Listener, nil
}

// Socket is a listening agent socket and the file it was bound to, so
// its agent can tell whether path still names it (Current): another
// agent of the node (a surge upgrade) replaces the path with its own
// socket, and when that agent stops, this one may take the path back.
type Socket struct {
	Listener *net.UnixListener
	Path     string
	dev, ino uint64 // of the socket file bind created
}

// OpenSocket is Listen, keeping what Current needs. The socket is bound
// at a temporary name in path's directory and renamed over path, so a
// plugin connecting meanwhile reaches either the previous socket or this
// one, never a missing path (removing the old file first left a window
// of ENOENT). A path too long for a temporary name beside it (sun_path
// holds 107 bytes) falls back to removing and binding in place.
func OpenSocket(path string) (*Socket, error) {
	dir := dirOf(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating directory for %s: %w", path, err)
	}
	var rnd [4]byte
	rand.Read(rnd[:])
	tmp := dir + "/.ambit-sock-" + hex.EncodeToString(rnd[:])
	if len(tmp) > maxSunPath {
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("removing stale socket %s: %w", path, err)
		}
		tmp = path
	}
	old := syscall.Umask(0o177)
	l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: tmp, Net: "unixpacket"})
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", path, err)
	}
	l.SetUnlinkOnClose(false)
	// The file's identity, taken before the rename so it is surely this
	// socket's. It cannot be reused by another file while l is open: the
	// bound socket holds a reference to it even once it is unlinked.
	var st unix.Stat_t
	if err := unix.Stat(tmp, &st); err != nil {
		l.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("listening on %s: %w", path, err)
	}
	if tmp != path {
		if err := os.Rename(tmp, path); err != nil {
			l.Close()
			os.Remove(tmp)
			return nil, fmt.Errorf("listening on %s: %w", path, err)
		}
	}
	return &Socket{Listener: l, Path: path, dev: uint64(st.Dev), ino: uint64(st.Ino)}, nil
}

// maxSunPath is the longest path a unix socket binds to (sun_path less
// its terminating NUL).
const maxSunPath = 107

// Current reports whether Path still names this socket: false once
// another agent replaced it (or it was removed). An error other than
// ENOENT (a transient EMFILE, EACCES) is returned as such; the caller
// should not take it for a lost path.
func (s *Socket) Current() (bool, error) {
	var st unix.Stat_t
	if err := unix.Stat(s.Path, &st); err != nil {
		if err == unix.ENOENT {
			return false, nil
		}
		return false, &os.PathError{Op: "stat", Path: s.Path, Err: err}
	}
	return uint64(st.Dev) == s.dev && uint64(st.Ino) == s.ino, nil
}

// Close closes the listener; the file stays (it may name another
// agent's socket by now, and a dead one refuses connections the same).
func (s *Socket) Close() error { return s.Listener.Close() }

func dirOf(p string) string {
	for i := len(p) - 1; i >= 0; i-- {
		if p[i] == '/' {
			if i == 0 {
				return "/"
			}
			return p[:i]
		}
	}
	return "."
}

// Serve accepts until l is closed or ctx ends, then waits for in-flight
// exchanges to finish.
func (s *Server) Serve(ctx context.Context, l *net.UnixListener) error {
	timeout := s.Timeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	max := s.MaxConcurrent
	if max <= 0 {
		max = 64
	}
	sem := make(chan struct{}, max)
	var wg sync.WaitGroup
	defer wg.Wait()
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	for {
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			return nil
		}
		conn, err := l.AcceptUnix()
		if err != nil {
			<-sem
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			if s.OnError != nil {
				s.OnError(fmt.Errorf("accept: %w", err))
			}
			time.Sleep(10 * time.Millisecond)
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := s.serveConn(ctx, conn, timeout); err != nil && s.OnError != nil {
				s.OnError(err)
			}
		}()
	}
}

func (s *Server) serveConn(parent context.Context, conn *net.UnixConn, timeout time.Duration) error {
	defer conn.Close()
	ctx, cancel := context.WithTimeout(parent, timeout)
	defer cancel()
	conn.SetDeadline(time.Now().Add(timeout))

	var netns *os.File
	version := Version // the request's, once known
	reply := func(r *Response) error {
		r.Version = version
		b, err := encode(r)
		if err != nil {
			return err
		}
		if _, _, err := conn.WriteMsgUnix(b, nil, nil); err != nil {
			return fmt.Errorf("writing answer: %w", err)
		}
		return nil
	}
	fail := func(err error) error {
		if netns != nil {
			netns.Close()
		}
		_ = reply(&Response{Error: err.Error()})
		return err
	}

	// Learn the datagram's size first so a request costs the memory it
	// needs: most are a few hundred bytes, a gc on a large node a few
	// hundred KiB, and MaxConcurrent of them must not each hold 1 MiB.
	size, err := peekSize(conn)
	if err != nil {
		return fmt.Errorf("reading plugin request: %w", err)
	}
	if size == 0 {
		// The peer closed without a request: Probe (the plugin's
		// STATUS under fail-closed, every few seconds). Nothing to
		// answer or report.
		return nil
	}
	// One spare byte: a datagram that somehow grew would show as
	// truncated rather than silently cut. A datagram over the bound is
	// still read (into one byte, the kernel drops the rest) so its fds
	// are closed and the answer is not lost: a unix socket closed with
	// unread data resets its peer, which then never sees the reply.
	bufSize := size + 1
	if size > MaxRequestSize {
		bufSize = 1
	}
	buf := make([]byte, bufSize)
	oob := make([]byte, unix.CmsgSpace(4*4))
	n, oobn, flags, _, err := conn.ReadMsgUnix(buf, oob)
	if err != nil {
		return fmt.Errorf("reading plugin request: %w", err)
	}
	fds, ferr := parseRights(oob[:oobn])
	switch {
	case len(fds) == 1:
		netns = os.NewFile(uintptr(fds[0]), "netns")
	case len(fds) > 1:
		for _, fd := range fds {
			unix.Close(fd)
		}
		ferr = fmt.Errorf("request carries %d file descriptors, at most one (the netns) is accepted", len(fds))
	}
	if ferr != nil {
		return fail(ferr)
	}
	if size > MaxRequestSize {
		// Same shape as the MaxMessageSize refusal of older agents, which
		// Call recognises.
		return fail(fmt.Errorf("request exceeds %d bytes (it has %d)", MaxRequestSize, size))
	}
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 || n > MaxRequestSize {
		return fail(fmt.Errorf("request exceeds %d bytes or carries too much control data", MaxRequestSize))
	}
	req, err := DecodeRequest(buf[:n])
	if err != nil {
		return fail(err)
	}
	version = req.Version
	if (req.Op == OpAdd || req.Op == OpCheck) && netns == nil {
		return fail(fmt.Errorf("%s request for %s/%s carries no netns file descriptor", req.Op, req.Pod.Namespace, req.Pod.Name))
	}
	// A version 2 del carries the netns (when it still exists) so the
	// agent can remove the redirection; nothing else but add and check.
	if (req.Op == OpGC || req.Op == OpDel && req.Version < 2) && netns != nil {
		netns.Close()
		netns = nil
	}
	resp := s.Handler(ctx, req, netns)
	if resp == nil {
		resp = &Response{Error: "agent produced no answer"}
	}
	return reply(resp)
}

// peekSize waits for the next datagram and returns its length without
// consuming it: recv with MSG_PEEK|MSG_TRUNC and no buffer reports the
// full length on unix sockets. Passed fds stay queued (no control buffer,
// so the kernel drops its peeked references). The fd is non-blocking, so
// EAGAIN hands the wait to the runtime poller, where the connection's
// deadline applies.
func peekSize(conn *net.UnixConn) (int, error) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return 0, err
	}
	var n int
	var errno syscall.Errno
	err = rc.Read(func(fd uintptr) bool {
		for {
			r, _, e := unix.Syscall6(unix.SYS_RECVFROM, fd, 0, 0, unix.MSG_PEEK|unix.MSG_TRUNC, 0, 0)
			switch e {
			case unix.EINTR:
				continue
			case unix.EAGAIN:
				return false
			}
			n, errno = int(r), e
			return true
		}
	})
	if err != nil {
		return 0, err
	}
	if errno != 0 {
		return 0, os.NewSyscallError("recvfrom", errno)
	}
	return n, nil
}

func parseRights(oob []byte) ([]int, error) {
	if len(oob) == 0 {
		return nil, nil
	}
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("parsing control message: %w", err)
	}
	var fds []int
	for _, m := range msgs {
		if m.Header.Level != unix.SOL_SOCKET || m.Header.Type != unix.SCM_RIGHTS {
			continue
		}
		f, err := unix.ParseUnixRights(&m)
		if err != nil {
			return fds, fmt.Errorf("parsing SCM_RIGHTS: %w", err)
		}
		fds = append(fds, f...)
	}
	return fds, nil
}
