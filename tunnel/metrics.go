package tunnel

import (
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambit-mesh/ambit/tunnel/hbone"
)

// metrics of the data path. Labels stay at identity level (service
// accounts, a bounded set), never IPs or ports.
type metrics struct {
	opened, closed *prometheus.CounterVec // direction, mode, src_identity, dst_identity
	failed         trackedVec             // direction, reason, src_identity, dst_identity
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
	plainFromMesh     trackedVec             // src_identity, dst_identity

	// cache holds the identity-labelled series in use, and drops those
	// idle for seriesIdle (shared by the metrics of one registry).
	cache *seriesCache
}

func newMetrics(reg prometheus.Registerer) *metrics {
	l := []string{"direction", "mode", "src_identity", "dst_identity"}
	m := &metrics{
		opened: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ambit_tunnel_connections_opened_total",
			Help: "Connections established through the tunnel."}, l),
		closed: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ambit_tunnel_connections_closed_total",
			Help: "Tunnel connections that ended after being established."}, l),
		failed: trackedVec{CounterVec: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ambit_tunnel_connections_failed_total",
			Help: "Connections refused or failed before being established, by reason."},
			[]string{"direction", "reason", "src_identity", "dst_identity"})},
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
		plainFromMesh: trackedVec{CounterVec: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ambit_tunnel_plaintext_from_meshed_total",
			Help: "Plaintext connections on 15006 from the IP of a pod the directory knows as meshed, whatever the verdict: the source's capture was skipped (an app setting SO_MARK, which CAP_NET_RAW allows since Linux 5.17) or its agent did not take the destination for meshed."},
			[]string{"src_identity", "dst_identity"})},
	}
	if reg != nil {
		m.opened = register(reg, m.opened)
		m.closed = register(reg, m.closed)
		m.failed.CounterVec = register(reg, m.failed.CounterVec)
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
		m.plainFromMesh.CounterVec = register(reg, m.plainFromMesh.CounterVec)
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
	m.cache = cacheFor(m, reg != nil)
	m.failed.cache, m.plainFromMesh.cache = m.cache, m.cache
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
	last                           atomic.Int64 // monoNanos of its last use
	evicted                        bool         // dropped by a sweep (under the cache's mu)
}

type seriesKey struct{ dir, mode, src, dst string }

// Series labelled by identity (source and destination service
// accounts) would otherwise live as long as the agent: every pair of
// identities that ever talked through it, deleted namespaces and service
// accounts included, so a cluster that keeps creating namespaces (CI,
// preview environments) grew the agent's memory and every scrape for
// good. A label set none of whose counters moved for seriesIdle is
// dropped. Prometheus reads a dropped counter that comes back, from 0,
// as a counter reset, so rate() and increase() stay right; the scrapes
// in between see the series stale, which is what it is.
var seriesIdle = time.Hour

// sweepEvery bounds how often a new label set makes the cache look for
// idle ones: only a new label set sweeps, so a fixed set of pairs costs
// nothing, and the set can only grow while new ones come.
const sweepEvery = 5 * time.Minute

// seriesCache holds the identity-labelled series in use: the connection
// counters (series) and the others (trackedVec: failures, plaintext from
// meshed pods) with when each was last used. Using one takes mu for
// reading and stamps it; a sweep takes mu for writing, so it never drops
// a series between its stamp and its use. Metrics on one registry share
// their vectors (register), so they share this too: one Proxy's sweep
// would otherwise leave another's cached counters detached.
type seriesCache struct {
	mu        sync.RWMutex
	conns     map[seriesKey]*connSeries
	other     map[otherKey]*atomic.Int64
	lastSweep int64
	m         *metrics
	now       func() int64 // monoNanos of now; a test's clock
}

type otherKey struct {
	vec    *prometheus.CounterVec
	labels string // the label values, NUL-separated
}

var (
	cachesMu sync.Mutex
	caches   = map[*prometheus.CounterVec]*seriesCache{} // by m.opened
)

