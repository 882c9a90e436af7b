package ca

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// Config configures the CA service (`ambit-agent ca`).
type Config struct {
	// Listen is the HTTPS address (default ":15012").
	Listen string
	// MetricsListen serves /metrics, /healthz, /readyz over plain HTTP
	// (default ":15014"; "-" disables).
	MetricsListen string
	// TrustDomain of the mesh (default "cluster.local").
	TrustDomain string
	// Namespace, SecretName: where the signing key lives (default
	// ambit-system/ambit-ca). RootsConfigMap: where the trust bundle is
	// published for agents (default ambit-ca-root; "-" disables).
	Namespace, SecretName, RootsConfigMap string
	// AgentServiceAccount that may ask (default ambit-system/ambit-agent)
	// and the Audience of its token (default "ambit-ca").
	AgentServiceAccount, Audience string
	// DefaultTTL (24h) and MaxTTL (= DefaultTTL) of workload certificates.
	DefaultTTL, MaxTTL time.Duration
	// RateLimit per node in requests/s (default 50) and its Burst (default
	// 500, enough for a node starting 250 pods with room to retry).
	RateLimit float64
	RateBurst int
	// ServingNames are the DNS names of the CA's HTTPS certificate
	// (default ambit-ca, ambit-ca.<ns>, ambit-ca.<ns>.svc,
	// ambit-ca.<ns>.svc.cluster.local).
	ServingNames []string
	// ReloadInterval re-reads the Secret so a root rotation (new material
	// written into the Secret) takes effect without restart (default 1m).
	ReloadInterval time.Duration
	// Kubeconfig path; empty means in-cluster. Client, when set, is used
	// instead (tests).
	Kubeconfig string
	Client     kubernetes.Interface
	Logger     *slog.Logger
	Registerer prometheus.Registerer
	// Started, if set, is called with the HTTPS address once listening.
	Started func(addr net.Addr)
}

