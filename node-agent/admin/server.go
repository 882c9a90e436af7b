package admin

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambit-mesh/ambit/node-agent/identity"
)

// SocketDir is the directory of the agents' admin sockets under the
// state directory: root only (0700).
const SocketDir = "admin"

// StatusPath is the one thing the socket serves.
const StatusPath = "/v1/status"

// maxSocketPath is what fits in sockaddr_un.sun_path with its NUL.
const maxSocketPath = 107

// SocketPath is the admin socket of the agent registered as instance
// (node-agent/instance) under stateDir: each agent of a node has its own,
// so during a surge upgrade both can be asked.
func SocketPath(stateDir, instance string) string {
	return filepath.Join(stateDir, SocketDir, instance+".sock")
}

// Sources are where a Server reads the agent's state, each called once
// per request. A nil one leaves its part of the answer empty.
type Sources struct {
	Agent func() Agent
	// Pods may wait for pods' locks until ctx ends (the agent reports
	// pods it could not look at in time rather than wait on).
	Pods         func(ctx context.Context) []Pod
	Certificates func() []identity.CertState
	Roots        func() []*x509.Certificate
	// Connections is what the agent holds, all pods together, and its
	// budget (0: none).
	Connections func() (held, budget int)
}

// Server serves Status on a unix socket.
type Server struct {
	src  Sources
	path string
	srv  *http.Server
	done chan struct{}
	// one answers at a time: an operator's loop of `status` calls must
	// not make the agent compute many pictures at once.
	one chan struct{}
}

// requestTimeout bounds how long a request may take, pods' locks
// included: past it the pods not looked at are reported busy.
const requestTimeout = 5 * time.Second

// Listen opens the admin socket at path (its directory made 0700, the
// socket 0600: nothing but root reaches it, and no TCP port is opened)
// and serves it until Close.
func Listen(path string, src Sources, lg *slog.Logger) (*Server, error) {
	if len(path) > maxSocketPath {
		return nil, fmt.Errorf("admin socket %s: longer than %d bytes (a shorter stateDir?)", path, maxSocketPath)
	}
	if lg == nil {
		lg = slog.Default()
	}
	if err := ownDir(filepath.Dir(path)); err != nil {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("admin socket %s: exists and is not a socket", path)
		}
		os.Remove(path) // a dead process's, of the same name
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(true)
	// The directory is 0700: nobody else could connect before this.
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	s := &Server{src: src, path: path, done: make(chan struct{}), one: make(chan struct{}, 1)}
	mux := http.NewServeMux()
	mux.HandleFunc(StatusPath, s.serveStatus)
	s.srv = &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       5 * time.Second,
		WriteTimeout:      requestTimeout + 10*time.Second,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          log.New(slogWriter{lg}, "", 0),
	}
	go func() {
		defer close(s.done)
		if err := s.srv.Serve(peerCheck{l.(*net.UnixListener), lg}); err != nil && !errors.Is(err, http.ErrServerClosed) {
			lg.Warn("admin socket stopped", "path", path, "err", err)
		}
	}()
	return s, nil
}

// ownDir makes dir (its parent, the state directory, must exist or is
// made) a directory of this process's user, mode 0700. What is already
// there is taken only if it is a real directory of that user: through
// a symbolic link the agent (root) would chmod and serve in whatever it
// names, and a directory another user owns lets that user swap the
// socket for one of its own, whatever the mode. Both are refused with
// what to remove; the node is served without the socket meanwhile.
func ownDir(dir string) error {
	if err := os.MkdirAll(filepath.Dir(dir), 0o700); err != nil {
		return err
	}
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	// Checked and changed through one descriptor opened without
	// following a link, so nothing swapped in between is changed.
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		if fi, lerr := os.Lstat(dir); lerr == nil && fi.Mode()&os.ModeSymlink != 0 {
			return fmt.Errorf("%s is a symbolic link: the socket goes only in a directory of the agent's own (remove the link)", dir)
		}
		return fmt.Errorf("%s: %w (not a directory? remove it)", dir, err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("%s: %w", dir, err)
	}
	if int(st.Uid) != os.Geteuid() {
		return fmt.Errorf("%s is owned by uid %d, not by the agent's user (%d): its owner could replace the socket (remove the directory)", dir, st.Uid, os.Geteuid())
	}
	// Made by hand or an earlier version with a wider mode: ours.
	if err := unix.Fchmod(fd, 0o700); err != nil {
		return fmt.Errorf("%s: %w", dir, err)
	}
	return nil
}