// cacheFor returns the cache of m's vectors: shared with the metrics
// registered before on the same registry, m's own without one.
func cacheFor(m *metrics, shared bool) *seriesCache {
	newCache := func() *seriesCache {
		c := &seriesCache{conns: map[seriesKey]*connSeries{}, other: map[otherKey]*atomic.Int64{}, m: m,
			now: func() int64 { return monoNanos(time.Now()) }}
		c.lastSweep = c.now()
		return c
	}
	if !shared {
		return newCache()
	}
	cachesMu.Lock()
	defer cachesMu.Unlock()
	if c := caches[m.opened]; c != nil {
		return c
	}
	c := newCache()
	caches[m.opened] = c
	return c
}

// series returns the counters for a connection's labels, stamped used.
func (m *metrics) series(dir, mode, src, dst string) *connSeries {
	return m.cache.series(seriesKey{dir, mode, orUnknown(src), orUnknown(dst)})
}

func (c *seriesCache) series(k seriesKey) *connSeries {
	now := c.now()
	c.mu.RLock()
	if cs := c.conns[k]; cs != nil {
		cs.last.Store(now)
		c.mu.RUnlock()
		return cs
	}
	c.mu.RUnlock()
	c.mu.Lock()
	defer c.mu.Unlock()
	if cs := c.conns[k]; cs != nil {
		cs.last.Store(now)
		return cs
	}
	c.sweepLocked(now)
	m := c.m
	cs := &connSeries{
		opened:   m.opened.WithLabelValues(k.dir, k.mode, k.src, k.dst),
		closed:   m.closed.WithLabelValues(k.dir, k.mode, k.src, k.dst),
		sent:     m.sent.WithLabelValues(k.dir, k.mode, k.src, k.dst),
		received: m.received.WithLabelValues(k.dir, k.mode, k.src, k.dst),
		active:   m.active.WithLabelValues(k.dir),
	}
	cs.last.Store(now)
	c.conns[k] = cs
	return cs
}

// ending returns the counters a connection's end goes to: cs, the
// series its start took, stamped used, or, if a sweep dropped it while
// the connection lived (open longer than seriesIdle with no other
// connection of its labels), the series again.
func (m *metrics) ending(cs *connSeries, dir, mode, src, dst string) *connSeries {
	c := m.cache
	if cs != nil {
		c.mu.RLock()
		if !cs.evicted {
			cs.last.Store(c.now())
			c.mu.RUnlock()
			return cs
		}
		c.mu.RUnlock()
	}
	return m.series(dir, mode, src, dst)
}

// trackedVec is a counter vector whose label sets the cache drops when
// idle, as the connection series.
type trackedVec struct {
	*prometheus.CounterVec
	cache *seriesCache
}

// WithLabelValues stamps the label set used and returns its counter.
func (v trackedVec) WithLabelValues(lvs ...string) prometheus.Counter {
	c := v.cache
	k := otherKey{v.CounterVec, strings.Join(lvs, "\x00")}
	now := c.now()
	c.mu.RLock()
	if last := c.other[k]; last != nil {
		last.Store(now)
		ctr := v.CounterVec.WithLabelValues(lvs...)
		c.mu.RUnlock()
		return ctr
	}
	c.mu.RUnlock()
	c.mu.Lock()
	defer c.mu.Unlock()
	if last := c.other[k]; last != nil {
		last.Store(now)
	} else {
		c.sweepLocked(now)
		last = new(atomic.Int64)
		last.Store(now)
		c.other[k] = last
	}
	return v.CounterVec.WithLabelValues(lvs...)
}

// sweepLocked drops the label sets idle for seriesIdle, at most once
// per sweepEvery. c.mu is held for writing.
func (c *seriesCache) sweepLocked(now int64) {
	if now-c.lastSweep < int64(sweepEvery) {
		return
	}
	c.lastSweep = now
	idle := int64(seriesIdle)
	m := c.m
	for k, cs := range c.conns {
		if now-cs.last.Load() <= idle {
			continue
		}
		cs.evicted = true
		delete(c.conns, k)
		for _, v := range []*prometheus.CounterVec{m.opened, m.closed, m.sent, m.received} {
			v.DeleteLabelValues(k.dir, k.mode, k.src, k.dst)
		}
	}
	for k, last := range c.other {
		if now-last.Load() > idle {
			delete(c.other, k)
			k.vec.DeleteLabelValues(strings.Split(k.labels, "\x00")...)
		}
	}
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
