package keeper

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Limits of one request: a key names a sandbox, a pod has three
// listeners (dual-stack counts once).
const (
	maxKeyLen   = 256
	maxFDs      = 8
	maxMsgSize  = 4096
	callTimeout = 2 * time.Second

	// Waits between failing accepts (net/http's figures).
	minAcceptBackoff = 5 * time.Millisecond
	maxAcceptBackoff = time.Second
)

// Ops.
const (
	opBegin = "begin" // a new agent: answers its generation
	opPut   = "put"   // key's sockets (attached) replace the kept ones
	opDrop  = "drop"  // close key's sockets
	opPrune = "prune" // close every entry of a generation below Gen
	opCount = "count" // how many entries and sockets are kept (tests, logs)
)

type request struct {
	Op  string `json:"op"`
	Key string `json:"key,omitempty"`
	Gen uint64 `json:"gen,omitempty"`
}

type response struct {
	Gen     uint64 `json:"gen,omitempty"`
	Entries int    `json:"entries,omitempty"`
	FDs     int    `json:"fds,omitempty"`
	Error   string `json:"error,omitempty"`
}

type entry struct {
	gen uint64
	fds []int
}

// Server keeps sockets for agents.
type Server struct {
	Log *slog.Logger

	mu      sync.Mutex
	gen     uint64
	entries map[string]entry
}

// Serve answers requests on a unix socket at path until ctx ends, then
// closes every kept socket.
func (s *Server) Serve(ctx context.Context, path string) error {
	if s.Log == nil {
		s.Log = slog.Default()
	}
	s.mu.Lock()
	s.entries = map[string]entry{}
	s.mu.Unlock()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	os.Remove(path) // a previous keeper's
	l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return fmt.Errorf("keeper: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return err
	}
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	defer s.closeAll()
	// Like net/http.Server.Serve: an accept error other than the listener
	// closing (EMFILE/ENFILE under fd exhaustion, ENOMEM, ENOBUFS) is
	// waited out, never a reason to stop. Stopping would close every
	// enrolled pod's kept listeners — an outage over a transient
	// condition — while the kept sockets need nothing of this loop to stay
	// in LISTEN; a caller waits in the queue meanwhile (its call times out
	// after callTimeout, and the agent treats the keeper as best effort).
	var backoff time.Duration
	retries := 0
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				// Closed, but not by us: nothing to retry on.
				return fmt.Errorf("keeper: accept: %w", err)
			}
			if backoff == 0 {
				backoff = minAcceptBackoff
				// Once per episode: a retry every second must not
				// flood the log for as long as the condition lasts.
				s.Log.Error("keeper: accept failed; keeping every socket and retrying", "err", err)
			} else {
				backoff = min(2*backoff, maxAcceptBackoff)
			}
			retries++
			t := time.NewTimer(backoff)
			select {
			case <-ctx.Done():
				t.Stop()
				return nil
			case <-t.C:
			}
			continue
		}
		if backoff != 0 {
			s.Log.Info("keeper: accepting again", "failedAccepts", retries)
			backoff, retries = 0, 0
		}
		go s.serveConn(c)
	}
}

func (s *Server) closeAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for k, e := range s.entries {
		closeFDs(e.fds)
		delete(s.entries, k)
	}
}

func (s *Server) serveConn(c *net.UnixConn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(callTimeout))
	reply := func(r response) {
		b, _ := json.Marshal(r)
		c.Write(b)
	}
	if err := samePeer(c); err != nil {
		reply(response{Error: err.Error()})
		return
	}
	buf := make([]byte, maxMsgSize+1)
	oob := make([]byte, unix.CmsgSpace(4*maxFDs))
	n, oobn, flags, _, err := c.ReadMsgUnix(buf, oob)
	if err != nil {
		return
	}
	fds, ferr := parseRights(oob[:oobn])
	if ferr == nil && flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
		ferr = fmt.Errorf("request larger than %d bytes or %d sockets", maxMsgSize, maxFDs)
	}
	var req request
	if ferr == nil {
		if err := json.Unmarshal(buf[:n], &req); err != nil {
			ferr = fmt.Errorf("malformed request: %w", err)
		} else if len(req.Key) > maxKeyLen {
			ferr = fmt.Errorf("key longer than %d bytes", maxKeyLen)
		}
	}
	if ferr != nil {
		closeFDs(fds)
		reply(response{Error: ferr.Error()})
		return
	}
	if req.Op != opPut && len(fds) > 0 {
		closeFDs(fds)
		fds = nil
	}
	reply(s.do(req, fds))
}

