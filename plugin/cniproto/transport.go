package cniproto

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
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

// Call sends one request, with the netns fd attached when netns is not nil,
// and waits for the answer until ctx's deadline.
func Call(ctx context.Context, socket string, req *Request, netns *os.File) (*Response, error) {
	if err := req.Validate(); err != nil {
		return nil, err
	}
	b, err := encode(req)
	if err != nil {
		return nil, err
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "unixpacket", socket)
	if err != nil {
		return nil, fmt.Errorf("%w: cannot connect to %s: %v", ErrAgentUnavailable, socket, err)
	}
	conn := c.(*net.UnixConn)
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	var oob []byte
	if netns != nil {
		oob = unix.UnixRights(int(netns.Fd()))
	}
	if _, _, err := conn.WriteMsgUnix(b, oob, nil); err != nil {
		return nil, fmt.Errorf("sending request to ambit-agent at %s: %w", socket, ctxErr(ctx, err))
	}
	buf := make([]byte, MaxMessageSize+1)
	n, _, flags, _, err := conn.ReadMsgUnix(buf, nil)
	if err != nil {
		return nil, fmt.Errorf("waiting for ambit-agent at %s: %w", socket, ctxErr(ctx, err))
	}
	if flags&unix.MSG_TRUNC != 0 || n > MaxMessageSize {
		return nil, fmt.Errorf("ambit-agent answer exceeds %d bytes", MaxMessageSize)
	}
	if n == 0 {
		return nil, fmt.Errorf("ambit-agent at %s closed the connection without answering", socket)
	}
	return DecodeResponse(buf[:n])
}

// ctxErr makes a deadline recognisable (errors.Is context.DeadlineExceeded)
// whether the context or the socket deadline noticed it first.
func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%w (%v)", ctx.Err(), err)
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return fmt.Errorf("%w (%v)", context.DeadlineExceeded, err)
	}
	return err
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
// root can enroll pods.
func Listen(path string) (*net.UnixListener, error) {
	if err := os.MkdirAll(dirOf(path), 0o700); err != nil {
		return nil, fmt.Errorf("creating directory for %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("removing stale socket %s: %w", path, err)
	}
	old := syscall.Umask(0o177)
	l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", path, err)
	}
	l.SetUnlinkOnClose(false)
	return l, nil
}

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

	buf := make([]byte, MaxMessageSize+1)
	oob := make([]byte, unix.CmsgSpace(4*4))
	n, oobn, flags, _, err := conn.ReadMsgUnix(buf, oob)
	if err != nil {
		return fmt.Errorf("reading plugin request: %w", err)
	}
	fds, ferr := parseRights(oob[:oobn])
	var netns *os.File
	switch {
	case len(fds) == 1:
		netns = os.NewFile(uintptr(fds[0]), "netns")
	case len(fds) > 1:
		for _, fd := range fds {
			unix.Close(fd)
		}
		ferr = fmt.Errorf("request carries %d file descriptors, at most one (the netns) is accepted", len(fds))
	}
	reply := func(r *Response) error {
		r.Version = Version
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
	if ferr != nil {
		return fail(ferr)
	}
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 || n > MaxMessageSize {
		return fail(fmt.Errorf("request exceeds %d bytes or carries too much control data", MaxMessageSize))
	}
	req, err := DecodeRequest(buf[:n])
	if err != nil {
		return fail(err)
	}
	if (req.Op == OpAdd || req.Op == OpCheck) && netns == nil {
		return fail(fmt.Errorf("%s request for %s/%s carries no netns file descriptor", req.Op, req.Pod.Namespace, req.Pod.Name))
	}
	if (req.Op == OpDel || req.Op == OpGC) && netns != nil {
		netns.Close()
		netns = nil
	}
	resp := s.Handler(ctx, req, netns)
	if resp == nil {
		resp = &Response{Error: "agent produced no answer"}
	}
	return reply(resp)
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
