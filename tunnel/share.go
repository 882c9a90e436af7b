package tunnel

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"os"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
)

// This file is the agent's connection budget and how it is shared among
// pods under pressure (docs/tunnel.md "Connection share"). One agent
// proxies every pod of its node; each connection it holds costs it
// memory and descriptors, and nothing but this bounds how many one pod
// may hold: its app through 15001, an authenticated peer's streams to
// its 15008, anyone on its 15006 in permissive mode. Without it one
// pod's ~50,000 idle connections are the agent's 1 GiB, and the OOM kill
// takes every pod's mesh with it.
//
// The rule, with B the budget, T = 3/4·B and C = 7/8·B:
//
//   - while the agent holds fewer than T connections, all pods together,
//     nothing is refused: a busy pod (an ingress with 5,000 clients, a
//     database with 500) is normal operation, not a reason to refuse;
//   - at or past T, a pod is refused when it holds at least the water
//     level L: the max-min fair level of what the pods hold for a
//     capacity C (sort the counts, fill from the smallest; L is where
//     sum(min(count, L)) reaches C, and none while they all fit). The
//     biggest holders are capped first, at what a fair split of C would
//     give them, and a pod below L still gets in;
//   - past B nothing gets in (the hard bound of session 11's review).
//
// So under pressure the pods causing it are shed, whatever their
// number, and the others have C..B as reserve. A single share per pod
// (B/2/n, the rule before) refused an ingress of 5,000 on a node of 110
// pods past B/2 with the agent at a quarter of its memory.
//
// Below T admission is two atomic adds and a compare. L is computed
// only at or past T, lazily, at most every levelEvery, under a mutex,
// from every pod served and every pod still draining after Close (what
// it holds counts against it until it ends), a pod served twice (a
// re-enrollment beside its draining Serving) counted once with the sum
// of its Servings; between two computations admissions use the cached
// L. What a pod holds is never cut to make room.

// levelEvery is how long a computed water level is used before the
// next admission past T computes it again: the counts of a node's pods
// move little in 10 ms, and a computation (a lock, the pods' counts,
// a sort) for each of thousands of connections a second would be the
// cost the fast path avoids.
const levelEvery = 10 * time.Millisecond

// refusedWindow is how long a pod stays in
// ambit_tunnel_pod_connections_over_share after its last refusal: at
// least one scrape at Prometheus's default interval (1 min) sees it.
const refusedWindow = time.Minute

// connShare is a Proxy's budget, its live count and the water level.
type connShare struct {
	budget   int64 // <= 0: counted, never refused
	thresh   int64 // T: below it nothing is refused
	capacity int64 // C: what the water level shares out
	from     string
	total    atomic.Int64

	// every is levelEvery (tests set 0: computed at each admission past
	// T). epoch is the monotonic origin of levelAt and Serving.refusedAt
	// (a wall clock stepped back would keep a stale level for as long).
	every time.Duration
	epoch time.Time

	// level is the last water level computed (math.MaxInt64 while every
	// pod fits), levelAt when (since epoch; 0: never) and levelUntil the
	// agent's count from which it is stale however recent: while every
	// pod fits, the count at which they may no longer (the room left
	// under C); else a 64th of the budget on. So a burst of admissions
	// cannot run past C on a level computed before it. mu makes one
	// computation at a time: those arriving meanwhile wait and then use
	// its result.
	level      atomic.Int64
	levelAt    atomic.Int64
	levelUntil atomic.Int64
	mu         sync.Mutex
	// computeLevel's buffers (s.mu).
	svs         []*Serving
	own, counts []int64
	held        map[string]int64

	// shedLog caps the refusal lines of all pods together (each pod has
	// its own once a second): a hundred pods refused at once would
	// otherwise write a hundred lines a second.
	shedLog logLimiter
}

func (s *connShare) init(budget int64, from string) {
	s.budget, s.from = budget, from
	s.thresh = budget / 4 * 3
	s.capacity = budget / 8 * 7
	if budget > 0 {
		s.thresh, s.capacity = max(s.thresh, 1), max(s.capacity, 1)
	}
	s.every, s.epoch = levelEvery, time.Now()
	s.level.Store(math.MaxInt64)
	s.shedLog.perSecond = 10
}

