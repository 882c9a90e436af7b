package tunnel

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambit-mesh/ambit/tunnel/balance"
	"github.com/ambit-mesh/ambit/tunnel/hbone"
)

// Config wires a Proxy to its surroundings.
type Config struct {
	Directory    Directory
	Certificates Certificates
	// Authorizer decides inbound connections; nil allows everything
	// (HBONE peers are still authenticated).
	Authorizer Authorizer
	Logger     *slog.Logger
	// Registerer receives the tunnel's metrics; nil means none.
	Registerer prometheus.Registerer

	// HBONEPort is where destination pods terminate HBONE (default 15008).
	HBONEPort uint16
	// AgentPorts are the agent's own ports in every pod; connections
	// aimed at them (self-calls, loops) are refused. Default 15001,
	// 15006, 15008.
	AgentPorts []uint16
	// HBONE tunes the HTTP/2 layer: windows (4 MiB stream / 16 MiB
	// connection), frame sizes, streams per pooled connection (100),
	// keepalive (PING after 10 s idle, closed 20 s without answer).
	HBONE hbone.Config
	// PoolIdleTimeout closes pooled connections without streams for this
	// long (default 5 min).
	PoolIdleTimeout time.Duration
	// ConnectTimeout bounds a TCP connect plus TLS handshake (default
	// 10 s).
	ConnectTimeout time.Duration
	// HandshakeTimeout bounds an inbound HBONE connection's TLS
	// handshake, before which its peer is not authenticated (default
	// 10 s, the clients' connect timeout). The HTTP/2 preface after it is
	// bounded inside hbone.
	HandshakeTimeout time.Duration
	// MaxPendingHandshakes is a pod's share of inbound HBONE connections
	// still in their handshake (default 256): past it, a new connection
	// closes the pod's pending ones that make no progress (no byte from
	// the peer after 100 ms, or pending 1 s and waiting on the peer),
	// and is admitted anyway when none qualifies, so a herd of real
	// clients is not cut.
	// MaxPendingHandshakesTotal is the agent's hard cap, all pods
	// together (default 4096): past it the oldest of those goes, else the
	// oldest pending one. Evictions are counted in
	// ambit_tunnel_handshakes_evicted_total.
	MaxPendingHandshakes      int
	MaxPendingHandshakesTotal int
	// HBONEIdleTimeout closes an inbound HBONE connection (15008) that
	// has had no stream open for this long, gracefully: GOAWAY in two
	// steps, as for a drain, so a stream the client sends meanwhile is
	// served. Default 15 min, three times the clients' own idle eviction
	// (PoolIdleTimeout here, ztunnel's POOL_UNUSED_RELEASE_TIMEOUT, both
	// 5 min), so a normal client always closes first; negative: never.
	// Without it a peer that keeps connections and never uses them
	// (a leak, or on purpose) holds each for ever.
	HBONEIdleTimeout time.Duration
	// MaxPendingConns bounds, per pod and per listener (15001, 15006),
	// the connections accepted whose other side is still being reached
	// (default 1024); past it the listener stops accepting until one is
	// established or fails, and new connections wait in the kernel's
	// accept queue.
	MaxPendingConns int
	// MaxConnections is the agent's budget of proxied connections, all
	// pods together (outbound counted against the source pod, inbound
	// HBONE streams and plaintext against the destination pod, from
	// accept to close). Below 3/4 of it nothing is refused, however
	// many one pod holds; at or past 3/4, a pod holding the water level
	// or more is refused (the max-min fair level of the pods' counts
	// for 7/8 of the budget: the biggest holders first), and a pod below
	// it gets in unless the agent holds the whole budget, a hard bound
	// (docs/tunnel.md "Connection share"). Refused: a reset on 15001
	// and 15006, a 503 on an HBONE stream, counted with reason
	// over_share. 0: DefaultMaxConnections (from the memory limit and
	// RLIMIT_NOFILE); negative: no budget (counted, never refused).
	MaxConnections int
	// NoOriginalSource makes inbound connections to the app come from the
	// pod's own address instead of the client's (only for pods without
	// the in-pod reply routing).
	NoOriginalSource bool
}