// ownedDir tells whether dir is a real directory (no link) of this
// process's user: the only kind Listen serves in, and Prune cleans.
func ownedDir(dir string) bool {
	fi, err := os.Lstat(dir)
	if err != nil || !fi.IsDir() {
		return false
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	return ok && int(st.Uid) == os.Geteuid()
}

// Path is the socket's path.
func (s *Server) Path() string { return s.path }

// Close stops serving and removes the socket.
func (s *Server) Close() error {
	err := s.srv.Close()
	<-s.done
	os.Remove(s.path)
	return err
}

func (s *Server) serveStatus(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		// Read-only: nothing may be changed through this socket.
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "read-only: GET only", http.StatusMethodNotAllowed)
		return
	}
	if r.URL.RawQuery != "" {
		http.Error(w, "no query parameters", http.StatusBadRequest)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), requestTimeout)
	defer cancel()
	select {
	case s.one <- struct{}{}:
		defer func() { <-s.one }()
	case <-ctx.Done():
		http.Error(w, "busy", http.StatusServiceUnavailable)
		return
	}
	st := s.Status(ctx)
	b, err := json.Marshal(st)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	if r.Method == http.MethodHead {
		return
	}
	w.Write(b)
}

// Status is the answer to GET /v1/status.
func (s *Server) Status(ctx context.Context) Status {
	st := Status{Version: Version, Pods: []Pod{}, Certificates: []Certificate{}, TrustBundle: []CertRef{}}
	if s.src.Agent != nil {
		st.Agent = s.src.Agent()
	}
	if st.Agent.Now.IsZero() {
		st.Agent.Now = time.Now()
	}
	if s.src.Pods != nil {
		st.Pods = append(st.Pods, s.src.Pods(ctx)...)
	}
	if s.src.Certificates != nil {
		for _, c := range s.src.Certificates() {
			st.Certificates = append(st.Certificates, certificate(c))
		}
	}
	if s.src.Roots != nil {
		for _, c := range s.src.Roots() {
			st.TrustBundle = append(st.TrustBundle, certRef(c))
		}
	}
	notAfter := map[string]time.Time{}
	for _, c := range st.Certificates {
		notAfter[c.Identity] = c.NotAfter
	}
	for i := range st.Pods {
		p := &st.Pods[i]
		if p.IPs == nil {
			p.IPs = []netip.Addr{}
		}
		if p.Identity != "" && p.CertNotAfter.IsZero() {
			p.CertNotAfter = notAfter[p.Identity]
		}
		if p.Connections != nil {
			st.Connections.Pods.add(*p.Connections)
		}
	}
	slices.SortFunc(st.Pods, func(a, b Pod) int {
		if c := strings.Compare(a.Namespace, b.Namespace); c != 0 {
			return c
		}
		return strings.Compare(a.Name, b.Name)
	})
	if s.src.Connections != nil {
		st.Connections.Held, st.Connections.Budget = s.src.Connections()
	}
	return st
}

func certificate(c identity.CertState) Certificate {
	out := Certificate{Identity: c.Identity, Pods: c.Pods, NextFetch: c.NextFetch, Fetching: c.Fetching,
		Failures: c.Failures, LastError: c.LastError, LastFailure: c.LastFailure}
	if l := c.Leaf; l != nil {
		out.Serial = l.SerialNumber.Text(16)
		out.NotBefore, out.NotAfter = l.NotBefore.UTC(), l.NotAfter.UTC()
		out.Issuer = l.Issuer.String()
	}
	for _, ic := range c.Chain {
		out.Intermediates = append(out.Intermediates, certRef(ic))
	}
	return out
}

func certRef(c *x509.Certificate) CertRef {
	sum := sha256.Sum256(c.Raw)
	return CertRef{Subject: c.Subject.String(), SHA256: hex.EncodeToString(sum[:]),
		NotBefore: c.NotBefore.UTC(), NotAfter: c.NotAfter.UTC()}
}

// peerCheck accepts only root and this process's own user, whatever the
// socket's mode says: a second lock on the door, which a mode changed by
// hand (or a state directory shared with a less trusted container) would
// otherwise open.
type peerCheck struct {
	*net.UnixListener
	log *slog.Logger
}

func (l peerCheck) Accept() (net.Conn, error) {
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			return nil, err
		}
		uid, err := peerUID(c)
		if err == nil && (uid == 0 || uid == os.Geteuid()) {
			return c, nil
		}
		l.log.Warn("admin socket: connection refused", "uid", uid, "err", err)
		c.Close()
	}
}

func peerUID(c *net.UnixConn) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return -1, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := rc.Control(func(fd uintptr) { cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) }); err != nil {
		return -1, err
	}
	if cerr != nil {
		return -1, cerr
	}
	return int(cred.Uid), nil
}

// slogWriter carries net/http's own error lines (a malformed request) to
// the agent's log.
type slogWriter struct{ log *slog.Logger }

func (w slogWriter) Write(b []byte) (int, error) {
	w.log.Debug("admin socket", "msg", strings.TrimSpace(string(b)))
	return len(b), nil
}

// Prune removes the admin sockets of agents that are gone (a kill -9
// leaves its socket behind): live says whether an instance runs.
func Prune(stateDir string, live func(instance string) bool) {
	dir := filepath.Join(stateDir, SocketDir)
	if !ownedDir(dir) {
		return // not ours to clean (Listen says why)
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range ents {
		name, ok := strings.CutSuffix(e.Name(), ".sock")
		if ok && !live(name) {
			os.Remove(filepath.Join(dir, e.Name()))
		}
	}
}
