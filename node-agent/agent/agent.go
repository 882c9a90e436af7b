package agent

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambit-mesh/ambit/node-agent/cluster"
	"github.com/ambit-mesh/ambit/node-agent/config"
	"github.com/ambit-mesh/ambit/node-agent/enrollment"
	"github.com/ambit-mesh/ambit/node-agent/health"
	"github.com/ambit-mesh/ambit/node-agent/keeper"
	"github.com/ambit-mesh/ambit/node-agent/podsysctl"
	"github.com/ambit-mesh/ambit/node-agent/state"
	"github.com/ambit-mesh/ambit/node-agent/statussync"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
	"github.com/ambit-mesh/ambit/plugin/redirect"
	"github.com/ambit-mesh/ambit/tunnel"
	"github.com/ambit-mesh/ambit/tunnel/podnet"
)

// Options wire an Agent.
type Options struct {
	Config config.Config
	View   cluster.View
	// Status reports enrollment on the pod (annotation, events); nil =
	// none. If it also reads the pods' current annotation from a cache
	// (statussync.Reader, as kube.Source does), the annotation is kept
	// level-triggered: compared periodically and on the view's events,
	// and written again wherever it differs.
	Status cluster.StatusWriter
	Tunnel Tunnel
	// Rules installs redirection when the agent does it itself; default
	// Rules{Backend: Config.RedirectBackend}.
	Rules Redirector
	// Certs prefetches certificates; nil = none.
	Certs Prefetcher
	// Host keeps kubelet probe SNAT entries for enrolled pods; nil = none.
	Host HostRules
	// Keeper holds copies of every pod's listeners so a crash of this
	// process does not close them (node-agent/keeper); nil = none.
	Keeper Keeper
	// Spec is the base redirection; default redirect.DefaultSpec().
	Spec       *redirect.Spec
	Registerer prometheus.Registerer
	// Health, if set, is marked ready once the agent adopted its pods.
	Health *health.Server
	// Peers, if set, says whether another agent runs on this node (a
	// surge upgrade): a pod record that disappears while one runs (asked
	// at each look at the records, peers.go) was removed by that agent's
	// DEL, and this agent releases the pod too. Records other agents
	// write are adopted either way.
	Peers func() bool
	// Newest, if set, says whether this agent is the newest live agent
	// of the node that is not stopping (no instance.Self.Successor):
	// then it takes the plugin socket's path back if a newer agent
	// replaced it and has stopped or died since (a rollback, socket.go).
	// Unset: the agent never replaces the path after it started.
	Newest func() bool
	// Beside, if set, says whether another agent of the node serves
	// every pod now, its listeners beside this one's (ServingBeside: live,
	// ready and not stopping; newer at the end of a surge upgrade, older
	// at a rollback). Asked when Run's context ends: only then are the
	// keeper's copies of the pods' listeners released. Unset: never.
	Beside func() bool
	// Predecessor, if set, says whether an older agent serves the plugin
	// socket now (live, ready, not stopping). Run then leaves the socket
	// to it until this agent is ready, or until it stops.
	Predecessor func() bool
	// LiveRetryEvery is how often pods whose live enrollment failed are
	// tried again without an event of theirs; 0 = 30 s.
	LiveRetryEvery time.Duration
	Logger         *slog.Logger

	// ownNetnsIno stands for the agent's own network namespace (tests:
	// a pod's, as the real one cannot be put at risk); 0 = the real one.
	ownNetnsIno uint64
}

// Agent is the running node agent.
type Agent struct {
	cfg    config.Config
	view   cluster.View
	status cluster.StatusWriter
	tun    Tunnel
	rules  Redirector
	certs  Prefetcher
	host   HostRules
	keeper Keeper
	sysctl podsysctl.Writer
	// sysctlWarned: the first failure to set a pod's sysctl is a
	// warning, the rest are counted.
	sysctlWarned atomic.Bool
	spec         redirect.Spec
	policy       enrollment.Policy
	store        *state.Store
	m            *metrics
	health       *health.Server
	peers        func() bool
	newestFn     func() bool
	predecessor  func() bool
	beside       func() bool
	log          *slog.Logger
	static       bool

	// ownNetnsIno is the inode of the agent's own network namespace, the
	// node's (hostNetwork): never a pod's to capture.
	ownNetnsIno uint64

	locks [256]sync.Mutex // per namespace/name, striped

	mu     sync.Mutex
	byCID  map[string]*pod // container ID → pod
	byName map[string]*pod // namespace/name → the latest sandbox
	// claims are the pods served in each network namespace (by inode,
	// held open while served): a namespace found by a pod's IPs is
	// never taken while another pod is served in it (netnsowner.go).
	claims map[uint64][]*netnsClaim
	// liveFailed are the pods (namespace/name) whose last live
	// enrollment failed: the reconcile loop tries them again every
	// liveRetryEvery (liveretry.go).
	liveFailed     map[string]struct{}
	liveRetryEvery time.Duration
	// kept are records adoption left on disk with no pod to serve them,
	// by namespace/name then container ID (kept.go).
	kept map[string]map[string]bool
	// toVerify are re-adopted pods whose rules are checked after ready,
	// by verifyAdopted; verifyTaken: it has taken them, and pods the
	// watcher adopts since are checked by the watcher (peers.go).
	toVerify    []*pod
	verifyTaken bool
	// watching: the records directory is watched (not polled, peers.go).
	watching atomic.Bool

	closing  sync.WaitGroup // drains in flight
	stopping atomic.Bool    // shutting down: leave host rules in place
	queue    *queue
	// statusSync keeps each pod's ambit.dev/redirection annotation at
	// what setStatus last asked for; nil without a status writer.
	statusSync *statussync.Syncer
	ready      chan struct{}
	serving    chan struct{} // closed once this agent serves a plugin socket
	servingNow sync.Once
	// live: the loops' heartbeats and the plugin requests in progress,
	// for /healthz (liveness.go).
	live *liveness
	// detached: DELs and GCs still at work past their request's
	// deadline (liveness.go), waited for before the shutdown.
	detached sync.WaitGroup
	// admin: what status reads beside the pods (snapshot.go).
	admin adminState
}

