package tunnel

import (
	"errors"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambit-mesh/ambit/tunnel/hbone"
)

// metrics of the data path. Labels stay at identity level (service
// accounts, a bounded set), never IPs or ports.
type metrics struct {
	opened, closed *prometheus.CounterVec // direction, mode, src_identity, dst_identity
	failed         *prometheus.CounterVec // direction, reason, src_identity, dst_identity
	sent, received *prometheus.CounterVec // direction, mode, src_identity, dst_identity
	active         *prometheus.GaugeVec   // direction
	poolConns      prometheus.Gauge
	lingering      prometheus.Gauge // HBONE sockets after a clean close (lingering.go)

	// The listeners under load (listen.go).
	acceptErrors      *prometheus.CounterVec // listener
	acceptPaused      *prometheus.CounterVec // listener
	pendingHandshakes prometheus.Gauge
	evicted           *prometheus.CounterVec // limit: pod|agent
	idleClosed        prometheus.Counter     // inbound HBONE, no stream for HBONEIdleTimeout
	plainFromMesh     *prometheus.CounterVec // src_identity, dst_identity

	cache sync.Map // seriesKey → *connSeries
}

func newMetrics(reg prometheus.Registerer) *metrics {
	l := []string{"direction", "mode", "src_identity", "dst_identity"}
	m := &metrics{
		opened: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ambit_tunnel_connections_opened_total",
			Help: "Connections established through the tunnel."}, l),
		closed: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ambit_tunnel_connections_closed_total",
			Help: "Tunnel connections that ended after being established."}, l),
		failed: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ambit_tunnel_connections_failed_total",
			Help: "Connections refused or failed before being established, by reason."},
			[]string{"direction", "reason", "src_identity", "dst_identity"}),
		sent: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ambit_tunnel_sent_bytes_total",
			Help: "Payload bytes from the local app into the tunnel."}, l),
		received: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ambit_tunnel_received_bytes_total",
			Help: "Payload bytes from the tunnel to the local app."}, l),
		active: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "ambit_tunnel_active_connections",
			Help: "Connections open now."}, []string{"direction"}),
		poolConns: prometheus.NewGauge(prometheus.GaugeOpts{Name: "ambit_tunnel_hbone_pool_connections",
			Help: "Pooled outbound HBONE (mTLS HTTP/2) connections."}),
		lingering: prometheus.NewGauge(prometheus.GaugeOpts{Name: "ambit_tunnel_lingering_connections",
			Help: "HBONE connections closed cleanly whose socket still lingers, reading and dropping what the peer still sends until its own end (1 s of a quiet link; up to 10 x PingTimeout while the peer keeps sending or a slow link drains), all pods. A pod's Close waits for its own within the drain timeout, its Abort cuts them."}),
		acceptErrors: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ambit_tunnel_accept_errors_total",
			Help: "Failed accepts (mostly the agent out of descriptors: EMFILE, ENFILE), each followed by a back-off of 5 ms doubling to 1 s."},
			[]string{"listener"}),
		acceptPaused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ambit_tunnel_accept_paused_total",
			Help: "Times a pod's listener stopped accepting because too many of its connections were not yet established (MaxPendingConns)."},
			[]string{"listener"}),
		pendingHandshakes: prometheus.NewGauge(prometheus.GaugeOpts{Name: "ambit_tunnel_pending_handshakes",
			Help: "Inbound HBONE connections in their TLS handshake, all pods."}),
		evicted: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ambit_tunnel_handshakes_evicted_total",
			Help: "Pending inbound handshakes closed to make room for a newer one, by the limit passed (pod or agent)."},
			[]string{"limit"}),
		idleClosed: prometheus.NewCounter(prometheus.CounterOpts{Name: "ambit_tunnel_hbone_idle_closed_total",
			Help: "Inbound HBONE connections closed (gracefully) by the agent after HBONEIdleTimeout with no stream open."}),
		plainFromMesh: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ambit_tunnel_plaintext_from_meshed_total",
			Help: "Plaintext connections on 15006 from the IP of a pod the directory knows as meshed, whatever the verdict: the source's capture was skipped (an app setting SO_MARK, which CAP_NET_RAW allows since Linux 5.17) or its agent did not take the destination for meshed."},
			[]string{"src_identity", "dst_identity"}),
	}
	if reg != nil {
		m.opened = register(reg, m.opened)
		m.closed = register(reg, m.closed)
		m.failed = register(reg, m.failed)
		m.sent = register(reg, m.sent)
		m.received = register(reg, m.received)
		m.active = register(reg, m.active)
		m.poolConns = register(reg, m.poolConns)
		m.lingering = register(reg, m.lingering)
		m.acceptErrors = register(reg, m.acceptErrors)
		m.acceptPaused = register(reg, m.acceptPaused)
		m.pendingHandshakes = register(reg, m.pendingHandshakes)
		m.evicted = register(reg, m.evicted)
		m.idleClosed = register(reg, m.idleClosed)
		m.plainFromMesh = register(reg, m.plainFromMesh)
		register(reg, prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "ambit_tunnel_buffered_bytes",
			Help: "Received bytes waiting for slow apps (bounded by flow-control windows)."},
			func() float64 { return float64(hbone.BufferedBytes()) }))
		// The probes count in hbone, process-wide, at no cost to a
		// stream's open; read at scrape time.
		register(reg, prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "ambit_tunnel_liveness_probes_total",
			Help: "PINGs sent because a stream opened on a pooled HBONE connection that had received nothing for a second or more."},
			func() float64 { return float64(hbone.LivenessProbes()) }))
		register(reg, prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "ambit_tunnel_peers_silent_total",
			Help: "Pooled HBONE connections a liveness probe found silent (no frame, not even the PING's answer, within the connect timeout): the peer's node down or unreachable. Their waiting streams fail as connect_timeout; the pool dials afresh."},
			func() float64 { return float64(hbone.PeersSilent()) }))
		registerClientWatch(reg, &watcher)
	}
	return m
}