// Proxy serves any number of pods.
type Proxy struct {
	cfg            Config
	log            *slog.Logger
	m              *metrics
	hcfg           hbone.Config
	connectTimeout time.Duration
	poolIdle       time.Duration
	hbonePort      uint16
	agentPorts     map[uint16]bool
	hsTimeout      time.Duration
	maxPending     int
	idleTimeout    time.Duration // inbound HBONE; 0: never

	// hs are the agent's pending inbound handshakes; hsLog and pauseLog
	// limit the lines anyone can make the agent write.
	hs       *handshakes
	hsLog    logLimiter
	pauseLog logLimiter
	plainLog logLimiter // plaintext from a meshed pod (conns.go)

	// services resolves Service addresses (the Directory itself, or
	// endpointsOnly around one without ServiceByAddr); affinity holds
	// the ClientIP session affinity of every pod served.
	services ServiceDirectory
	affinity *balance.Table

	// share is the connection budget and its count (share.go).
	share connShare

	mu       sync.Mutex
	live     map[*liveConn]struct{} // inbound connections, for Reauthorize
	servings map[*Serving]struct{}  // pods served, for the share's water level and metrics
	draining map[*Serving]struct{}  // pods closed, until Close returns: what they hold counts against them
}

// endpointsOnly is a Directory without ServiceByAddr: no Service has
// affinity.
type endpointsOnly struct{ Directory }

func (d endpointsOnly) ServiceByAddr(vip netip.AddrPort) (Service, bool) {
	eps, ok := d.ServiceEndpoints(vip)
	return Service{Endpoints: eps}, ok
}

// liveConn is an established inbound connection Reauthorize may cut.
type liveConn struct {
	info ConnInfo
	rec  *record
	kill func()
	sv   *Serving // the destination pod: its labels now, not at setup
}

// current is lc's ConnInfo with the destination's labels of now: a pod
// relabelled since the connection was set up is judged as it is.
func (lc *liveConn) current() ConnInfo {
	info := lc.info
	if lc.sv != nil {
		info.Dst.Labels = lc.sv.Labels()
	}
	return info
}

// New validates cfg and returns a Proxy.
func New(cfg Config) (*Proxy, error) {
	if cfg.Directory == nil || cfg.Certificates == nil {
		return nil, errors.New("tunnel: Directory and Certificates are required")
	}
	p := &Proxy{
		cfg:            cfg,
		log:            cfg.Logger,
		hcfg:           cfg.HBONE,
		connectTimeout: cfg.ConnectTimeout,
		poolIdle:       cfg.PoolIdleTimeout,
		hbonePort:      cfg.HBONEPort,
		agentPorts:     map[uint16]bool{},
		live:           map[*liveConn]struct{}{},
		servings:       map[*Serving]struct{}{},
		draining:       map[*Serving]struct{}{},
		affinity:       balance.NewTable(0),
	}
	if sd, ok := cfg.Directory.(ServiceDirectory); ok {
		p.services = sd
	} else {
		p.services = endpointsOnly{cfg.Directory}
	}
	if p.log == nil {
		p.log = slog.Default()
	}
	if p.hcfg.MaxStreamsPerConn == 0 {
		p.hcfg.MaxStreamsPerConn = 100
	}
	if p.connectTimeout <= 0 {
		p.connectTimeout = 10 * time.Second
	}
	if p.poolIdle <= 0 {
		p.poolIdle = 5 * time.Minute
	}
	if p.hbonePort == 0 {
		p.hbonePort = 15008
	}
	ports := cfg.AgentPorts
	if len(ports) == 0 {
		ports = []uint16{15001, 15006, p.hbonePort}
	}
	for _, pt := range ports {
		p.agentPorts[pt] = true
	}
	p.hsTimeout = cfg.HandshakeTimeout
	if p.hsTimeout <= 0 {
		p.hsTimeout = 10 * time.Second
	}
	switch p.idleTimeout = cfg.HBONEIdleTimeout; {
	case p.idleTimeout == 0:
		p.idleTimeout = 15 * time.Minute
	case p.idleTimeout < 0:
		p.idleTimeout = 0
	}
	p.maxPending = cfg.MaxPendingConns
	if p.maxPending <= 0 {
		p.maxPending = 1024
	}
	p.m = newMetrics(cfg.Registerer)
	p.hs = &handshakes{m: p.m, podMax: cfg.MaxPendingHandshakes, total: cfg.MaxPendingHandshakesTotal,
		now: time.Now}
	if p.hs.podMax <= 0 {
		p.hs.podMax = 256
	}
	if p.hs.total <= 0 {
		p.hs.total = 4096
	}
	// Whose turn a pending handshake is in (listen.go, owed).
	p.hcfg.HandshakeReads = p.hs.reads
	p.hcfg.OnPanic = p.hbonePanicked
	p.hsLog.perSecond, p.pauseLog.perSecond, p.plainLog.perSecond = 10, 1, 1
	switch budget := cfg.MaxConnections; {
	case budget > 0:
		p.share.init(int64(budget), "maxConnections")
	case budget < 0:
		p.share.init(0, "maxConnections (negative: none)")
	default:
		n, from := DefaultMaxConnections()
		p.share.init(int64(n), from)
	}
	p.log.Info("connection budget", "budget", p.share.budget, "refused_from", p.share.thresh, "level_capacity", p.share.capacity, "from", p.share.from, "setting", "maxConnections")
	if cfg.Registerer != nil {
		register(cfg.Registerer, prometheus.Collector(newShareCollector(p)))
	}
	return p, nil
}

