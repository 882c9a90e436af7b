package ca

import (
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// ServerConfig configures the HTTP handler of the CA.
type ServerConfig struct {
	Authority  *Authority
	Authorizer Authorizer
	// Limiter rate-limits per caller node; nil means no limit.
	Limiter *Limiter
	// DefaultTTL when the request names none (24h); MaxTTL caps requests
	// (default DefaultTTL); MinTTL refuses silly short ones (1s).
	DefaultTTL, MaxTTL, MinTTL time.Duration
	Logger                     *slog.Logger
	// Registerer receives the CA metrics; nil means none.
	Registerer prometheus.Registerer
}

// Server is the CA's HTTP handler (mount it on a TLS 1.3 server).
type Server struct {
	cfg      ServerConfig
	mux      *http.ServeMux
	issued   prometheus.Counter
	refused  *prometheus.CounterVec
	duration prometheus.Histogram
}

// DefaultTTL is the default workload certificate lifetime.
const DefaultTTL = 24 * time.Hour

// NewServer checks cfg and builds the handler.
func NewServer(cfg ServerConfig) (*Server, error) {
	if cfg.Authority == nil || cfg.Authorizer == nil {
		return nil, errors.New("ca: Authority and Authorizer are required")
	}
	if cfg.DefaultTTL <= 0 {
		cfg.DefaultTTL = DefaultTTL
	}
	if cfg.MaxTTL <= 0 {
		cfg.MaxTTL = cfg.DefaultTTL
	}
	if cfg.MinTTL <= 0 {
		cfg.MinTTL = time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	s := &Server{
		cfg: cfg,
		issued: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ambit_ca_certificates_issued_total", Help: "Workload certificates issued."}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ambit_ca_requests_refused_total", Help: "Certificate requests refused, by reason."}, []string{"reason"}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "ambit_ca_request_duration_seconds", Help: "Time to answer a certificate request.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14)}),
	}
	for _, r := range []Reason{ReasonBadRequest, ReasonUnauthenticated, ReasonNotAgent, ReasonNoNode, ReasonNotOnNode, ReasonRateLimited, ReasonInternal} {
		s.refused.WithLabelValues(string(r))
	}
	if cfg.Registerer != nil {
		for _, c := range []prometheus.Collector{s.issued, s.refused, s.duration} {
			if err := cfg.Registerer.Register(c); err != nil {
				return nil, err
			}
		}
	}
	s.mux = http.NewServeMux()
	s.mux.HandleFunc(PathCertificates, s.certificates)
	s.mux.HandleFunc(PathRoots, s.roots)
	s.mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ok\n") })
	return s, nil
}

// Refused returns the refusal counter of reason (for tests and status).
func (s *Server) Refused(reason Reason) prometheus.Counter {
	return s.refused.WithLabelValues(string(reason))
}

func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.mux.ServeHTTP(w, r) }

func (s *Server) roots(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet {
		writeJSON(w, http.StatusMethodNotAllowed, ErrorResponse{Error: "use GET", Reason: ReasonBadRequest})
		return
	}
	writeJSON(w, http.StatusOK, RootsResponse{Roots: string(s.cfg.Authority.RootsPEM())})
}

func (s *Server) certificates(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	defer func() { s.duration.Observe(time.Since(start).Seconds()) }()
	if r.Method != http.MethodPost {
		s.fail(w, r, Caller{}, "", refuse(http.StatusMethodNotAllowed, ReasonBadRequest, "use POST"))
		return
	}
	// Authenticate before reading the body: an anonymous caller costs a
	// header parse and one (cached) token review, nothing more.
	token, ok := bearer(r.Header.Get("Authorization"))
	if !ok {
		s.fail(w, r, Caller{}, "", refuse(http.StatusUnauthorized, ReasonUnauthenticated, "Authorization: Bearer <token> required"))
		return
	}
	caller, ref := s.cfg.Authorizer.Authenticate(r.Context(), token)
	if ref != nil {
		s.fail(w, r, caller, "", ref)
		return
	}
	if !s.cfg.Limiter.Allow(caller.Node) {
		w.Header().Set("Retry-After", "1")
		s.fail(w, r, caller, "", refuse(http.StatusTooManyRequests, ReasonRateLimited, "node %s over its request rate", caller.Node))
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, MaxRequestBytes))
	if err != nil {
		status := http.StatusBadRequest
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			status = http.StatusRequestEntityTooLarge
		}
		s.fail(w, r, caller, "", refuse(status, ReasonBadRequest, "reading body: %v", err))
		return
	}
	req, ttl, err := DecodeCertificateRequest(body)
	if err != nil {
		s.fail(w, r, caller, "", refuse(http.StatusBadRequest, ReasonBadRequest, "%v", err))
		return
	}
	csr, id, err := ParseCSR([]byte(req.CSR), s.cfg.Authority.TrustDomain())
	if err != nil {
		s.fail(w, r, caller, "", refuse(http.StatusBadRequest, ReasonBadRequest, "%v", err))
		return
	}
	if ref := s.cfg.Authorizer.Authorize(r.Context(), caller, id); ref != nil {
		s.fail(w, r, caller, id.String(), ref)
		return
	}
	switch {
	case ttl == 0:
		ttl = s.cfg.DefaultTTL
	case ttl > s.cfg.MaxTTL:
		ttl = s.cfg.MaxTTL
	case ttl < s.cfg.MinTTL:
		ttl = s.cfg.MinTTL
	}
	chain, roots, err := s.cfg.Authority.Sign(csr, id, ttl)
	if err != nil {
		s.fail(w, r, caller, id.String(), refuse(http.StatusInternalServerError, ReasonInternal, "%v", err))
		return
	}
	s.issued.Inc()
	s.cfg.Logger.Debug("certificate issued", "identity", id.String(), "node", caller.Node, "agent", caller.Name,
		"serial", chain[0].SerialNumber.Text(16), "notAfter", chain[0].NotAfter)
	writeJSON(w, http.StatusOK, CertificateResponse{Chain: string(EncodeCerts(chain)), Roots: string(roots)})
}

func (s *Server) fail(w http.ResponseWriter, r *http.Request, c Caller, id string, ref *Refusal) {
	s.refused.WithLabelValues(string(ref.Reason)).Inc()
	level := slog.LevelWarn
	if ref.Reason == ReasonRateLimited {
		level = slog.LevelInfo
	}
	s.cfg.Logger.Log(r.Context(), level, "certificate request refused", "reason", ref.Reason, "detail", ref.Msg,
		"node", c.Node, "agent", c.Name, "identity", id, "remote", r.RemoteAddr)
	writeJSON(w, ref.Status, ErrorResponse{Error: ref.Msg, Reason: ref.Reason})
}

func bearer(h string) (string, bool) {
	const p = "Bearer "
	if len(h) <= len(p) || !strings.EqualFold(h[:len(p)], p) {
		return "", false
	}
	t := strings.TrimSpace(h[len(p):])
	return t, t != ""
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}