func (s *Server) do(req request, fds []int) response {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch req.Op {
	case opBegin:
		// Increasing across keeper restarts too (a restarted keeper
		// starts empty, but an agent that began with the old one still
		// puts its generation): the clock, at least one more.
		s.gen = max(s.gen+1, uint64(time.Now().UnixNano()))
		return response{Gen: s.gen}
	case opPut:
		if req.Key == "" || len(fds) == 0 || req.Gen == 0 {
			closeFDs(fds)
			return response{Error: "put needs a key, a generation and at least one socket"}
		}
		for _, fd := range fds {
			if t, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || t != 1 {
				closeFDs(fds)
				return response{Error: "put: only listening sockets are kept"}
			}
		}
		if old, ok := s.entries[req.Key]; ok {
			closeFDs(old.fds)
		}
		s.entries[req.Key] = entry{gen: req.Gen, fds: fds}
	case opDrop:
		if e, ok := s.entries[req.Key]; ok {
			closeFDs(e.fds)
			delete(s.entries, req.Key)
		}
	case opPrune:
		pruned := 0
		for k, e := range s.entries {
			if e.gen < req.Gen {
				closeFDs(e.fds)
				delete(s.entries, k)
				pruned++
			}
		}
		if pruned > 0 {
			s.Log.Info("closed sockets kept for pods no agent serves any more", "entries", pruned)
		}
	case opCount:
	default:
		return response{Error: fmt.Sprintf("unknown op %q", req.Op)}
	}
	r := response{Entries: len(s.entries)}
	for _, e := range s.entries {
		r.FDs += len(e.fds)
	}
	return r
}

// samePeer refuses peers of another user: the sockets kept are every
// enrolled pod's listeners.
func samePeer(c *net.UnixConn) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var cred *unix.Ucred
	var cerr error
	if err := rc.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return err
	}
	if cerr != nil {
		return cerr
	}
	if int(cred.Uid) != os.Geteuid() {
		return fmt.Errorf("peer uid %d is not the keeper's (%d)", cred.Uid, os.Geteuid())
	}
	return nil
}

func parseRights(oob []byte) ([]int, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("control data: %w", err)
	}
	var fds []int
	for _, m := range msgs {
		if m.Header.Level != unix.SOL_SOCKET || m.Header.Type != unix.SCM_RIGHTS {
			continue
		}
		got, err := unix.ParseUnixRights(&m)
		if err != nil {
			closeFDs(fds)
			return nil, err
		}
		fds = append(fds, got...)
	}
	return fds, nil
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// Client is the agent's side. Its zero value is not usable: Dial.
type Client struct {
	path string
	gen  uint64
}

// ErrUnavailable: no keeper listens at the path.
var ErrUnavailable = errors.New("keeper unavailable")

// Dial starts a new generation at the keeper listening at path.
func Dial(path string) (*Client, error) {
	c := &Client{path: path}
	r, err := c.call(request{Op: opBegin}, nil)
	if err != nil {
		return nil, err
	}
	c.gen = r.Gen
	return c, nil
}

// Put hands the keeper key's listeners (it gets duplicates; the caller
// keeps its own), replacing what it kept for key.
func (c *Client) Put(key string, listeners ...net.Listener) error {
	fds := make([]int, 0, len(listeners))
	defer func() { closeFDs(fds) }()
	for _, l := range listeners {
		sc, ok := l.(syscall.Conn)
		if !ok {
			return fmt.Errorf("keeper: a %T has no file descriptor", l)
		}
		rc, err := sc.SyscallConn()
		if err != nil {
			return fmt.Errorf("keeper: %w", err)
		}
		// A bare dup: (*os.File).Fd, through net's File, would put the
		// shared file description, and so the agent's own listener, in
		// blocking mode.
		var dup int
		var derr error
		if err := rc.Control(func(fd uintptr) { dup, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
			return fmt.Errorf("keeper: %w", err)
		}
		if derr != nil {
			return fmt.Errorf("keeper: dup: %w", derr)
		}
		fds = append(fds, dup)
	}
	_, err := c.call(request{Op: opPut, Key: key, Gen: c.gen}, fds)
	return err
}

// Drop has the keeper close key's sockets: before the agent closes its
// own, so they really close (a pod deleted, unenrolled, or released).
func (c *Client) Drop(key string) error {
	_, err := c.call(request{Op: opDrop, Key: key}, nil)
	return err
}

// PruneOlder closes what agents before this one put and this one did not
// put again: called once the agent has re-adopted its pods.
func (c *Client) PruneOlder() error {
	_, err := c.call(request{Op: opPrune, Gen: c.gen}, nil)
	return err
}

// PruneAll closes everything: the agent is stopping while another agent
// serves the node, whose listeners beside these must take the queue over
// now (a stop with no such agent keeps them, as a crash does).
func (c *Client) PruneAll() error {
	_, err := c.call(request{Op: opPrune, Gen: math.MaxUint64}, nil)
	return err
}

// Count reports the entries and sockets kept.
func (c *Client) Count() (entries, fds int, err error) {
	r, err := c.call(request{Op: opCount}, nil)
	return r.Entries, r.FDs, err
}

func (c *Client) call(req request, fds []int) (response, error) {
	conn, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: c.path, Net: "unixpacket"})
	if err != nil {
		return response{}, fmt.Errorf("%w at %s: %v", ErrUnavailable, c.path, err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(callTimeout))
	b, _ := json.Marshal(req)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	if _, _, err := conn.WriteMsgUnix(b, oob, nil); err != nil {
		return response{}, fmt.Errorf("keeper %s: %w", req.Op, err)
	}
	buf := make([]byte, maxMsgSize)
	n, err := conn.Read(buf)
	if err != nil {
		return response{}, fmt.Errorf("keeper %s: %w", req.Op, err)
	}
	var r response
	if err := json.Unmarshal(buf[:n], &r); err != nil {
		return response{}, fmt.Errorf("keeper %s: malformed answer: %w", req.Op, err)
	}
	if r.Error != "" {
		return r, fmt.Errorf("keeper %s: %s", req.Op, r.Error)
	}
	return r, nil
}