// pod is one sandbox the agent knows about.
//
// rec and serve are read across pods: holding a.mu alone, a pass over
// every pod (netnsTaken, gc, syncHostRules, the rule checks' list) reads
// other pods' records and servings, as no pod's lock is taken while
// another's is held. So a registered pod's rec and serve are written
// holding both its lock and a.mu (setRec, and a.mu around serve's
// assignments), and read holding either: the pod's lock for its own,
// a.mu for any. A struct copy racing with an assignment can tear a
// string's or slice's header. A pod not registered yet (an ADD's before
// register) is written freely: nothing else reaches it. The other fields
// are under the pod's lock alone, claim under a.mu alone.
type pod struct {
	rec   state.Pod
	spec  redirect.Spec
	netns *os.File // held while enrolled
	net   *podnet.Net
	serve Serving
	lns   []net.Listener // the pod's listeners, for the keeper
	// checked is what the periodic rule checks of this pod saw (under the
	// pod's lock).
	checked redirect.Checked
	// repairFailing: the last rule check's repair of this pod failed
	// (under the pod's lock). Until a check finds the rules right or
	// repairs them, the same failure is neither logged nor counted
	// again: where no engine can hold IPv6 every check (1 m) failed
	// alike, and each logged two lines and counted an enrollment
	// failure (TestNoEngineForIPv6LogsOnce).
	repairFailing bool
	// afterDrain runs on the netns once established connections are
	// drained, before the netns is let go (removes the drain guard).
	afterDrain func(*os.File)
	// claim: p is served in its namespace (claimNetns), until release.
	claim *netnsClaim
	// drains are the servings of p's earlier releases that drain its
	// connections (an unenrollment, its deletion from the API), kept
	// (under the pod's lock) so that its DEL cuts them: their network
	// goes with it (releaseGone).
	drains []*drain
	// aborted: abortConns reset the connections of p's serving (a DEL
	// does before the rules' removal): the release after it has none
	// left to reset nor to wait for. Cleared with the serving.
	aborted bool
}

// drain is a released serving draining in the background; done is
// closed once it has closed.
type drain struct {
	s    Serving
	done chan struct{}
}

func (p *pod) enrolled() bool { return p.serve != nil }

// setRec changes p's record, holding a.mu (the caller holds p's lock):
// change must be quick and take no lock.
func (a *Agent) setRec(p *pod, change func(*state.Pod)) {
	a.mu.Lock()
	defer a.mu.Unlock()
	change(&p.rec)
}

// servingOf is p's serving, read holding a.mu: p's lock is not held.
func (a *Agent) servingOf(p *pod) Serving {
	a.mu.Lock()
	defer a.mu.Unlock()
	return p.serve
}

// lockOf takes p's lock, its name read holding a.mu: p was found in the
// maps, and a live enrollment rewrites its whole record (the same name)
// under that lock.
func (a *Agent) lockOf(p *pod) func() {
	a.mu.Lock()
	namespace, name := p.rec.Namespace, p.rec.Name
	a.mu.Unlock()
	return a.lock(namespace, name)
}