// Serving is one pod being served.
type Serving struct {
	p      *Proxy
	pod    Pod
	ownIPs map[netip.Addr]bool
	// appPorts: the pod's app ports seen so far, which plaintext
	// deliveries never take as their source port.
	appPorts appPorts
	pool     *pool
	baggage  string
	log      *slog.Logger

	mu      sync.Mutex
	closing bool
	// aborted: Abort ran, so everything was cut and nothing waits on a
	// peer; a Close after it waits for the handlers to end, as Close's
	// own cut does.
	aborted bool
	// closeCtx is Close's context: an HBONE connection whose handshake
	// ends after Close began goes away within the same deadline.
	closeCtx context.Context
	active   int           // connections and streams being handled
	quiet    chan struct{} // kicked (never blocks) when, closing, nothing is left
	closers  map[*tracked]struct{}
	// cutting: Close's deadline passed and it cut what was live; a
	// connection that starts relaying later (it was still dialling) is
	// cut as it registers, or Close would wait for it with no deadline.
	cutting bool
	hconns  map[*hbone.Conn]struct{}
	// raws are the TCP sockets of the inbound HBONE connections being
	// served (handshake included), for Abort's reset: hbone keeps them
	// behind its own layers.
	raws     map[*net.TCPConn]struct{}
	loops    sync.WaitGroup
	stopOnce sync.Once
	// stop is closed when Close begins: accept loops waiting (back-off,
	// no free slot) end their wait.
	stop chan struct{}
	// handshakes are the pod's pending inbound HBONE handshakes, oldest
	// first (guarded by p.hs.mu).
	handshakes list.List

	// labels are the pod's labels now (SetLabels); pod.Workload.Labels
	// are those it was served with.
	labels atomic.Pointer[map[string]string]

	// conns are the pod's proxied connections now (share.go); peers
	// what the pod's other Servings held at the last water level;
	// refusedAt its last refusal (connShare.now; 0: none), for the
	// metrics; shedLog bounds the lines its refusals write.
	conns     atomic.Int64
	key       string // namespace/name: a pod served twice is one pod
	peers     atomic.Int64
	refusedAt atomic.Int64
	shedLog   logLimiter
}

// Labels returns the pod's current labels (read-only).
func (sv *Serving) Labels() map[string]string { return *sv.labels.Load() }

// SetLabels records that the pod's labels changed: policy selectors see
// the new ones from now on, for new connections and, at once, for the
// pod's live ones, which are closed if no longer allowed (a DENY that
// now selects the pod). Equal labels change nothing.
func (sv *Serving) SetLabels(labels map[string]string) {
	if maps.Equal(labels, sv.Labels()) {
		return
	}
	l := maps.Clone(labels)
	sv.labels.Store(&l)
	sv.p.reauthorize(func(lc *liveConn) bool { return lc.sv == sv })
}

// workload is the pod's Workload with its current labels.
func (sv *Serving) workload() Workload {
	w := sv.pod.Workload
	w.Labels = sv.Labels()
	return w
}

