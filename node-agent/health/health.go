package health

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strings"
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

	mu         sync.Mutex
	notReady   string // why not ready; "" = ready
	checks     map[string]func() error
	heartbeats []*Heartbeat
	log        *slog.Logger
	// dumpDir, dumpPath: where the goroutine dumps of this node's
	// agents are kept, and this agent's (SetStallDump).
	dumpDir, dumpPath string
	// failing: the last /healthz failed (a stall episode); loggedAt:
	// when a failing /healthz was last logged; dumpedAt: when the
	// goroutines were last written.
	failing            bool
	loggedAt, dumpedAt time.Time
}

// New returns a server that is alive but not ready ("starting").
func New(g prometheus.Gatherer) *Server {
	return &Server{gatherer: g, notReady: "starting", checks: map[string]func() error{}}
}

// SetLogger logs failing liveness checks there: the kubelet shows only
// "HTTP probe failed with statuscode: 503" in the pod's events, never the
// answer's body, so the log (kubectl logs --previous after the restart)
// is where a person finds which loop stalled.
func (s *Server) SetLogger(l *slog.Logger) {
	s.mu.Lock()
	s.log = l
	s.mu.Unlock()
}

// SetStallDump makes the first failing /healthz of an episode write every
// goroutine's stack to dir/goroutines-at-stall-<instance>.txt (replacing
// what an earlier episode of this agent wrote), so what held the stalled
// loop survives the restart that follows; dir "" = off. Put dir on a
// volume that outlives the container.
//
// One file per agent (instance: its registry entry's name, unique on the
// node): during a surge upgrade two agents share dir, and one file for
// both let the later stall replace the earlier one's stacks. dir is
// usually the host's /var/run, a tmpfs (the node's memory): after each
// dump only the newest StallDumpsKept are kept, so an agent restarted
// again and again by its probe (a new instance each time) cannot fill it.
func (s *Server) SetStallDump(dir, instance string) {
	path := ""
	if dir != "" {
		path = filepath.Join(dir, stallDumpPrefix+fileSafe(instance)+stallDumpSuffix)
	}
	s.mu.Lock()
	s.dumpDir, s.dumpPath = dir, path
	s.mu.Unlock()
}

const (
	stallDumpPrefix = "goroutines-at-stall-"
	stallDumpSuffix = ".txt"
	tmpDumpPrefix   = ".goroutines-"
	// StallDumpsKept is how many goroutine dumps dir keeps: at most a
	// few MB each (fullDumpMax), and the newest say the most.
	StallDumpsKept = 4
	// staleTmpDump: a temporary dump this old was left by an agent
	// killed while it wrote (a dump takes seconds at most).
	staleTmpDump = time.Hour
)

// fileSafe keeps name usable as part of a file name ("/" and NUL cannot
// be, a leading dot would hide it); an empty name becomes the pid.
func fileSafe(name string) string {
	if name == "" {
		return fmt.Sprintf("pid%d", os.Getpid())
	}
	b := []byte(name)
	for i, c := range b {
		if c == '/' || c == 0 || c == '\\' || (i == 0 && c == '.') {
			b[i] = '_'
		}
	}
	return string(b)
}

// pruneStallDumps removes from dir all but the newest StallDumpsKept
// goroutine dumps (by modification time; errors ignored: another agent
// of the node may prune at the same time), and temporary ones left by a
// writer that died.
func pruneStallDumps(dir string) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	type dump struct {
		path string
		mod  time.Time
	}
	var dumps []dump
	for _, e := range ents {
		name := e.Name()
		tmp := strings.HasPrefix(name, tmpDumpPrefix)
		if !tmp && !(strings.HasPrefix(name, stallDumpPrefix) && strings.HasSuffix(name, stallDumpSuffix)) {
			continue
		}
		if !e.Type().IsRegular() {
			continue
		}
		fi, err := e.Info()
		if err != nil {
			continue
		}
		p := filepath.Join(dir, name)
		if tmp {
			if time.Since(fi.ModTime()) > staleTmpDump {
				os.Remove(p)
			}
			continue
		}
		dumps = append(dumps, dump{p, fi.ModTime()})
	}
	slices.SortFunc(dumps, func(a, b dump) int { return b.mod.Compare(a.mod) })
	for _, d := range dumps[min(len(dumps), StallDumpsKept):] {
		os.Remove(d.path)
	}
}

// AddHeartbeat adds h's check to /healthz, under h's name, and its turns
// to Collector's metrics.
func (s *Server) AddHeartbeat(h *Heartbeat) {
	s.AddLiveness(h.Name(), h.Check)
	s.mu.Lock()
	s.heartbeats = append(s.heartbeats, h)
	s.mu.Unlock()
}

// Heartbeats are those added, in order.
func (s *Server) Heartbeats() []*Heartbeat {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.heartbeats)
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
		failed, beats := s.live()
		if len(failed) > 0 {
			w.Header().Set("Content-Type", "text/plain; charset=utf-8")
			w.Header().Set("X-Content-Type-Options", "nosniff")
			w.WriteHeader(http.StatusServiceUnavailable)
			for _, f := range failed {
				fmt.Fprintln(w, f)
			}
			return
		}
		fmt.Fprintln(w, "ok")
		// What is watched, for a person with curl on the node.
		for _, h := range beats {
			if age, ok := h.Age(); ok {
				fmt.Fprintf(w, "%s: last turned %s ago\n", h.Name(), round(age))
			} else {
				fmt.Fprintf(w, "%s: not started\n", h.Name())
			}
		}
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