// New checks the options and opens the state directory.
func New(o Options) (*Agent, error) {
	if o.View == nil || o.Tunnel == nil {
		return nil, errors.New("agent: View and Tunnel are required")
	}
	if err := o.Config.Validate(); err != nil {
		return nil, fmt.Errorf("agent: config: %w", err)
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Rules == nil {
		b, err := redirect.ParseBackend(o.Config.RedirectBackend)
		if err != nil {
			return nil, err
		}
		o.Rules = Rules{Backend: b}
	}
	spec := redirect.DefaultSpec()
	if o.Spec != nil {
		spec = *o.Spec
	}
	if err := spec.Validate(); err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	st, err := state.Open(o.Config.StateDir)
	if err != nil {
		return nil, err
	}
	a := &Agent{
		// watchRules: status shows each pod's last rule check.
		cfg: o.Config, view: o.View, status: o.Status, tun: o.Tunnel, rules: watchRules(o.Rules), certs: o.Certs, host: o.Host,
		keeper: o.Keeper,
		spec:   spec,
		policy: enrollment.NewPolicy(o.Config.EnrollLabel, o.Config.ExcludedNamespaces),
		store:  st, m: newMetrics(o.Registerer), health: o.Health, peers: o.Peers, newestFn: o.Newest, predecessor: o.Predecessor, beside: o.Beside, log: o.Logger,
		byCID: map[string]*pod{}, byName: map[string]*pod{},
		liveFailed: map[string]struct{}{}, liveRetryEvery: o.LiveRetryEvery,
		queue: newQueue(), ready: make(chan struct{}), serving: make(chan struct{}),
		live: newLiveness(o.Config.RuleCheckInterval.Duration),
	}
	a.ownNetnsIno = o.ownNetnsIno
	if a.ownNetnsIno == 0 {
		var own syscall.Stat_t
		// The calling thread's, not /proc/self's (the main thread's,
		// which a locked goroutine may have moved into a pod for a
		// moment): an unlocked thread is always in the agent's own.
		if err := syscall.Stat("/proc/thread-self/ns/net", &own); err != nil {
			return nil, fmt.Errorf("agent: its own network namespace: %w", err)
		}
		a.ownNetnsIno = own.Ino
	}
	if a.liveRetryEvery <= 0 {
		a.liveRetryEvery = defaultLiveRetryEvery
	}
	if o.Health != nil {
		a.registerLiveness(o.Health)
	}
	if o.Status != nil {
		so := statussync.Options{Writer: o.Status, Registerer: o.Registerer, Logger: o.Logger}
		if r, ok := o.Status.(statussync.Reader); ok {
			so.Reader = r
		}
		if a.statusSync, err = statussync.New(so); err != nil {
			return nil, fmt.Errorf("agent: %w", err)
		}
	}
	if sv, ok := o.View.(staticView); ok && sv.Static() {
		a.static = true
	}
	if o.Config.ExclusiveListeners {
		if err := podnet.Exclusive(podnet.ListenerUID); err != nil {
			// Still served; each listener is then checked after its bind,
			// but an app binding later can share it (docs/agent.md).
			a.log.Warn("exclusiveListeners is on but the pods' listeners cannot be kept from applications", "err", err)
		}
	}
	return a, nil
}

// listenerUID owns the listeners the agent makes in pods: podnet.ListenerUID
// with exclusiveListeners, else the process's own (root), which an older
// agent rolled back to can still join.
func (a *Agent) listenerUID() int {
	if a.cfg.ExclusiveListeners {
		return podnet.ListenerUID
	}
	return -1
}

// Policy is the enrollment policy in force (for the view's Meshed hook).
func (a *Agent) Policy() enrollment.Policy { return a.policy }

// InventoryReloaded counts a rejected inventory reload (wire it to the
// inventory's OnReload).
func (a *Agent) InventoryReloaded(err error) {
	if err != nil {
		a.m.reloadErrors.Inc()
		return
	}
	a.writeSnapshot()
}

// Ready is closed once the agent adopted its pods and serves the plugin.
func (a *Agent) Ready() <-chan struct{} { return a.ready }

// Serving is closed once this agent serves a plugin socket: at once
// when no older agent serves the node, else once this one is ready or
// the older one stops. The installer copies the plugin binary only
// then, so the plugin on disk is never newer than the agent answering
// it (docs/upgrade.md, "Version skew").
func (a *Agent) Serving() <-chan struct{} { return a.serving }

func (a *Agent) nowServing() { a.servingNow.Do(func() { close(a.serving) }) }

// Run starts everything and blocks until ctx ends; then it stops serving
// the plugin, closes every pod's listeners and drains established
// connections up to drainTimeout, leaving rules and records in place for
// the next agent.
//
// Beside an older agent that serves the node (a surge upgrade), the
// socket stays with it until this agent is ready (or the older one
// stops): an ADD meanwhile is served by the older agent, whose record of
// the pod this one adopts (peers.go), instead of waiting on an agent that
// may never become ready (a bad rollout, which then stalls with new pods
// still starting on the node).
func (a *Agent) Run(ctx context.Context) error {
	if a.predecessor != nil && a.predecessor() {
		return a.run(ctx, nil, nil)
	}
	s, err := cniproto.OpenSocket(a.cfg.Socket)
	if err != nil {
		return err
	}
	return a.run(ctx, s.Listener, s)
}

// RunListener is Run on an already open plugin socket. The agent does
// not know which file l was bound to, so it never takes a path back
// (Options.Newest is not used).
func (a *Agent) RunListener(ctx context.Context, l *net.UnixListener) error {
	return a.run(ctx, l, nil)
}

// run serves l; with sock (l's socket and path) it also takes the path
// back when it should (socket.go).
func (a *Agent) run(ctx context.Context, l *net.UnixListener, sock *cniproto.Socket) error {
	if l != nil {
		defer l.Close()
	}
	if err := a.view.WaitSynced(ctx); err != nil {
		return fmt.Errorf("agent: waiting for the cluster view: %w", err)
	}
	a.view.Subscribe(a.onEvent)

	var wg sync.WaitGroup
	srvCtx, stopSrv := context.WithCancel(context.Background())
	defer stopSrv()
	srv := &cniproto.Server{
		Handler:       a.handle,
		Timeout:       a.cfg.RequestTimeout.Duration,
		MaxConcurrent: a.cfg.MaxConcurrentRequests,
		OnError: func(err error) {
			a.m.requests.WithLabelValues("unknown", "malformed").Inc()
			a.log.Warn("plugin exchange failed", "err", err)
		},
	}
	// One accept loop per socket: the first, and one more each time the
	// path is taken back (the replaced socket is closed, ending its loop
	// once its exchanges are answered). Serve stops on srvCtx.
	serve := func(l *net.UnixListener) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := srv.Serve(srvCtx, l); err != nil {
				a.log.Error("plugin server stopped", "err", err)
			}
		}()
	}
	var keepers []*socketKeeper // under sockMu
	var sockMu sync.Mutex
	keep := func(sock *cniproto.Socket) {
		if a.newestFn == nil {
			return
		}
		k := &socketKeeper{a: a, serve: serve, cur: sock}
		keepers = append(keepers, k)
		wg.Add(1)
		go func() { defer wg.Done(); k.run(ctx) }()
	}
	// The socket, opened now or, beside a serving older agent, once this
	// one is ready or the older one stops (whichever comes first).
	var opened *cniproto.Socket
	openSocket := func() error {
		sockMu.Lock()
		defer sockMu.Unlock()
		if opened != nil || l != nil {
			return nil
		}
		s, err := cniproto.OpenSocket(a.cfg.Socket)
		if err != nil {
			return err
		}
		opened = s
		a.live.serving(s.Listener, s)
		serve(s.Listener)
		keep(s)
		a.nowServing()
		a.log.Info("plugin socket taken", "socket", s.Path)
		return nil
	}
	defer func() {
		sockMu.Lock()
		defer sockMu.Unlock()
		if len(keepers) == 0 && opened != nil {
			opened.Close()
		}
		for _, k := range keepers { // each closes what it serves now
			k.mu.Lock()
			k.cur.Close()
			k.mu.Unlock()
		}
	}()
	if l != nil {
		a.live.serving(l, sock)
		serve(l)
		a.nowServing()
		if sock != nil {
			sockMu.Lock()
			keep(sock)
			sockMu.Unlock()
		}
	} else {
		a.log.Info("an older agent serves the plugin socket; taking it once ready", "socket", a.cfg.Socket)
		wg.Add(1)
		go func() {
			defer wg.Done()
			t := time.NewTicker(socketCheck)
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-a.ready:
					return
				case <-t.C:
					if !a.predecessor() {
						if err := openSocket(); err != nil {
							a.log.Error("plugin socket: the older agent stopped and opening it failed", "err", err)
							continue
						}
						return
					}
				}
			}
		}()
	}
	// The annotations are kept until the agent is told to stop, not
	// through its drain: from then on its wishes are frozen (the
	// reconcile loop has stopped) while the newer agent of the node (a
	// surge upgrade) acts, and a write of a stale wish would undo the
	// newer agent's, e.g. remove "enabled" from a pod it enrolled again.
	// What is left unwritten the next agent states again (re-adoption,
	// its full reconcile).
	statusCtx, stopStatus := context.WithCancel(ctx)
	defer stopStatus()
	statusDone := make(chan struct{})
	go func() {
		defer close(statusDone)
		if a.statusSync != nil {
			a.statusSync.Run(statusCtx)
		}
	}()

	start := time.Now()
	n, seen := a.adopt(ctx)
	// Another agent of the node (a surge upgrade) may still write records
	// after the list adoption read: follow them from now on, and have
	// those written meanwhile adopted before the host rules are synced.
	following := make(chan struct{})
	wg.Add(1)
	go func() { defer wg.Done(); a.followRecords(ctx, seen, following) }()
	<-following
	a.m.adoptSeconds.Set(time.Since(start).Seconds())
	if a.keeper != nil {
		// Every pod re-adopted has put its new listeners (closing the
		// kept ones, whose queue moved to them); what is left belongs
		// to pods that are gone.
		if err := a.keeper.PruneOlder(); err != nil {
			a.m.keeperErrors.WithLabelValues("prune").Inc()
			a.log.Warn("keeper: pruning what earlier agents left", "err", err)
		}
	}
	a.syncHostRules()
	a.writeSnapshot()
	if err := openSocket(); err != nil {
		return fmt.Errorf("agent: plugin socket: %w", err)
	}
	a.log.Info("agent ready", "adopted", n, "took", time.Since(start).Round(time.Millisecond), "socket", a.cfg.Socket)
	if a.health != nil {
		a.health.SetReady()
	}
	close(a.ready)
	// Pods that should be enrolled but have no record (state lost, pods
	// labelled while no agent ran) are found by a full reconcile.
	a.queue.add(key{kind: keyAll})
	wg.Add(1)
	go func() { defer wg.Done(); a.verifyAdopted(ctx) }()

	wg.Add(1)
	go func() { defer wg.Done(); a.reconcileLoop(ctx) }()
	if a.health != nil {
		wg.Add(1)
		go func() { defer wg.Done(); a.checkSocketLoop(ctx) }()
	}
	<-ctx.Done()

	a.stopping.Store(true)
	a.log.Info("agent stopping: draining connections", "drainTimeout", a.cfg.DrainTimeout.Duration)
	if a.health != nil {
		a.health.SetNotReady("stopping")
	}
	stopSrv()
	a.queue.close()
	wg.Wait()
	// The server has stopped: no request detaches any more. Those that
	// did finish before the shutdown releases every pod (a DEL releases
	// one too).
	a.detached.Wait()
	// The keeper and the drain act on the same answer; serving on asks
	// again, and an agent come to serve beside meanwhile has both act as
	// at a hand-over (shutdown).
	beside := a.beside != nil && a.beside()
	if a.keeper != nil {
		a.stopKeeper(beside)
	}
	a.shutdown(beside)
	stopStatus()
	<-statusDone
	return nil
}

