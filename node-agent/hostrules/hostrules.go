package hostrules

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sort"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/vishvananda/netns"

	"github.com/ambit-mesh/ambit/plugin/redirect"
)

// Backends.
const (
	BackendAuto     = ""
	BackendNFTables = "nftables"
	BackendIPTables = "iptables"
)

// Config configures a Manager. The zero value is the production default.
type Config struct {
	// Backend is "" (auto: nftables when the kernel answers nftables over
	// netlink, else iptables), "nftables" or "iptables".
	Backend string
	// ProbeSNATv4/v6 default to redirect.DefaultProbeSNATv4/v6; they must
	// match the agent's redirect.Spec.
	ProbeSNATv4 netip.Addr
	ProbeSNATv6 netip.Addr
	// KubeletUID, when set, narrows the rule to sockets of that user
	// (nft "meta skuid", iptables "--uid-owner"); nil matches every local
	// socket, like Istio's "--socket-exists".
	KubeletUID *uint32
	// Interval of the reconcile loop; default 5s.
	Interval time.Duration
	// RunTimeout bounds each run of the iptables tools besides its wait
	// for the xtables lock (5 s), so a hung tool does not hold the rules
	// for good; default 10s. A run stopped there is a host-rule error,
	// not a caller's deadline (AddContext). Unused by nftables.
	RunTimeout time.Duration
	// Name is the nft table ("ambit-host") or the iptables chain and ipset
	// prefix ("AMBIT-POSTRT", "ambit-probes"); tests set their own.
	Name string
	// NetNS is the network namespace to manage; 0 is the caller's (the
	// agent runs in the host network namespace). The Manager does not
	// close it.
	NetNS netns.NsHandle
	// IPTablesVariant overrides iptables variant detection for the iptables
	// backend: "legacy" or "nft" (also accepted as "iptables-legacy",
	// "iptables-nft"). Empty: redirect.DetectIptables, once per process.
	IPTablesVariant string
	// IPv4Only leaves IPv6 alone: no v6 set, rule or ip6tables chain, and
	// IPv6 pod addresses are ignored. For hosts without IPv6 NAT (the
	// agent sets it when its config says ipv6: off).
	IPv4Only bool
	// Shared says other agents on the node may own entries this Manager
	// has not learned yet: during a surge upgrade two agents run side by
	// side, and the new one re-adopts its pods one by one. Until the
	// first Sync (the whole picture, after re-adoption) Add merges into
	// what the kernel holds instead of replacing it, Remove deletes only
	// its IPs, and Run does not reconcile: each agent "repairing" the
	// other's entries away made them rewrite the sets in turn, and a
	// kubelet probe in that window could miss its SNAT.
	Shared bool
	// Yield, when set and true, says a newer agent on the node is ready
	// and maintains the rules. Run does not reconcile; Add and Remove
	// still apply their entries, but a failed one is left to the newer
	// agent instead of falling back to a full rewrite, and Sync records
	// the picture without writing it: a rewrite from this agent's
	// picture would drop the pods only the newer one knows.
	Yield func() bool
	// Registerer receives the metrics; nil registers nothing.
	Registerer prometheus.Registerer
	Logger     *slog.Logger
}

// backend is one way of putting the rule and the sets into the kernel.
// Every method is called with Manager.mu held.
type backend interface {
	name() string
	// check compares the kernel with want (IP → UID); drift says what is
	// missing or different, "" when nothing is. ctx ends the iptables
	// runs (netlink work is not cut: milliseconds, no lock).
	check(ctx context.Context, want map[netip.Addr]string) (drift string, err error)
	// write replaces everything with want, atomically where the backend
	// can (nftables: one transaction); ctx as for check.
	write(ctx context.Context, want map[netip.Addr]string) error
	// upsert and remove change single entries; an error makes the
	// Manager fall back to write.
	upsert(add map[netip.Addr]string, replaced map[netip.Addr]bool) error
	remove(ips []netip.Addr) error
	uninstall() error
}

// Manager owns the host probe rules.
type Manager struct {
	cfg Config
	log *slog.Logger
	be  backend

	mu        ctxMutex
	owners    map[netip.Addr]string // IP → pod UID: what should be
	applied   map[netip.Addr]string // what we last put into the kernel
	installed bool                  // write succeeded at least once
	// removed: Uninstall ran; the reconcile loop must not reinstall
	// until Add or Sync asks for rules again.
	removed bool
	// synced: Sync ran (Config.Shared: until then the kernel may hold
	// entries of another agent's that this one will learn).
	synced bool

	repairs  prometheus.Counter
	failures prometheus.Counter
	entries  prometheus.Gauge
}