// live runs the liveness checks (outside the lock: a check must not hold
// up SetReady) and returns the failures, "name: why", sorted by name.
// The first failure of an episode writes the goroutine dump; failures
// are logged, at most every few seconds however often /healthz is asked.
func (s *Server) live() (failed []string, beats []*Heartbeat) {
	s.mu.Lock()
	checks := make(map[string]func() error, len(s.checks))
	for name, fn := range s.checks {
		checks[name] = fn
	}
	beats = slices.Clone(s.heartbeats)
	s.mu.Unlock()
	for name, fn := range checks {
		if err := fn(); err != nil {
			failed = append(failed, fmt.Sprintf("%s: %v", name, err))
		}
	}
	slices.Sort(failed)

	s.mu.Lock()
	if len(failed) == 0 {
		if s.failing && s.log != nil {
			s.log.Warn("liveness checks pass again")
		}
		s.failing = false
		s.mu.Unlock()
		return nil, beats
	}
	now := time.Now()
	first := !s.failing
	s.failing = true
	// Once per episode, and not more than every few minutes should
	// checks flap: a dump stops the world for a moment.
	dumpPath, dumpDir := "", s.dumpDir
	if first && s.dumpPath != "" && now.Sub(s.dumpedAt) >= dumpEvery {
		s.dumpedAt = now
		dumpPath = s.dumpPath
	}
	log := s.log
	logNow := log != nil && (first || now.Sub(s.loggedAt) >= logEvery)
	if logNow {
		s.loggedAt = now
	}
	// Unlocked from here: a dump takes a while, and /readyz, the
	// metrics and SetReady need the lock.
	s.mu.Unlock()
	var dumped string
	if dumpPath != "" {
		if err := writeGoroutines(dumpPath); err != nil {
			if log != nil {
				log.Warn("writing the goroutine dump of a stalled agent", "path", dumpPath, "err", err)
			}
		} else {
			dumped = dumpPath
			pruneStallDumps(dumpDir)
		}
	}
	if logNow {
		args := []any{"failing", strings.Join(failed, "; ")}
		if dumped != "" {
			args = append(args, "goroutines", dumped)
		}
		log.Error("liveness check failing: the kubelet restarts this agent after failureThreshold probes like this", args...)
	}
	return failed, beats
}

const (
	logEvery  = 5 * time.Second
	dumpEvery = 10 * time.Minute
)

// fullDumpMax: up to this many goroutines the dump is pprof's debug=2,
// each goroutine's stack with its state and how long it has waited;
// above, debug=1, identical stacks grouped with a count. debug=2 stops
// the world for the whole traceback and grows with every goroutine
// (measured here: 10,000 goroutines 7.9 MB, 0.4 s; 50,000 40 MB, 3.5 s,
// every goroutine, the node's data path among them, stopped for 1.2 s;
// cut at 64 MB), and a busy agent has two per proxied connection;
// debug=1 of 50,000 took 0.27 s and a few KB. A variable for tests.
var fullDumpMax = 10000

// writeGoroutines writes every goroutine's stack to path atomically:
// with how long each has waited, or grouped by stack on a busy agent
// (fullDumpMax).
func writeGoroutines(path string) error {
	f, err := os.CreateTemp(filepath.Dir(path), tmpDumpPrefix+"*")
	if err != nil {
		return err
	}
	n := runtime.NumGoroutine()
	debug := 2
	fmt.Fprintf(f, "ambit-agent goroutines at %s, when a liveness check first failed (pid %d)\n", time.Now().UTC().Format(time.RFC3339), os.Getpid())
	if n > fullDumpMax {
		debug = 1
		fmt.Fprintf(f, "%d goroutines, more than %d: grouped by stack, without wait times (the full dump would stop the agent for seconds)\n", n, fullDumpMax)
	}
	fmt.Fprintln(f)
	err = pprof.Lookup("goroutine").WriteTo(f, debug)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		os.Remove(f.Name())
	}
	return err
}

// Collector reports when each added heartbeat's loop last turned and
// whether each liveness check fails now, so a dashboard sees a stall before the
// kubelet acts on it.
func (s *Server) Collector() prometheus.Collector { return loopCollector{s} }

var (
	lastTurnDesc = prometheus.NewDesc("ambit_agent_loop_last_turn_timestamp_seconds",
		"When the agent's loop last turned (unix time; absent before its first turn). Alert on time() minus this.", []string{"loop"}, nil)
	stalledDesc = prometheus.NewDesc("ambit_agent_loop_stalled",
		"1 while the loop's liveness check (any check /healthz runs) fails (/healthz answers 503 and the kubelet restarts the agent after failureThreshold probes).", []string{"loop"}, nil)
)

type loopCollector struct{ s *Server }

func (c loopCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- lastTurnDesc
	ch <- stalledDesc
}

func (c loopCollector) Collect(ch chan<- prometheus.Metric) {
	for _, h := range c.s.Heartbeats() {
		if t := h.LastTurn(); !t.IsZero() {
			ch <- prometheus.MustNewConstMetric(lastTurnDesc, prometheus.GaugeValue, float64(t.UnixNano())/1e9, h.Name())
		}
	}
	c.s.mu.Lock()
	checks := make(map[string]func() error, len(c.s.checks))
	for name, fn := range c.s.checks {
		checks[name] = fn
	}
	c.s.mu.Unlock()
	for name, fn := range checks {
		v := 0.0
		if fn() != nil {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(stalledDesc, prometheus.GaugeValue, v, name)
	}
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