// stopKeeper decides, at a stop, whether the keeper lets the pods'
// listeners go.
//
// A stop is not always a hand-over. Released, the listeners close with
// this process, and their queue moves only to listeners beside them: an
// agent that serves the node now (a surge upgrade's newer one, ready; an
// older one at a rollback) then takes every new connection at once, and
// the kept copies would only hold a share of them (SO_REUSEPORT) for
// nobody until the keeper stops. With no such agent — the kubelet
// restarting a container that failed its liveness probe, `crictl stop`,
// any restart of the agent's container while its pod and keeper stay —
// nothing would listen on 15001/15006/15008 in any enrolled pod until the
// restarted agent re-adopts: every new connection refused for seconds.
// Kept, they stay in LISTEN as after kill -9: the kernel queues new
// connections, and the restarted agent's listeners take the queue over
// when it puts them to the keeper. Readiness, not mere presence, because
// a newer agent still starting has not opened its listeners in every pod
// yet; a dead one is no one's successor (its registry lock is gone).
// When the pod itself is deleted (an upgrade, uninstall, a drain) its
// keeper is told to stop at the same moment and closes its copies
// whatever this agent decides.
func (a *Agent) stopKeeper(beside bool) {
	if !beside {
		a.log.Info("keeper: keeping the pods' listeners for the next agent of this pod (no other agent serves the node); new connections wait in their queues")
		return
	}
	if err := a.keeper.PruneAll(); errors.Is(err, keeper.ErrUnavailable) {
		// The pod is being deleted and its keeper, told to stop at the
		// same time, has already closed its copies: the usual case,
		// nothing to release.
		a.log.Debug("keeper: gone before the release", "err", err)
	} else if err != nil {
		a.m.keeperErrors.WithLabelValues("prune").Inc()
		a.log.Warn("keeper: releasing the kept listeners", "err", err)
	} else {
		a.log.Info("keeper: released the pods' listeners to the agent serving beside this one")
	}
}

