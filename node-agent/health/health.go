package health

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Server holds the readiness state and serves the endpoints.
type Server struct {
	gatherer prometheus.Gatherer

	mu       sync.Mutex
	notReady string // why not ready; "" = ready
	checks   map[string]func() error
}

// New returns a server that is alive but not ready ("starting").
func New(g prometheus.Gatherer) *Server {
	return &Server{gatherer: g, notReady: "starting", checks: map[string]func() error{}}
}

// SetReady marks the agent ready.
func (s *Server) SetReady() { s.SetNotReady("") }

// SetNotReady marks the agent not ready with a reason ("" = ready).
func (s *Server) SetNotReady(reason string) {
	s.mu.Lock()
	s.notReady = reason
	s.mu.Unlock()
}

// AddLiveness adds a check /healthz runs (e.g. "the reconcile loop turned
// in the last minute").
func (s *Server) AddLiveness(name string, fn func() error) {
	s.mu.Lock()
	s.checks[name] = fn
	s.mu.Unlock()
}

// Handler is the mux with all endpoints.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		var failed []string
		for name, fn := range s.checks {
			if err := fn(); err != nil {
				failed = append(failed, fmt.Sprintf("%s: %v", name, err))
			}
		}
		s.mu.Unlock()
		if len(failed) > 0 {
			http.Error(w, fmt.Sprint(failed), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		why := s.notReady
		s.mu.Unlock()
		if why != "" {
			http.Error(w, "not ready: "+why, http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	mux.Handle("/metrics", promhttp.HandlerFor(s.gatherer, promhttp.HandlerOpts{}))
	return mux
}

// Serve listens on addr until ctx ends. It returns once listening fails or
// the server stopped.
//
// The socket has SO_REUSEPORT: on the host network two agents share the
// port while a surge upgrade overlaps them; each answers for itself (the
// new pod's own readiness is gated by its exec startup probe). Only
// processes of the same user can join the group.
func (s *Server) Serve(ctx context.Context, addr string) error {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
		}); err != nil {
			return err
		}
		return serr
	}}
	l, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("health: %w", err)
	}
	return s.ServeListener(ctx, l)
}

// ServeListener is Serve on an open listener.
func (s *Server) ServeListener(ctx context.Context, l net.Listener) error {
	srv := &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second, WriteTimeout: 30 * time.Second}
	stop := context.AfterFunc(ctx, func() {
		c, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(c)
	})
	defer stop()
	if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("health: %w", err)
	}
	return nil
}