// now is the time since epoch, never 0.
func (s *connShare) now() int64 { return int64(time.Since(s.epoch)) + 1 }

// waterLevel is the max-min fair level of counts for capacity: the
// largest L with sum(min(count, L)) <= capacity once the counts add up
// to capacity or more, math.MaxInt64 (and the room left) while they add
// up to less. counts is sorted in place.
func waterLevel(counts []int64, capacity int64) (level, room int64) {
	slices.Sort(counts)
	left := capacity
	for i, n := range counts {
		k := int64(len(counts) - i)
		// This and every larger count at n would take n·k: once that
		// reaches what is left, the level is an even split of it.
		if n*k >= left {
			return left / k, 0
		}
		left -= n
	}
	return math.MaxInt64, left
}

// fresh is whether the cached level may be used with the agent at t
// connections.
func (s *connShare) fresh(t int64) bool {
	at := s.levelAt.Load()
	return at != 0 && s.now()-at < int64(s.every) && t < s.levelUntil.Load()
}

// currentLevel is the water level with the agent at t connections: the
// cached one while fresh, else computed again from the pods' counts.
func (p *Proxy) currentLevel(t int64) int64 {
	s := &p.share
	if s.fresh(t) {
		return s.level.Load()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.fresh(t) {
		return s.level.Load() // computed while this one waited
	}
	return p.computeLevel(t)
}

// computeLevel computes the water level with the agent at t connections
// and caches it (s.mu held). Past T it runs every 10 ms or so: it reuses
// its buffers (a map and slices per computation were 70-110 µs for 110
// pods, most of it allocation).
func (p *Proxy) computeLevel(t int64) int64 {
	s := &p.share
	total := s.total.Load()
	svs := s.svs[:0]
	p.mu.Lock()
	for sv := range p.servings {
		svs = append(svs, sv)
	}
	for sv := range p.draining {
		svs = append(svs, sv)
	}
	p.mu.Unlock()
	if s.held == nil {
		s.held = map[string]int64{}
	}
	clear(s.held)
	own := s.own[:0]
	for _, sv := range svs {
		n := sv.conns.Load()
		own = append(own, n)
		s.held[sv.key] += n
	}
	counts := s.counts[:0]
	for _, n := range s.held {
		counts = append(counts, n)
	}
	l, room := waterLevel(counts, s.capacity)
	for i, sv := range svs {
		sv.peers.Store(s.held[sv.key] - own[i])
	}
	clear(svs) // not to keep closed Servings alive
	s.svs, s.own, s.counts = svs[:0], own[:0], counts[:0]
	if l != math.MaxInt64 {
		room = s.budget / 64
	}
	s.level.Store(l)
	s.levelUntil.Store(max(total, t) + max(room, 1))
	s.levelAt.Store(s.now())
	return l
}

// podGroup is one pod's Servings (more than one while a re-enrolled pod's
// old Serving drains) and what they hold together.
type podGroup struct {
	svs  []*Serving
	held int64
}

// podGroups groups the Servings served and draining by pod.
func (p *Proxy) podGroups() map[string]*podGroup {
	groups := map[string]*podGroup{}
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, set := range []map[*Serving]struct{}{p.servings, p.draining} {
		for sv := range set {
			g := groups[sv.key]
			if g == nil {
				g = &podGroup{}
				groups[sv.key] = g
			}
			g.svs = append(g.svs, sv)
			g.held += sv.conns.Load()
		}
	}
	return groups
}

// admitConn counts one more connection of sv, or refuses it (nothing
// counted) by the rule above; held is then what the pod holds and level
// the water level it was refused at (0 when refused by the hard bound
// alone). An admitted connection must be given back (connDone) on every
// way out.
func (sv *Serving) admitConn() (ok bool, held, level int64) {
	s := &sv.p.share
	c := sv.conns.Add(1)
	t := s.total.Add(1)
	if s.budget <= 0 || t <= s.thresh {
		return true, 0, 0
	}
	if t <= s.budget {
		level = sv.p.currentLevel(t)
		// peers is what the pod's other Servings held at the last
		// computation: a pod served twice has one level, not two.
		if c+sv.peers.Load() <= level {
			return true, 0, 0
		}
	}
	sv.conns.Add(-1)
	s.total.Add(-1)
	sv.refusedAt.Store(s.now())
	return false, c - 1 + sv.peers.Load(), level
}

// connDone gives back a connection admitConn counted.
func (sv *Serving) connDone() {
	sv.conns.Add(-1)
	sv.p.share.total.Add(-1)
}

// Connections is how many proxied connections the pod holds now
// (outbound from it, inbound to it, established or being set up).
func (sv *Serving) Connections() int { return int(sv.conns.Load()) }

// Connections is how many proxied connections the Proxy holds now, all
// pods together, and its budget (0: none).
func (p *Proxy) Connections() (held, budget int) {
	return int(p.share.total.Load()), int(max(p.share.budget, 0))
}

// overShare is the reason a connection refused by the share is counted
// under (ambit_tunnel_connections_failed_total), and the value of
// refusedHeader on the 503 that refuses such an HBONE stream.
const overShare = "over_share"

// shed counts a connection refused by the share and logs it, at most
// once a second per pod and ten times a second for the agent (a pod
// refused thousands of times a second, or a hundred pods at once, would
// otherwise be the agent's CPU and the node's log volume): the line
// names the pod, what it holds, the water level, the budget and the
// setting to raise.
func (sv *Serving) shed(r *record, held, level int64) {
	sv.p.m.failed.WithLabelValues(r.dir, overShare, orUnknown(r.srcID), orUnknown(r.dstID)).Inc()
	now := time.Now()
	ok, suppressed := sv.shedLog.take(now)
	if !ok {
		return
	}
	s := &sv.p.share
	if ok, _ := s.shedLog.take(now); !ok {
		// The agent's lines are spent: this pod's line is one more it
		// did not log, said in its next one.
		sv.shedLog.mu.Lock()
		sv.shedLog.suppressed += suppressed + 1
		sv.shedLog.mu.Unlock()
		return
	}
	msg := "connection refused: the agent is past 3/4 of its connection budget and the pod holds the water level or more"
	if level == 0 || held < level {
		msg = "connection refused: the agent holds its whole budget of connections"
	}
	lv := level
	if lv == math.MaxInt64 {
		lv = 0
	}
	sv.log.LogAttrs(context.Background(), slog.LevelWarn, msg,
		slog.String("direction", r.dir), slog.String("src", r.src.String()),
		slog.Int64("pod_connections", held), slog.Int64("level", lv),
		slog.Int64("agent_connections", s.total.Load()), slog.Int64("budget", s.budget),
		slog.String("budget_from", s.from), slog.String("setting", "maxConnections"),
		slog.Int("refused_not_logged", suppressed))
}

// DefaultMaxConnections is the budget an agent gets when none is set:
// the smaller of what its memory and its descriptors allow, and where it
// comes from (for the logs).
//
// Memory: three quarters of the limit the process knows (GOMEMLIMIT, else
// its cgroup's limit, else the machine's RAM; the last quarter is the
// rest of the agent: informers, certificates, pending handshakes, the
// Go runtime), at connCost a connection. Descriptors: RLIMIT_NOFILE less
// a reserve (the pending handshakes' cap and 1,024 for the rest), two a
// connection (the app's socket and the other side's).
func DefaultMaxConnections() (int, string) {
	mem, memFrom := memoryLimit()
	byMem := mem / 4 * 3 / connCost
	var rl unix.Rlimit
	byFD := int64(math.MaxInt64)
	fdFrom := "RLIMIT_NOFILE unknown"
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err == nil && rl.Cur < math.MaxInt64/2 {
		nofile := int64(rl.Cur)
		reserve := min(4096+1024, nofile/2)
		byFD = (nofile - reserve) / 2
		fdFrom = fmt.Sprintf("RLIMIT_NOFILE %d", nofile)
	}
	n := min(byMem, byFD)
	from := fmt.Sprintf("%s (%d MiB) at %d KiB a connection: %d; %s: %d", memFrom, mem>>20, connCost>>10, byMem, fdFrom, byFD)
	// Below this the agent is configured to starve anyway; keep enough for
	// a small node to work.
	return int(max(n, 1024)), from
}

// connCost is what a connection costs the agent in memory, with
// headroom. BenchmarkConnMemoryProcs (agents as processes, resident
// memory, GC slack included, 500 connections) measured a side of a
// connection at 11.8 KiB held idle, 21 KiB doing 1 KiB round trips back
// to back and 71 KiB streaming bulk (the pump's buffers and the data in
// flight): 32 KiB covers the first two, which is what a node's thousands
// of connections are; a node where thousands stream at once at full
// speed is CPU-bound long before, and can set maxConnections.
const connCost = 32 << 10

// memoryLimit is the memory the agent may use and where that figure
// comes from.
func memoryLimit() (int64, string) {
	if l := debug.SetMemoryLimit(-1); l > 0 && l < math.MaxInt64 {
		return l, "GOMEMLIMIT"
	}
	var si unix.Sysinfo_t
	ram := int64(0)
	if unix.Sysinfo(&si) == nil {
		ram = int64(si.Totalram) * int64(si.Unit)
	}
	for _, f := range []string{"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"} {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		v, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
		if err == nil && v > 0 && (ram == 0 || v < ram) {
			return v, "cgroup memory limit"
		}
	}
	if ram > 0 {
		return ram, "RAM"
	}
	return 1 << 30, "assumed 1 GiB"
}

// shareCollector exports the budget, the agent's count, the water level
// and, for pods refused in the last refusedWindow only, each one's
// count: a gauge per pod for every pod would be a series per pod name in
// the cluster, born and gone with each rollout; the pods refused are the
// ones an operator acts on.
type shareCollector struct {
	p                        *Proxy
	budget, held, level, pod *prometheus.Desc
}

func newShareCollector(p *Proxy) *shareCollector {
	return &shareCollector{
		p: p,
		budget: prometheus.NewDesc("ambit_tunnel_connection_budget",
			"The agent's budget of proxied connections, all pods together (maxConnections; 0: none).", nil, nil),
		held: prometheus.NewDesc("ambit_tunnel_connections_held",
			"Proxied connections the agent holds now, all pods, established or being set up (counted against the budget).", nil, nil),
		level: prometheus.NewDesc("ambit_tunnel_connection_water_level",
			"At or past 3/4 of the budget, a pod holding this many connections or more gets no new one (the max-min fair level of the pods' counts for 7/8 of the budget; the budget itself while they all fit). 0: below 3/4 of the budget, nothing is refused.", nil, nil),
		pod: prometheus.NewDesc("ambit_tunnel_pod_connections_over_share",
			"Connections held by each pod refused a connection by the connection share in the last minute (only those pods).", []string{"pod"}, nil),
	}
}

func (c *shareCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.budget
	ch <- c.held
	ch <- c.level
	ch <- c.pod
}

func (c *shareCollector) Collect(ch chan<- prometheus.Metric) {
	s := &c.p.share
	held := s.total.Load()
	ch <- prometheus.MustNewConstMetric(c.budget, prometheus.GaugeValue, float64(max(s.budget, 0)))
	ch <- prometheus.MustNewConstMetric(c.held, prometheus.GaugeValue, float64(held))
	if s.budget > 0 {
		level := int64(0)
		if held >= s.thresh {
			// Computed now, not the cached one: a scrape is rare, and
			// should show the level the counts give.
			s.mu.Lock()
			level = min(c.p.computeLevel(held), s.budget)
			s.mu.Unlock()
		}
		ch <- prometheus.MustNewConstMetric(c.level, prometheus.GaugeValue, float64(level))
	}
	now := s.now()
	for k, g := range c.p.podGroups() {
		for _, sv := range g.svs {
			if at := sv.refusedAt.Load(); at != 0 && now-at < int64(refusedWindow) {
				ch <- prometheus.MustNewConstMetric(c.pod, prometheus.GaugeValue, float64(g.held), k)
				break
			}
		}
	}
}