// setMigrateReq sets net.ipv4.tcp_migrate_req=1 inside the pod's netns:
// when a listener of a SO_REUSEPORT group closes, the connections in its
// accept queue move to another listener of the group (the next agent's)
// instead of being reset.
func (a *Agent) setMigrateReq(f *os.File, wl tunnel.Workload) bool {
	err := a.sysctl.Set(f, "net.ipv4.tcp_migrate_req", "1")
	if err == nil {
		return true
	}
	a.m.sysctlErrors.Inc()
	if a.sysctlWarned.CompareAndSwap(false, true) {
		a.log.Warn("net.ipv4.tcp_migrate_req not set in the pod: connections queued on this agent's listeners will be reset, not handed over, when it stops (counted in ambit_agent_pod_sysctl_errors_total; logged once)",
			"pod", wl.Namespace+"/"+wl.Name, "procfs", a.sysctl.Mode(), "err", err)
	}
	return false
}

// shutdown closes every pod's listeners and drains, keeping rules and
// records: the next agent re-adopts them. With another agent serving
// beside (beside), the listeners close at once, so their queue and every
// new connection go to it; with none, every pod is served on while it
// holds connections (serveOn), then the listeners close and the rest of
// drainTimeout drains what is left. An agent that comes to serve beside
// while this one serves on ends it: the keeper lets the copies go, as it
// would have at once, and the listeners close. Each release's Close
// returns only once the pod's HBONE sockets are closed, a clean close's
// linger included, within the drain's deadline: every HBONE connection
// is a Serving's (its pool's or its 15008's), so the process exits with
// none left for the kernel to reset.
func (a *Agent) shutdown(beside bool) {
	// Status says the pods drain from now on.
	a.admin.stop()
	a.mu.Lock()
	pods := make([]*pod, 0, len(a.byCID))
	for _, p := range a.byCID {
		pods = append(pods, p)
	}
	a.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), a.cfg.DrainTimeout.Duration)
	defer cancel()
	if !beside && a.serveOn(pods, a.cfg.DrainTimeout.Duration-drainTail(a.cfg.DrainTimeout.Duration)) && a.keeper != nil {
		a.stopKeeper(true)
	}
	var wg sync.WaitGroup
	for _, p := range pods {
		// Detached under the pod's lock: a forget still at work in the
		// background (an eviction, a superseded sandbox) releases it
		// under that lock too, and one of them alone gets the serving.
		// Each pod on its own: that forget may hold the lock a while
		// (its rule removal waiting on the xtables lock), and taken in
		// turn it held up every pod after it, listeners open and drain
		// cut (TestShutdownNotHeldUpByAnotherPodsLock).
		wg.Add(1)
		go func() {
			defer wg.Done()
			unlock := a.lockOf(p)
			var cp *pod
			if p.enrolled() {
				cp = a.detach(p)
			}
			unlock()
			if cp != nil {
				a.release(ctx, cp)
			}
		}()
	}
	wg.Wait()
	a.closing.Wait()
}