// Serve starts accepting on pod's listeners. A nil listener leaves that
// function off (a pod may, say, only be a client). Serve takes ownership
// of the listeners: Close closes them.
func (p *Proxy) Serve(pod Pod) (*Serving, error) {
	w := pod.Workload
	if pod.Net == nil {
		return nil, errors.New("tunnel: Pod.Net is required")
	}
	if len(w.IPs) == 0 {
		return nil, fmt.Errorf("tunnel: pod %s/%s has no IP", w.Namespace, w.Name)
	}
	if (pod.HBONE != nil || pod.Outbound != nil) && w.Identity == "" {
		return nil, fmt.Errorf("tunnel: pod %s/%s has no identity", w.Namespace, w.Name)
	}
	sv := &Serving{
		p:       p,
		pod:     pod,
		ownIPs:  map[netip.Addr]bool{},
		closers: map[*tracked]struct{}{},
		hconns:  map[*hbone.Conn]struct{}{},
		raws:    map[*net.TCPConn]struct{}{},
		quiet:   make(chan struct{}, 1),
		stop:    make(chan struct{}),
		log:     p.log.With("pod", w.Namespace+"/"+w.Name),
		baggage: fmt.Sprintf("k8s.namespace.name=%s,k8s.pod.name=%s", w.Namespace, w.Name),
		key:     w.Namespace + "/" + w.Name,
	}
	for _, ip := range w.IPs {
		sv.ownIPs[ip.Unmap()] = true
	}
	labels := maps.Clone(w.Labels)
	sv.labels.Store(&labels)
	sv.pool = newPool(p, pod.Net)
	sv.shedLog.perSecond = 1
	p.mu.Lock()
	p.servings[sv] = struct{}{}
	p.mu.Unlock()
	for _, l := range []struct {
		ln    net.Listener
		name  string
		slots chan struct{}
		fn    func(*net.TCPConn, chan struct{})
	}{
		{pod.Outbound, lnOutbound, make(chan struct{}, p.maxPending), sv.outbound},
		{pod.Inbound, lnInbound, make(chan struct{}, p.maxPending), sv.inboundPlain},
		// 15008 bounds its handshakes otherwise (handshakes): past the
		// handshake a connection is a mesh peer's.
		{pod.HBONE, lnHBONE, nil, func(c *net.TCPConn, _ chan struct{}) {
			if testHBONEAccepted != nil {
				testHBONEAccepted()
			}
			sv.mu.Lock()
			sv.raws[c] = struct{}{}
			sv.mu.Unlock()
			defer func() {
				sv.mu.Lock()
				delete(sv.raws, c)
				sv.mu.Unlock()
			}()
			sv.inboundHBONE(c)
		}},
	} {
		if l.ln == nil {
			continue
		}
		sv.loops.Add(1)
		go sv.acceptLoop(l.ln, l.name, l.slots, l.fn)
	}
	return sv, nil
}

// testHBONEAccepted, when set (by a test), runs first in the handler of
// a connection the pod's 15008 accepted: the window in which Abort may
// run before the handler registers it.
var testHBONEAccepted func()

// recoverConn keeps one connection's bug from taking the agent (and
// every other pod's traffic) down: it is logged, counted
// (failed_total{reason="internal_error"}) and the connection reset.
// Deferred first in each handler, with the connection's record r, so the
// count has its direction and identities, the line its addresses, and
// settlePanicked puts the rest of the books straight (the gauge, the
// close, the live entry); r is nil outside a record (the accept loop's,
// the HBONE stream handler's: a second line of defence there).
func (sv *Serving) recoverConn(r *record, cleanup func()) {
	v := recover()
	if v == nil {
		return
	}
	if r == nil {
		sv.p.m.failed.WithLabelValues("unknown", "internal_error", "unknown", "unknown").Inc()
		sv.log.Error("connection handler panicked", "panic", fmt.Sprint(v), "stack", string(debug.Stack()))
		cleanup()
		return
	}
	sv.p.m.failed.WithLabelValues(r.dir, "internal_error", orUnknown(r.srcID), orUnknown(r.dstID)).Inc()
	sv.log.Error("connection handler panicked", append(sv.logAttrs(r), "panic", fmt.Sprint(v), "stack", string(debug.Stack()))...)
	cleanup()
	sv.settlePanicked(r, v)
}

// enter counts a connection or stream being handled. It never refuses:
// what reaches it was accepted by one of the pod's listeners before it
// closed, or by an HBONE connection before its last GOAWAY, and the
// client has no way to know it must go elsewhere; a draining pod serves
// it. (Refusing those with 503 while draining undid the two-step
// GOAWAY: a stream sent just before the first GOAWAY was refused, and
// e2e/kube's rolling update showed it as a reset.)
func (sv *Serving) enter() {
	sv.mu.Lock()
	sv.active++
	sv.mu.Unlock()
}