// New validates cfg and picks the backend; it changes nothing in the
// kernel until Add, Sync or Run.
func New(cfg Config) (*Manager, error) {
	if !cfg.ProbeSNATv4.IsValid() {
		cfg.ProbeSNATv4 = redirect.DefaultProbeSNATv4
	}
	if !cfg.ProbeSNATv6.IsValid() {
		cfg.ProbeSNATv6 = redirect.DefaultProbeSNATv6
	}
	if !cfg.ProbeSNATv4.Is4() {
		return nil, fmt.Errorf("hostrules: ProbeSNATv4 %s is not an IPv4 address", cfg.ProbeSNATv4)
	}
	if !cfg.ProbeSNATv6.Is6() || cfg.ProbeSNATv6.Is4In6() {
		return nil, fmt.Errorf("hostrules: ProbeSNATv6 %s is not an IPv6 address", cfg.ProbeSNATv6)
	}
	if cfg.Interval <= 0 {
		cfg.Interval = 5 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	m := &Manager{
		mu:     make(ctxMutex, 1),
		cfg:    cfg,
		log:    cfg.Logger.With("component", "hostrules"),
		owners: map[netip.Addr]string{},
		repairs: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ambit_host_rules_repairs_total",
			Help: "Times the host probe SNAT rules or sets were found missing or altered and rewritten.",
		}),
		failures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ambit_host_rules_errors_total",
			Help: "Failed attempts to check or write the host probe SNAT rules.",
		}),
		entries: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "ambit_host_rules_entries",
			Help: "Enrolled pod IPs in the host probe SNAT sets.",
		}),
	}
	var err error
	switch cfg.Backend {
	case BackendAuto:
		if nftAvailable(cfg) {
			m.be, err = newNFT(cfg)
		} else {
			m.be, err = newIPT(cfg)
		}
	case BackendNFTables:
		m.be, err = newNFT(cfg)
	case BackendIPTables:
		m.be, err = newIPT(cfg)
	case "iptables-legacy", "iptables-nft":
		if cfg.IPTablesVariant == "" {
			cfg.IPTablesVariant = cfg.Backend
		}
		m.be, err = newIPT(cfg)
	default:
		return nil, fmt.Errorf("hostrules: backend %q is not nftables, iptables, iptables-legacy, iptables-nft or empty (auto)", cfg.Backend)
	}
	if err != nil {
		return nil, err
	}
	if cfg.Registerer != nil {
		for _, c := range []prometheus.Collector{m.repairs, m.failures, m.entries} {
			if err := cfg.Registerer.Register(c); err != nil {
				return nil, fmt.Errorf("hostrules: register metrics: %w", err)
			}
		}
	}
	m.log.Info("host probe rules", "backend", m.be.name())
	return m, nil
}

// Backend names the backend in use.
func (m *Manager) Backend() string { return m.be.name() }

// Repairs is the value of ambit_host_rules_repairs_total.
func (m *Manager) Repairs() uint64 {
	return uint64(counterValue(m.repairs))
}

// cleanIPs validates ips and drops the IPv6 ones when v4only.
func cleanIPs(ips []netip.Addr, v4only bool) ([]netip.Addr, error) {
	out := make([]netip.Addr, 0, len(ips))
	for _, ip := range ips {
		if !ip.IsValid() {
			return nil, errors.New("hostrules: invalid (zero) IP")
		}
		ip = ip.Unmap()
		if ip.IsUnspecified() || ip.IsLoopback() || ip.IsMulticast() {
			return nil, fmt.Errorf("hostrules: %s is not a pod IP", ip)
		}
		if v4only && ip.Is6() {
			continue
		}
		out = append(out, ip)
	}
	return out, nil
}

// Add makes uid the owner of ips (an upsert: an IP still held by an older
// pod moves to uid) and applies it now. With the iptables backend a
// rewrite (the first Add, or one after the sets went missing) runs the
// iptables tools, each waiting up to iptWait for the host's xtables
// lock; AddContext bounds that by a context.
func (m *Manager) Add(uid string, ips []netip.Addr) error {
	return m.AddContext(context.Background(), uid, ips)
}