// hostKey is the owner of a pod's host rule entries: its UID, else its
// sandbox.
func hostKey(r state.Pod) string {
	if r.UID != "" {
		return r.UID
	}
	return r.ContainerID
}

// syncHostRules replaces the host's probe entries with the enrolled pods'
// (after re-adoption: entries of pods deleted while no agent ran go).
func (a *Agent) syncHostRules() {
	if a.host == nil {
		return
	}
	want := map[string][]netip.Addr{}
	a.mu.Lock()
	for _, p := range a.byCID {
		if p.enrolled() && len(p.rec.IPs) > 0 {
			want[hostKey(p.rec)] = p.rec.IPs
		}
	}
	a.mu.Unlock()
	if err := a.host.Sync(want); err != nil {
		a.log.Warn("host probe rules", "err", err)
	}
}

func (a *Agent) lock(namespace, name string) func() {
	m := a.stripe(namespace, name)
	m.Lock()
	return m.Unlock
}

// stripe is the lock of the pod namespace/name (shared with the pods
// hashed to the same stripe).
func (a *Agent) stripe(namespace, name string) *sync.Mutex {
	h := fnv.New32a()
	h.Write([]byte(namespace))
	h.Write([]byte{'/'})
	h.Write([]byte(name))
	return &a.locks[h.Sum32()%uint32(len(a.locks))]
}

// identity is the pod's SPIFFE ID; a view with its own trust domain (an
// inventory that sets one) wins over the configuration, so the agent and
// the directory agree.
func (a *Agent) identity(p cluster.Pod) string {
	td := a.cfg.TrustDomain
	if v, ok := a.view.(interface{ TrustDomain() string }); ok && v.TrustDomain() != "" {
		td = v.TrustDomain()
	}
	sa := p.ServiceAccount
	if sa == "" {
		sa = "default"
	}
	return fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", td, p.Namespace, sa)
}

// specFor decides the address families of a pod's redirection: both,
// whatever addresses the pod has, unless config ipv6: off. A family is
// captured even where the pod has no address of it from its IPAM: pods
// on a shared link (a bridge) still reach each other's IPv6 link-local
// addresses, and an app on the dual-stack wildcard answers there, so
// IPv4-only rules let plaintext between two enrolled pods pass both
// sides' capture, past a strict mode (TestLinkLocalIPv6IsCaptured).
// Redirection installs in a pod with IPv6 turned off (the policy route
// is left out), and host rules need IPv6 NAT unless ipv6: off already.
// The pod's addresses (ips, else found in netns) no longer narrow it.
func (a *Agent) specFor(_ []netip.Addr, _ *os.File) redirect.Spec {
	s := a.spec
	v4, v6 := true, true
	if a.cfg.IPv6 == "off" {
		v6 = false
	}
	s.IPv4, s.IPv6 = v4, v6
	return s
}

// serve opens the listeners in the pod's netns and starts the tunnel for
// it; on error nothing is left open. The netns file stays the caller's
// until success, when p owns it. atAdd: called from the CNI ADD, before
// any container of the pod runs (no app socket to look for after the
// binds), which adds the host's probe entries itself, by the request's
// deadline (addHostRules). Otherwise (live enrollment, re-adoption) the
// namespace was found by the pod's IPs and is refused if another pod is
// served in it (claimNetns); an ADD takes its namespace whatever, and
// pods found in it before are let go (evictFromNetns).
func (a *Agent) serve(p *pod, f *os.File, wl tunnel.Workload, atAdd bool) (err error) {
	others, err := a.claimNetns(p, f, !atAdd)
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			a.unclaimNetns(p)
		} else if len(others) > 0 {
			a.evictFromNetns(others, podKey{p.rec.Namespace, p.rec.Name, p.rec.UID})
		}
	}()
	if a.certs != nil {
		if err := a.certs.Prefetch(wl.Identity); err != nil {
			return &failure{"certificate", err}
		}
	}
	unpin := func() {
		if a.certs != nil {
			a.certs.Forget(wl.Identity)
		}
	}
	n, err := podnet.Open(f, podnet.WithMark(a.spec.Mark), podnet.WithListenerUID(a.listenerUID()))
	if err != nil {
		unpin()
		return &failure{"netns", err}
	}
	// Queued connections move to the new agent's listener when the old
	// one closes (hand-over, keeper release) instead of being reset. A
	// per-netns sysctl; the record says whether it is set, so
	// re-adoption sets it only in pods enrolled by agents before
	// node-agent/podsysctl, which could not write it from their
	// container (it costs ~0.25 ms per pod, 40 % of a re-adoption).
	if !p.rec.MigrateReq {
		set := a.setMigrateReq(f, wl)
		a.setRec(p, func(r *state.Pod) { r.MigrateReq = set })
	}
	var lns []net.Listener
	closeAll := func() {
		for _, l := range lns {
			l.Close()
		}
		n.Close()
		unpin()
	}
	for _, port := range []uint16{a.spec.OutboundPort, a.spec.InboundPort, a.spec.HBONEPort} {
		o := podnet.ListenOptions{Fresh: atAdd}
		if port == a.spec.OutboundPort {
			// Its peers are the pod's own apps: keepalive probes would
			// never find anything and cost four system calls per
			// captured connection.
			o.KeepAlive = -1
		}
		l, err := n.Listen(port, o)
		if err != nil {
			closeAll()
			if perr := a.portInUse(cluster.Pod{Namespace: wl.Namespace, Name: wl.Name}, err); perr != nil {
				return perr
			}
			return &failure{"listen", err}
		}
		lns = append(lns, l)
	}
	s, err := a.tun.Serve(tunnel.Pod{Workload: wl, Outbound: lns[0], Inbound: lns[1], HBONE: lns[2], Net: n})
	if err != nil {
		closeAll()
		return &failure{"tunnel", err}
	}
	a.mu.Lock()
	p.netns, p.net, p.serve, p.lns = f, n, s, lns
	p.rec.Identity = wl.Identity
	a.mu.Unlock()
	// What earlier rule checks trusted belongs to whatever netns the
	// record had before (a live enrollment may reuse a record and get
	// its netns from the /proc scan): this one is checked in full first.
	p.checked = redirect.Checked{}
	if a.keeper != nil {
		// Replaces what an agent before this one kept for the pod:
		// those sockets close, and their queue moves to lns.
		if err := a.keeper.Put(p.rec.ContainerID, lns...); err != nil {
			a.m.keeperErrors.WithLabelValues("put").Inc()
			a.log.Warn("keeper: the pod's listeners will close with this process", "pod", wl.Namespace+"/"+wl.Name, "err", err)
		}
	}
	a.m.enrolled.Inc()
	// The record's IPs, as at ADD (addHostRules): what the release
	// removes and the Sync after re-adoption writes.
	if a.host != nil && len(p.rec.IPs) > 0 && !atAdd {
		if err := a.host.Add(hostKey(p.rec), p.rec.IPs); err != nil {
			a.log.Warn("host probe rules", "pod", wl.Namespace+"/"+wl.Name, "err", err)
		}
	}
	return nil
}