func (sv *Serving) leave() {
	sv.mu.Lock()
	sv.active--
	sv.kickLocked()
	sv.mu.Unlock()
}

// kickLocked tells Close, if it waits, that nothing may be left.
func (sv *Serving) kickLocked() {
	if sv.closing && sv.active == 0 && len(sv.hconns) == 0 {
		select {
		case sv.quiet <- struct{}{}:
		default:
		}
	}
}

// waitQuiet waits until no connection or stream is being handled and
// every inbound HBONE connection has ended, or ctx ends (false).
func (sv *Serving) waitQuiet(ctx context.Context) bool {
	for {
		sv.mu.Lock()
		done := sv.active == 0 && len(sv.hconns) == 0
		sv.mu.Unlock()
		if done {
			// Passed on: a kick wakes one waiter, and Close and Abort
			// may both wait (a drain cut by the pod's DEL). A token
			// left for no one only makes a later wait look again.
			select {
			case sv.quiet <- struct{}{}:
			default:
			}
			return true
		}
		select {
		case <-sv.quiet:
		case <-ctx.Done():
			return false
		}
	}
}

// tracked is a live connection Close may have to cut.
type tracked struct{ cut func() }

func (sv *Serving) track(cut func()) *tracked {
	t := &tracked{cut}
	sv.mu.Lock()
	late := sv.cutting
	if !late {
		sv.closers[t] = struct{}{}
	}
	sv.mu.Unlock()
	if late {
		cut()
	}
	return t
}

func (sv *Serving) untrack(c *tracked) {
	sv.mu.Lock()
	delete(sv.closers, c)
	sv.mu.Unlock()
}

// toDraining moves the Serving from the proxy's servings to its
// draining ones, where what it still holds counts against the pod in
// the water level; the func it returns takes it out (when Close or
// Abort returns).
func (s *Serving) toDraining() (done func()) {
	s.p.mu.Lock()
	delete(s.p.servings, s)
	s.p.draining[s] = struct{}{}
	s.p.mu.Unlock()
	return func() {
		s.p.mu.Lock()
		delete(s.p.draining, s)
		s.p.mu.Unlock()
	}
}

// closeListeners stops the pod's accepts.
func (s *Serving) closeListeners() {
	for _, ln := range []net.Listener{s.pod.Outbound, s.pod.Inbound, s.pod.HBONE} {
		if ln != nil {
			ln.Close()
		}
	}
}

// CloseIdleOutbound shuts down the pod's pooled outbound HBONE
// connections that carry no stream now, waiting up to ctx for them to
// close; one on which a stream opened meanwhile closes when it ends.
// Close closes the pool only once the pod is drained, and a pod still
// draining an inbound connection when its network went (a CNI DEL, until
// session 20) then had no interface left for its idle connections'
// close_notify and FIN. Their peers never learned: a server does not
// ping, so each kept its end (goroutines, a socket, ~90 KiB) until its
// HBONEIdleTimeout, 15 min (TestChurnLeavesNoResidue). A DEL now calls
// Abort, which ends every connection; the agent calls this before the
// drains it keeps (an unenrollment), whose network stays. Connections
// with streams are left to Close.
func (s *Serving) CloseIdleOutbound(ctx context.Context) { s.pool.shutdownIdle(ctx) }