// AddContext is Add ending by ctx: the wait for the Manager's lock (held
// by a reconcile waiting for the xtables lock) and every iptables run it
// makes. An error of work ctx ended wraps ctx's error, so a plugin
// request's caller can answer "retry"; a run stopped at its own bound
// (Config.RunTimeout) does not, ctx not being over. The IPs stay owned by uid and the
// kernel may hold part of the rewrite: the reconcile loop finishes it,
// or the caller's Remove takes them back.
func (m *Manager) AddContext(ctx context.Context, uid string, ips []netip.Addr) error {
	if uid == "" {
		return errors.New("hostrules: Add needs the pod UID")
	}
	ips, err := cleanIPs(ips, m.cfg.IPv4Only)
	if err != nil {
		return err
	}
	if err := m.mu.lockContext(ctx); err != nil {
		return fmt.Errorf("hostrules: waiting for the host rules' lock (held by a rewrite of the rules, itself waiting on the host's xtables lock?): %w", err)
	}
	defer m.mu.Unlock()
	m.removed = false
	add := map[netip.Addr]string{}
	replaced := map[netip.Addr]bool{}
	for _, ip := range ips {
		old, had := m.owners[ip]
		if had && old == uid {
			continue
		}
		if had {
			m.log.Info("probe SNAT entry changes owner (IP reused)", "ip", ip, "old_uid", old, "uid", uid)
			replaced[ip] = true
		}
		m.owners[ip] = uid
		add[ip] = uid
	}
	if len(add) == 0 && m.installed {
		return nil
	}
	if m.installed || m.merging() || m.yielding() {
		err := m.be.upsert(add, replaced)
		if err == nil {
			m.appliedLocked()
			return nil
		}
		if m.yielding() {
			m.leaveToSuccessor("add", err)
			return nil
		}
	}
	return m.reconcileLocked(ctx, true)
}

// Remove deletes the IPs still owned by uid; IPs another pod took over are
// left alone.
func (m *Manager) Remove(uid string, ips []netip.Addr) error {
	ips, err := cleanIPs(ips, m.cfg.IPv4Only)
	if err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	var del []netip.Addr
	for _, ip := range ips {
		if owner, ok := m.owners[ip]; ok && owner == uid {
			delete(m.owners, ip)
			del = append(del, ip)
		}
	}
	if len(del) == 0 || m.removed {
		return nil
	}
	if m.installed || m.merging() || m.yielding() {
		err := m.be.remove(del)
		if err == nil || m.merging() {
			// Merging, a failed removal waits for Sync: rewriting
			// the sets would drop the entries we do not know yet.
			m.appliedLocked()
			return nil
		}
		if m.yielding() {
			m.leaveToSuccessor("remove", err)
			return nil
		}
	}
	return m.reconcileLocked(context.Background(), true)
}

// yielding: a newer agent on the node is ready (Config.Yield), so the
// rules are its to maintain. Asked only where a full write is at stake:
// Yield reads the node's agent registry.
func (m *Manager) yielding() bool { return m.cfg.Yield != nil && m.cfg.Yield() }

// leaveToSuccessor handles a failed single-entry update while yielding.
// The fallback of a lone agent, a full rewrite from its own picture,
// would drop the entries of pods only the successor knows (enrolled
// since it took the plugin socket), and put back what the successor
// left out (a v6 set it was configured without). The successor's
// reconcile (every Config.Interval, and at once on nftables deletion
// notifications) repairs whatever the kernel lacks from its picture;
// applied is left as it was, so should this agent be in charge again
// (the successor died), its next reconcile writes its own picture.
func (m *Manager) leaveToSuccessor(op string, err error) {
	m.failures.Inc()
	m.log.Warn("host probe rules: single-entry update failed; a newer agent maintains the rules, leaving the repair to it",
		"backend", m.be.name(), "op", op, "err", err)
}

// merging: Config.Shared and no Sync yet, so writes must leave entries
// this Manager does not know in place.
func (m *Manager) merging() bool { return m.cfg.Shared && !m.synced }