// release stops serving p: listeners closed, established connections
// drained until ctx ends. Rules are not touched. p is a copy detach made,
// or a registered pod whose lock the caller holds.
func (a *Agent) release(ctx context.Context, p *pod) {
	a.mu.Lock()
	s, n, f, after := p.serve, p.net, p.netns, p.afterDrain
	if s != nil {
		p.serve, p.net, p.netns, p.afterDrain, p.lns = nil, nil, nil, nil, nil
	}
	a.mu.Unlock()
	if s == nil {
		return
	}
	p.aborted = false
	a.m.enrolled.Dec()
	// The namespace is held (f) until the end below: no new namespace
	// can have its inode meanwhile.
	defer a.unclaimNetns(p)
	if a.keeper != nil && !a.stopping.Load() {
		// First, so closing our listeners closes the sockets. (At
		// shutdown PruneAll did it for every pod.)
		if err := a.keeper.Drop(p.rec.ContainerID); err != nil {
			a.m.keeperErrors.WithLabelValues("drop").Inc()
			a.log.Warn("keeper: dropping the pod's listeners", "pod", p.rec.Namespace+"/"+p.rec.Name, "err", err)
		}
	}
	if a.host != nil && !a.stopping.Load() {
		// Not at shutdown: the next agent keeps the entries.
		if err := a.host.Remove(hostKey(p.rec), p.rec.IPs); err != nil {
			a.log.Warn("host probe rules", "pod", p.rec.Namespace+"/"+p.rec.Name, "err", err)
		}
	}
	if err := s.Close(ctx); err != nil && !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, context.Canceled) {
		a.log.Warn("closing pod listeners", "pod", p.rec.Namespace+"/"+p.rec.Name, "err", err)
	}
	n.Close()
	if after != nil {
		after(f)
	}
	f.Close()
	if a.certs != nil {
		a.certs.Forget(p.rec.Identity)
	}
}

// beforeAnswerWait bounds what a release waits for before the caller
// answers (a DEL, the plugin waiting): at a DEL (releaseGone) for the
// pod's connection handlers to end once every connection is reset (they
// wait on no peer: milliseconds, docs/agent.md "Plugin server"), otherwise
// (releaseAsync) for a stream opened on an idle pooled connection as it
// is shut down. 500 ms, as for the idle connections before: well within
// the plugin's own deadline for an answer, and a DEL that goes over it
// is answered anyway, its handlers left to end in the background with
// the rest of the release.
const beforeAnswerWait = 500 * time.Millisecond

// releaseAsync drains in the background (unenroll, and the releases
// whose pod's network may stay): the caller need not wait for
// long-lived connections.
func (a *Agent) releaseAsync(p *pod) { a.releaseAs(p, false) }

// releaseGone releases p, whose network is going now: a CNI DEL (or a
// GC of its sandbox, or another agent's DEL of it) runs the chain
// backwards, ours first, and the primary plugin removes the pod's
// interface as soon as the agent answers. Nothing drains then: every
// connection of the pod is reset before the answer (abortConns), so each
// peer learns at once. A connection closed after the answer closed into
// the void: its peer never learned, and its orphaned socket kept the
// pod's namespace ~100 s.
func (a *Agent) releaseGone(p *pod) {
	if a.abortConns(p) {
		a.detachRelease(p, nil)
		return
	}
	a.releaseAs(p, true)
}