// registerClientWatch exports a client watch's set (the process's:
// clientwatch.go), read at scrape time from its own counts, so the dials
// pay nothing here.
func registerClientWatch(reg prometheus.Registerer, cw *clientWatcher) {
	register(reg, prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "ambit_tunnel_client_watch_active",
		Help: "Clients watched now: accepted connections (15001, 15006) whose dial has run past 20 ms, each waiting in one epoll set for a reset or a FIN before any byte."},
		func() float64 { return float64(cw.active.Load()) }))
	register(reg, prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "ambit_tunnel_client_watch_started_total",
		Help: "Clients watched because their dial ran past 20 ms (slow dials: a black-holed destination, a NetworkPolicy on 15008)."},
		func() float64 { return float64(cw.started.Load()) }))
	register(reg, prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "ambit_tunnel_client_watch_gone_total",
		Help: "Watched clients found gone (reset, or FIN before any byte) during their dial, which was then cancelled."},
		func() float64 { return float64(cw.gone.Load()) }))
	register(reg, prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "ambit_tunnel_client_watch_unavailable_total",
		Help: "Slow dials whose client could not be watched (no epoll set: EMFILE; or the socket not added): they run to the connect timeout whatever the client does."},
		func() float64 { return float64(cw.unavailable.Load()) }))
}

// connSeries are one label set's connection counters, looked up once and
// kept: WithLabelValues hashes every label under a lock, and a
// connection used to do that six times.
type connSeries struct {
	opened, closed, sent, received prometheus.Counter
	active                         prometheus.Gauge
}

type seriesKey struct{ dir, mode, src, dst string }

// series returns the counters for a connection's labels. The cache holds
// one entry per label set, which the metrics themselves hold anyway.
func (m *metrics) series(dir, mode, src, dst string) *connSeries {
	k := seriesKey{dir, mode, orUnknown(src), orUnknown(dst)}
	if v, ok := m.cache.Load(k); ok {
		return v.(*connSeries)
	}
	cs := &connSeries{
		opened:   m.opened.WithLabelValues(k.dir, k.mode, k.src, k.dst),
		closed:   m.closed.WithLabelValues(k.dir, k.mode, k.src, k.dst),
		sent:     m.sent.WithLabelValues(k.dir, k.mode, k.src, k.dst),
		received: m.received.WithLabelValues(k.dir, k.mode, k.src, k.dst),
		active:   m.active.WithLabelValues(k.dir),
	}
	v, _ := m.cache.LoadOrStore(k, cs)
	return v.(*connSeries)
}

func orUnknown(s string) string {
	if s == "" {
		return "unknown"
	}
	return s
}

// register registers c, or returns the collector already registered
// under its name (several Proxies on one registry share their series).
func register[T prometheus.Collector](reg prometheus.Registerer, c T) T {
	if err := reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if ex, ok := are.ExistingCollector.(T); ok {
				return ex
			}
		}
	}
	return c
}