func (c *Config) defaults() {
	if c.Listen == "" {
		c.Listen = ":15012"
	}
	if c.MetricsListen == "" {
		c.MetricsListen = ":15014"
	}
	if c.TrustDomain == "" {
		c.TrustDomain = "cluster.local"
	}
	if c.Namespace == "" {
		c.Namespace = "ambit-system"
	}
	if c.SecretName == "" {
		c.SecretName = "ambit-ca"
	}
	if c.RootsConfigMap == "" {
		c.RootsConfigMap = "ambit-ca-root"
	}
	if c.AgentServiceAccount == "" {
		c.AgentServiceAccount = c.Namespace + "/ambit-agent"
	}
	if c.Audience == "" {
		c.Audience = DefaultAudience
	}
	if c.DefaultTTL <= 0 {
		c.DefaultTTL = DefaultTTL
	}
	if c.MaxTTL <= 0 {
		c.MaxTTL = c.DefaultTTL
	}
	if c.RateLimit == 0 {
		c.RateLimit = 50
	}
	if c.RateBurst == 0 {
		c.RateBurst = 500
	}
	if len(c.ServingNames) == 0 {
		c.ServingNames = []string{"ambit-ca", "ambit-ca." + c.Namespace, "ambit-ca." + c.Namespace + ".svc",
			"ambit-ca." + c.Namespace + ".svc.cluster.local"}
	}
	if c.ReloadInterval <= 0 {
		c.ReloadInterval = time.Minute
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// Run serves the CA until ctx ends: loads (or creates) the signing key from
// the Secret, publishes the trust bundle, watches pods for the node-bound
// rule, and serves HTTPS (TLS 1.3 only) with a serving certificate under
// its own root, renewed at half life.
func Run(ctx context.Context, cfg Config) error {
	cfg.defaults()
	log := cfg.Logger.With("component", "ca")
	client := cfg.Client
	if client == nil {
		rc, err := restConfig(cfg.Kubeconfig)
		if err != nil {
			return err
		}
		if client, err = kubernetes.NewForConfig(rc); err != nil {
			return err
		}
	}
	m, created, err := LoadOrCreateSecret(ctx, client, cfg.Namespace, cfg.SecretName, cfg.TrustDomain)
	if err != nil {
		return err
	}
	if created {
		log.Info("generated a new root CA", "secret", cfg.Namespace+"/"+cfg.SecretName, "subject", m.Cert.Subject.String())
	}
	auth, err := NewAuthority(cfg.TrustDomain, m)
	if err != nil {
		return err
	}
	publish := func() {
		if cfg.RootsConfigMap == "-" {
			return
		}
		if err := PublishRoots(ctx, client, cfg.Namespace, cfg.RootsConfigMap, auth.RootsPEM()); err != nil {
			log.Warn("publishing trust bundle", "configmap", cfg.RootsConfigMap, "err", err)
		}
	}
	publish()
	authz, err := NewKubeAuthorizer(KubeConfig{Client: client, Audience: cfg.Audience, AgentServiceAccount: cfg.AgentServiceAccount})
	if err != nil {
		return err
	}
	if err := authz.Start(ctx); err != nil {
		return err
	}
	reg := cfg.Registerer
	var gatherer prometheus.Gatherer = prometheus.DefaultGatherer
	if reg == nil {
		r := prometheus.NewRegistry()
		r.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
		reg, gatherer = r, r
	}
	srv, err := NewServer(ServerConfig{Authority: auth, Authorizer: authz, Limiter: NewLimiter(cfg.RateLimit, cfg.RateBurst),
		DefaultTTL: cfg.DefaultTTL, MaxTTL: cfg.MaxTTL, Logger: log, Registerer: reg})
	if err != nil {
		return err
	}
	sc := &servingCert{auth: auth, names: cfg.ServingNames}
	if _, err := sc.get(); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return err
	}
	hs := &http.Server{
		Handler:           srv,
		TLSConfig:         &tls.Config{MinVersion: tls.VersionTLS13, GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return sc.get() }},
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       5 * time.Minute,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}
	errc := make(chan error, 2)
	go func() { errc <- hs.ServeTLS(ln, "", "") }()
	var ms *http.Server
	if cfg.MetricsListen != "-" {
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(gatherer, promhttp.HandlerOpts{}))
		ok := func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) }
		mux.HandleFunc("/healthz", ok)
		mux.HandleFunc("/readyz", ok)
		ms = &http.Server{Addr: cfg.MetricsListen, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go func() {
			if err := ms.ListenAndServe(); !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("metrics listener: %w", err)
			}
		}()
	}
	log.Info("CA serving", "addr", ln.Addr().String(), "trustDomain", cfg.TrustDomain, "roots", len(m.Roots))
	if cfg.Started != nil {
		cfg.Started(ln.Addr())
	}
	tick := time.NewTicker(cfg.ReloadInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if ms != nil {
				_ = ms.Shutdown(sctx)
			}
			return hs.Shutdown(sctx)
		case err := <-errc:
			return err
		case <-tick.C:
			s, err := client.CoreV1().Secrets(cfg.Namespace).Get(ctx, cfg.SecretName, metav1.GetOptions{})
			if err != nil {
				log.Warn("re-reading CA secret", "err", err)
				continue
			}
			nm, err := MaterialFromSecret(s)
			if err != nil {
				log.Error("CA secret changed to something unusable; keeping the current key", "err", err)
				continue
			}
			// The intermediates count too: one renewed above an unchanged
			// signing certificate moves the chain's end, which cuts leaves.
			cur := auth.Material()
			if !nm.Cert.Equal(cur.Cert) || string(EncodeCerts(nm.Intermediates)) != string(EncodeCerts(cur.Intermediates)) ||
				string(EncodeCerts(nm.Roots)) != string(auth.RootsPEM()) {
				if err := auth.Update(nm); err != nil {
					log.Error("CA secret material refused", "err", err)
					continue
				}
				sc.reset()
				log.Info("CA material reloaded", "subject", nm.Cert.Subject.String(), "roots", len(nm.Roots))
			}
			publish()
		}
	}
}

// servingCert is the CA's HTTPS certificate, reissued at half life or when
// the signing material changes.
type servingCert struct {
	auth  *Authority
	names []string
	mu    sync.Mutex
	cert  *tls.Certificate
	renew time.Time
}

const servingTTL = 7 * 24 * time.Hour

func (s *servingCert) get() (*tls.Certificate, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cert != nil && time.Now().Before(s.renew) {
		return s.cert, nil
	}
	c, err := s.auth.ServingCertificate(s.names, nil, servingTTL)
	if err != nil {
		if s.cert != nil && time.Now().Before(s.cert.Leaf.NotAfter) {
			return s.cert, nil
		}
		return nil, err
	}
	s.cert, s.renew = c, time.Now().Add(time.Until(c.Leaf.NotAfter)/2)
	return c, nil
}

func (s *servingCert) reset() {
	s.mu.Lock()
	s.renew = time.Time{}
	s.mu.Unlock()
}

func restConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig == "" {
		rc, err := rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("ca: not in a cluster and no kubeconfig given: %w", err)
		}
		return rc, nil
	}
	return clientcmd.BuildConfigFromFlags("", kubeconfig)
}