// abortConns resets every connection of p (Aborter), those of its
// earlier releases still draining too (an unenrollment shortly before
// its DEL), waiting up to beforeAnswerWait for their handlers to end.
// It reports whether p's serving could (false: none, or one that cannot
// abort, left to releaseAs). Under the pod's lock; a second call finds
// nothing left to reset, and returns at once: a DEL calls it before the
// rules' removal and again in its release (releaseGone), and waited out
// the bound twice when a handler outlasted it (TestDelAbortsOnce).
func (a *Agent) abortConns(p *pod) bool {
	ctx, cancel := context.WithTimeout(context.Background(), beforeAnswerWait)
	defer cancel()
	for _, d := range p.drains {
		select {
		case <-d.done:
			continue
		default:
		}
		if ab, ok := d.s.(Aborter); ok {
			ab.Abort(ctx)
		}
	}
	p.drains = nil
	ab, ok := p.serve.(Aborter)
	if !ok {
		return false
	}
	if p.aborted {
		return true
	}
	p.aborted = true
	if err := ab.Abort(ctx); err != nil {
		a.log.Info("pod's network going: its connections were reset, not all done by the bound (err: handlers, or sockets not yet closed); the rest ends in the background",
			"pod", p.rec.Namespace+"/"+p.rec.Name, "wait", beforeAnswerWait, "err", err)
	}
	return true
}

// releaseAs is releaseAsync; gone: the pod's network is going and its
// serving cannot abort (releaseGone), its idle connections closed as
// before.
func (a *Agent) releaseAs(p *pod, gone bool) {
	if !p.enrolled() {
		return
	}
	if ic, ok := p.serve.(IdleCloser); ok {
		// Before answering: should the pod's network go right after
		// (a DEL), a connection closed then never tells its peer,
		// which holds its end until its idle timeout (tunnel's
		// CloseIdleOutbound). Idle connections close at once; the
		// bound is for a stream opened on one just now.
		ctx, cancel := context.WithTimeout(context.Background(), beforeAnswerWait)
		ic.CloseIdleOutbound(ctx)
		cancel()
	}
	var d *drain
	if !gone {
		d = &drain{s: p.serve, done: make(chan struct{})}
		p.drains = append(slices.DeleteFunc(p.drains, func(old *drain) bool {
			select {
			case <-old.done:
				return true
			default:
				return false
			}
		}), d)
	}
	a.detachRelease(p, d)
}

// detachRelease detaches p's serving and releases it in the background,
// drained up to drainTimeout; d, if set, is closed once it is done.
func (a *Agent) detachRelease(p *pod, d *drain) {
	// Detach now so a new sandbox or a re-enroll does not see it.
	cp := a.detach(p)
	a.closing.Add(1)
	go func() {
		defer a.closing.Done()
		if d != nil {
			defer close(d.done)
		}
		ctx, cancel := context.WithTimeout(context.Background(), a.cfg.DrainTimeout.Duration)
		defer cancel()
		a.release(ctx, cp)
	}()
}

// detach moves p's serving (under p's lock) to a copy of p that release
// then lets go of.
func (a *Agent) detach(p *pod) *pod {
	a.mu.Lock()
	defer a.mu.Unlock()
	cp := &pod{rec: p.rec, netns: p.netns, net: p.net, serve: p.serve, afterDrain: p.afterDrain}
	p.serve, p.net, p.netns, p.afterDrain, p.lns = nil, nil, nil, nil, nil
	p.aborted = false
	cp.claim, p.claim = p.claim, nil
	return cp
}

func (a *Agent) workload(cp cluster.Pod) tunnel.Workload {
	return tunnel.Workload{
		UID: cp.UID, Namespace: cp.Namespace, Name: cp.Name, ServiceAccount: cp.ServiceAccount,
		Labels: cp.Labels, IPs: slices.Clone(cp.IPs), Identity: a.identity(cp), Meshed: true,
	}
}

// failure is an enrollment error with a metric reason.
type failure struct {
	reason string
	err    error
}

func (f *failure) Error() string { return f.reason + ": " + f.err.Error() }
func (f *failure) Unwrap() error { return f.err }

func reasonOf(err error) string {
	var f *failure
	if errors.As(err, &f) {
		return f.reason
	}
	return "other"
}

// setStatus asks for the pod's ambit.dev/redirection annotation to be st
// ("" removes it) and records a Warning event when reason is set. The
// write happens in the background (an API call must never hold up the
// plugin) and is retried until the annotation is right, the pod is gone,
// or a later setStatus wants something else (statussync). Callers set
// "enabled" only once the pod's listeners and rules are in place, and ""
// only after removing them: see docs/agent.md for why that order.
func (a *Agent) setStatus(cp cluster.Pod, st, reason, msg string) {
	a.admin.notes.set(cp, st, reason, msg)
	if a.status == nil {
		return
	}
	a.statusSync.Set(cp, st)
	if reason != "" {
		// Events are queued by the recorder, which drops rather than
		// blocks when the API server is slow.
		a.status.Warn(context.Background(), cp, reason, msg)
	}
}

// forgetStatus stops keeping a pod's annotation: its sandbox or the pod
// itself is gone (uid, if set, only that pod).
func (a *Agent) forgetStatus(namespace, name, uid string) {
	a.admin.notes.forget(namespace, name, uid)
	if a.statusSync != nil {
		a.statusSync.Forget(namespace, name, uid)
	}
}