// Close stops accepting (closes the pod's listeners, sends GOAWAY on
// inbound HBONE connections), lets established connections finish until
// ctx ends, then cuts what remains. The sockets of the pod's HBONE
// connections closed cleanly, now or before, linger a while reading what
// their peers still send (hbone's Gone): Close waits for them too
// within ctx, and cuts those left past it. It returns ctx's error if it
// had to cut. After Abort it only waits for what Abort cut to be done.
func (s *Serving) Close(ctx context.Context) error {
	s.mu.Lock()
	if s.closing {
		aborted := s.aborted
		s.mu.Unlock()
		if aborted {
			// Abort's own wait is bounded (the agent answers a DEL
			// after it): the caller closes the pod's network once
			// Close returns, which no handler may still be using,
			// nor socket (what Abort reset closes at once).
			s.waitQuiet(context.Background())
			s.pool.socks.wait(context.Background())
		}
		return nil
	}
	s.closing = true
	s.closeCtx = ctx
	close(s.stop)
	hconns := make([]*hbone.Conn, 0, len(s.hconns))
	for c := range s.hconns {
		hconns = append(hconns, c)
	}
	s.mu.Unlock()
	// The pod stops taking new connections; what it still holds counts
	// against it in the water level until Close returns (a re-enrolled
	// pod's new Serving is counted with it).
	defer s.toDraining()()
	s.closeListeners()
	// A connection an accept loop took just before its listener closed
	// is served (see enter): wait for the loops, so every such
	// connection is counted before waitQuiet looks.
	s.loops.Wait()
	// Each inbound HBONE connection goes away in two steps and ends once
	// the streams it accepted before its last GOAWAY are done; Close
	// waits for that as well as for every other connection.
	for _, c := range hconns {
		go c.Shutdown(ctx)
	}
	var err error
	if !s.waitQuiet(ctx) {
		err = ctx.Err()
		s.mu.Lock()
		s.cutting = true
		cut := make([]*tracked, 0, len(s.closers))
		for c := range s.closers {
			cut = append(cut, c)
		}
		s.mu.Unlock()
		for _, c := range cut {
			c.cut()
		}
		// Handshakes still pending are not waited for either.
		s.p.hs.evictPod(s)
		// The pod's outbound HBONE connections go too: a stream whose
		// write is blocked in the kernel (a peer that stopped
		// answering, its socket buffer full) does not end with a reset
		// queued behind that write, only with its connection. Aborted,
		// as the inbound ones were by their cut: past the deadline
		// nothing waits on a peer (abortConn).
		s.pool.abort()
		s.waitQuiet(context.Background())
	}
	// All at once and within ctx (closeConns): a clean close may wait
	// on its peer, a second for a dead one, longer while a slow link
	// drains, and one after another they held an agent's drain past its
	// deadline.
	closing := append(hconns, conns(s.pool.take())...)
	if !closeConns(ctx, closing) && err == nil {
		err = ctx.Err()
	}
	// The pod's cleanly closed HBONE connections linger (sockets): the
	// ones just closed, and those closed before (the pool's idle
	// eviction, a retired connection). The agent exits, and closes the
	// pod's network, once Close returns: a socket closed then has the
	// peer's next frame reset. Waited for within ctx, cut past it; a
	// pool dial still ending too (sockets.dials), whose connection,
	// discarded after the wait, would have been missed.
	if err == nil && !s.pool.socks.wait(ctx) {
		err = ctx.Err()
	}
	if err != nil {
		s.pool.socks.cut(false)
		s.pool.socks.wait(context.Background())
	}
	return err
}