// Sync replaces the whole picture (UID → IPs), e.g. after a restart from
// the adopted snapshot, and applies it. An IP claimed by two UIDs goes to
// the greatest UID (deterministic) and is logged: the caller should only
// pass live pods.
func (m *Manager) Sync(want map[string][]netip.Addr) error {
	owners := map[netip.Addr]string{}
	uids := make([]string, 0, len(want))
	for uid := range want {
		uids = append(uids, uid)
	}
	sort.Strings(uids)
	for _, uid := range uids {
		if uid == "" {
			return errors.New("hostrules: Sync with an empty pod UID")
		}
		ips, err := cleanIPs(want[uid], m.cfg.IPv4Only)
		if err != nil {
			return fmt.Errorf("%w (pod %s)", err, uid)
		}
		for _, ip := range ips {
			if old, ok := owners[ip]; ok && old != uid {
				m.log.Warn("two pods claim one IP; the later UID wins", "ip", ip, "uids", []string{old, uid})
			}
			owners[ip] = uid
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.owners = owners
	m.removed = false
	m.synced = true
	if m.yielding() {
		// A newer agent is ready already (three agents on the node:
		// this one finished re-adopting after its successor did). Its
		// picture has the pods enrolled since it took the plugin
		// socket; ours does not. Our picture is written only if we are
		// in charge again (Reconcile), and Add and Remove stay
		// incremental meanwhile.
		m.log.Info("host probe rules: a newer agent is ready and maintains them; not rewriting them", "entries", len(owners))
		return nil
	}
	return m.reconcileLocked(context.Background(), true)
}

// Entries returns a copy of the IP → UID table the Manager maintains.
func (m *Manager) Entries() map[netip.Addr]string {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make(map[netip.Addr]string, len(m.owners))
	for k, v := range m.owners {
		out[k] = v
	}
	return out
}

// Reconcile checks the kernel once and rewrites whatever differs,
// counting a repair when something we had installed was missing.
func (m *Manager) Reconcile() error {
	if m.cfg.Yield != nil && m.cfg.Yield() {
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.removed || m.merging() {
		return nil
	}
	return m.reconcileLocked(context.Background(), false)
}

func (m *Manager) appliedLocked() {
	m.applied = make(map[netip.Addr]string, len(m.owners))
	for k, v := range m.owners {
		m.applied[k] = v
	}
	m.entries.Set(float64(len(m.owners)))
}

// reconcileLocked compares the kernel with what we last applied: a
// difference is drift (someone flushed or edited our rules) and counts as a
// repair. Then it writes the desired state if it differs or force is set
// (the caller changed the desired state or an incremental write failed).
func (m *Manager) reconcileLocked(ctx context.Context, force bool) error {
	drift, err := m.be.check(ctx, m.applied)
	ok := drift == ""
	if err != nil {
		m.failures.Inc()
		return fmt.Errorf("hostrules: check %s rules: %w", m.be.name(), err)
	}
	if ok && !force && sameEntries(m.applied, m.owners) {
		return nil
	}
	repair := !ok && m.installed
	if repair {
		m.log.Warn("host probe rules were missing or altered; rewriting them", "backend", m.be.name(), "drift", drift, "entries", len(m.owners))
	}
	if err := m.be.write(ctx, m.owners); err != nil {
		m.failures.Inc()
		return fmt.Errorf("hostrules: write %s rules: %w", m.be.name(), err)
	}
	if repair {
		m.repairs.Inc() // counted once the rules are back
	}
	m.installed = true
	m.appliedLocked()
	return nil
}

func sameEntries(a, b map[netip.Addr]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// Run installs the rules and re-asserts them every Config.Interval until
// ctx is done. Errors are logged and counted; the loop keeps going.
//
// With nftables it also listens to the kernel's change notifications, so
// a deletion of our table, chain, rules or set elements is repaired within
// milliseconds; the interval remains the safety net.
func (m *Manager) Run(ctx context.Context) {
	kicks := make(chan struct{}, 1)
	if w, ok := m.be.(watcher); ok {
		kick := func() {
			select {
			case kicks <- struct{}{}:
			default: // one pending kick is enough
			}
		}
		if err := w.watch(ctx, kick); err != nil {
			m.log.Warn("no nftables change notifications; relying on the interval", "err", err)
		}
	}
	if err := m.Reconcile(); err != nil {
		m.log.Error("host probe rules", "err", err)
	}
	t := time.NewTicker(m.cfg.Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-kicks:
		}
		if err := m.Reconcile(); err != nil {
			m.log.Error("host probe rules", "err", err)
		}
	}
}

// watcher is a backend that can report changes as they happen.
type watcher interface {
	watch(ctx context.Context, kick func()) error
}

// Uninstall removes the rules and sets. The Manager forgets its entries
// and a running Run loop stops re-asserting them; a later Add or Sync
// installs again.
func (m *Manager) Uninstall() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.owners = map[netip.Addr]string{}
	m.applied = nil
	m.installed = false
	m.removed = true
	m.entries.Set(0)
	if err := m.be.uninstall(); err != nil {
		return fmt.Errorf("hostrules: uninstall %s rules: %w", m.be.name(), err)
	}
	return nil
}

// ctxMutex is a mutex whose Lock can give up: a buffered channel of one.
type ctxMutex chan struct{}

func (c ctxMutex) Lock()   { c <- struct{}{} }
func (c ctxMutex) Unlock() { <-c }

// lockContext locks unless ctx ends first.
func (c ctxMutex) lockContext(ctx context.Context) error {
	select {
	case c <- struct{}{}:
		return nil
	default:
	}
	select {
	case c <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