// Abort ends the pod's serving at once, for a pod whose network is
// going now: a CNI DEL runs the chain backwards, ours first, and the
// primary plugin removes the pod's interface as soon as the agent
// answers. A drain is pointless then: under a kubelet the pod's
// containers have stopped, and for a runtime that deletes the network
// of a live container no connection survives it either. Worse, what
// closed after the answer closed into the void: the peers of the pod's
// connections never learned (a remote client's app hung until its
// agent's keepalive, ~30 s; a server end stayed until its idle timeout),
// and each orphaned socket retransmitted its FIN, keeping the pod's
// namespace and veth ~100 s.
//
// So Abort stops accepting, closes the pod's pool to new dials (a
// connection dialled meanwhile is reset, not pooled after the answer),
// and resets the pod's connections: pooled outbound HBONE connections,
// with streams or not, inbound HBONE connections and pending
// handshakes, whose streams reset their app sockets as they fail
// (hbone's Splice); the rest is cut as by Close past its deadline (the
// app's side of a plaintext relay reset, its far side closed).
//
// A reset rather than GOAWAY and close_notify: a reset is sent at once
// whatever is queued unsent (a FIN waits behind it, for a peer's window
// that may never open again), the socket is gone when close returns (a
// FIN leaves it in FIN_WAIT, waiting for an answer the removed
// interface will not take), and the peer's agent fails every stream of
// the connection at once and resets its app's connection, which tells
// the app the truth: its transfer was cut, not complete. A GOAWAY in
// front would be discarded with the rest of the unsent data.
//
// The sockets still lingering after the pod's earlier clean closes (an
// idle pooled connection evicted, an inbound one closed idle, a drain)
// are reset too.
//
// Abort waits until ctx for the pod's handlers to end and its sockets
// to close (what it cut ends without waiting on any peer); a later
// Close waits for the rest.
// Abort after Close began (an unenrolled pod draining when its DEL
// comes) cuts what Close is draining. If something was still being
// handled, or a socket not yet closed, when ctx ended, it returns an
// error that wraps ctx's and says which.
func (s *Serving) Abort(ctx context.Context) error {
	s.mu.Lock()
	first := !s.closing
	if first {
		s.closing = true
		s.closeCtx = ctx
		close(s.stop)
	}
	s.aborted = true
	// What registers from now on is cut as it does (track).
	s.cutting = true
	s.mu.Unlock()
	if first {
		defer s.toDraining()()
	}
	s.closeListeners()
	// Every connection an accept loop took is counted (enter) and,
	// once it registers, cut.
	s.loops.Wait()
	// Every inbound HBONE socket, whatever its phase, closes with a
	// reset from now on: by the eviction of a pending handshake, by the
	// close below, by the cut of one that registers only now.
	s.mu.Lock()
	for c := range s.raws {
		_ = c.SetLinger(0)
	}
	s.mu.Unlock()
	s.p.hs.evictPod(s)
	// The pool and the inbound HBONE connections first: their streams
	// reset their spliced app sockets (hbone's Splice) as they fail.
	s.pool.reset()
	s.mu.Lock()
	hconns := make([]*hbone.Conn, 0, len(s.hconns))
	for c := range s.hconns {
		hconns = append(hconns, c)
	}
	cut := make([]*tracked, 0, len(s.closers))
	for c := range s.closers {
		cut = append(cut, c)
	}
	s.mu.Unlock()
	for _, c := range hconns {
		abortConn(c)
	}
	for _, c := range cut {
		c.cut()
	}
	// What lingers after a clean close (sockets: the pool's idle
	// eviction, an earlier drain, an inbound connection's idle close)
	// is reset too, and waited for: it must not outlive the answer.
	s.pool.socks.cut(true)
	if !s.waitQuiet(ctx) {
		s.mu.Lock()
		active, hconns := s.active, len(s.hconns)
		s.mu.Unlock()
		return fmt.Errorf("tunnel: the pod's handlers not all done when Abort's wait ended (%d connections or streams, %d inbound HBONE connections): %w", active, hconns, ctx.Err())
	}
	if !s.pool.socks.wait(ctx) {
		socks, dials := s.pool.socks.pending()
		return fmt.Errorf("tunnel: the pod's handlers done, but not its sockets when Abort's wait ended (%d HBONE sockets reset and not yet closed, %d pool dials still ending): %w", socks, dials, ctx.Err())
	}
	return nil
}

// Reauthorize checks every live inbound connection again with the
// Authorizer and closes those no longer allowed.
func (p *Proxy) Reauthorize() { p.reauthorize(nil) }

// reauthorize checks the live connections that match (all when nil).
func (p *Proxy) reauthorize(match func(*liveConn) bool) {
	if p.cfg.Authorizer == nil {
		return
	}
	p.mu.Lock()
	all := make([]*liveConn, 0, len(p.live))
	for lc := range p.live {
		if match == nil || match(lc) {
			all = append(all, lc)
		}
	}
	p.mu.Unlock()
	for _, lc := range all {
		v := p.cfg.Authorizer.Authorize(lc.current())
		if v.Allow {
			continue
		}
		p.m.failed.WithLabelValues(lc.rec.dir, "policy_revoked", orUnknown(lc.rec.srcID), orUnknown(lc.rec.dstID)).Inc()
		p.log.Info("connection closed: no longer allowed", "src", lc.info.SrcIP, "src_identity", lc.info.SrcIdentity,
			"dst", lc.info.Dst.Namespace+"/"+lc.info.Dst.Name, "port", lc.info.DstPort, "policy", v.Policy, "reason", v.Reason)
		lc.kill()
	}
}

func (p *Proxy) addLive(lc *liveConn) {
	p.mu.Lock()
	p.live[lc] = struct{}{}
	p.mu.Unlock()
}

func (p *Proxy) removeLive(lc *liveConn) {
	p.mu.Lock()
	delete(p.live, lc)
	p.mu.Unlock()
}

func (p *Proxy) authorize(info ConnInfo) Verdict {
	if p.cfg.Authorizer == nil {
		return Verdict{Allow: true, Reason: "no authorizer"}
	}
	return p.cfg.Authorizer.Authorize(info)
}
