package tunnel

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"os"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
)

// This file is the agent's connection budget and each pod's share of it
// (docs/tunnel.md "Connection share"). One agent proxies every pod of its
// node; each connection it holds costs it memory and descriptors, and
// nothing but this bounds how many one pod may hold: its app through
// 15001, an authenticated peer's streams to its 15008, anyone on its
// 15006 in permissive mode. Without it one pod's ~50,000 idle
// connections are the agent's 1 GiB, and the OOM kill takes every pod's
// mesh with it.
//
// The rule, with B the budget, n the pods served and share =
// max(B/2/n, min(shareFloor, B/2)):
//
//   - while the agent holds fewer than B/2 connections, all pods
//     together, nothing is refused (a busy pod borrows what the others
//     do not use: no surprise limit in normal operation);
//   - past B/2, a pod holding fewer than its share still gets in; a pod
//     holding its share or more is refused;
//   - at B nothing gets in.
//
// So a pod can get its share whatever the others do, and the total
// stays within B: the connections admitted past a pod's share were
// admitted while the total was under B/2, and those within the shares
// add up to B/2. The last rule is for when the shares add up to more:
// the floor above B/2/n (a tiny budget on a node of very many pods), or
// pods that took a larger share before more pods came (what they hold
// stays, and every newcomer takes its share on top: with no hard bound
// B/2 times the harmonic sum of the pods, ~2.6·B for 110 pods arriving
// one by one, TestShareBudgetHoldsAsPodsArrive). Only then can a pod
// under its share be refused. Shares are B/2/n rather than B/n for the
// same reason: with B/n and borrowing up to B/2, a hog's borrowed half
// plus everyone's full share came to 1.5·B.
//
// The counts are two atomics (the pod's and the agent's) per connection
// on its way in and out; the share is recomputed only when a pod comes
// or goes.

// shareFloor is the least share of a pod (when the budget allows it): a
// node with very many pods still gives each enough for its ordinary
// traffic.
const shareFloor = 64

// connShare is a Proxy's budget and its live count.
type connShare struct {
	budget int64 // <= 0: counted, never refused
	free   int64 // budget/2: below it nothing is refused
	from   string
	total  atomic.Int64
	share  atomic.Int64

	// mu orders the pod changes: each stores the share of the count it
	// made. Unordered (an Add, then a Store), a change preempted between
	// the two stored its stale share over a newer one, and it stayed
	// until the next change (TestShareFollowsConcurrentPodChanges).
	mu   sync.Mutex
	pods int64
}

func (s *connShare) init(budget int64, from string) {
	s.budget, s.from = budget, from
	s.free = budget / 2
	s.share.Store(shareFor(budget, 0))
}

// podsChanged records a pod served (+1) or no longer (-1).
func (s *connShare) podsChanged(delta int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pods += delta
	s.share.Store(shareFor(s.budget, s.pods))
}

// shareFor is a pod's share of budget among pods.
func shareFor(budget, pods int64) int64 {
	if budget <= 0 {
		return math.MaxInt64
	}
	half := budget / 2
	return max(half/max(pods, 1), min(shareFloor, half))
}

// admitConn counts one more connection of sv, or refuses it (nothing
// counted) by the rule above; held is then what the pod holds and share
// its share. An admitted connection must be given back (connDone) on
// every way out.
func (sv *Serving) admitConn() (ok bool, held, share int64) {
	s := &sv.p.share
	c := sv.conns.Add(1)
	t := s.total.Add(1)
	if s.budget <= 0 || t <= s.free {
		return true, 0, 0
	}
	share = s.share.Load()
	if c <= share && t <= s.budget {
		return true, 0, 0
	}
	sv.conns.Add(-1)
	s.total.Add(-1)
	return false, c - 1, share
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
// once a second per pod (a pod over its share may be refused thousands
// of times a second, and a line for each would be the agent's CPU): the
// line names the pod, what it holds, its share, the budget and the
// setting to raise.
func (sv *Serving) shed(r *record, held, share int64) {
	sv.p.m.failed.WithLabelValues(r.dir, overShare, orUnknown(r.srcID), orUnknown(r.dstID)).Inc()
	ok, suppressed := sv.shedLog.take(time.Now())
	if !ok {
		return
	}
	s := &sv.p.share
	msg := "connection refused: the pod holds its share of the agent's connections or more, and the agent is past half its budget"
	if held < share {
		msg = "connection refused: the agent holds its whole budget of connections"
	}
	sv.log.LogAttrs(context.Background(), slog.LevelWarn, msg,
		slog.String("direction", r.dir), slog.String("src", r.src.String()),
		slog.Int64("pod_connections", held), slog.Int64("share", share),
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

// shareCollector exports the budget, the agent's count and, for pods
// over their share only, each one's count: a gauge per pod for every pod
// would be a series per pod name in the cluster, born and gone with each
// rollout; the pods over their share are the ones an operator acts on.
type shareCollector struct {
	p                        *Proxy
	budget, held, share, pod *prometheus.Desc
}

func newShareCollector(p *Proxy) *shareCollector {
	return &shareCollector{
		p: p,
		budget: prometheus.NewDesc("ambit_tunnel_connection_budget",
			"The agent's budget of proxied connections, all pods together (maxConnections; 0: none).", nil, nil),
		held: prometheus.NewDesc("ambit_tunnel_connections_held",
			"Proxied connections the agent holds now, all pods, established or being set up (counted against the budget).", nil, nil),
		share: prometheus.NewDesc("ambit_tunnel_connection_share",
			"A pod's share of the budget now: past half the budget, a pod holding this many or more gets no new connection.", nil, nil),
		pod: prometheus.NewDesc("ambit_tunnel_pod_connections_over_share",
			"Connections held by each pod holding more than its share (only those pods).", []string{"pod"}, nil),
	}
}

func (c *shareCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.budget
	ch <- c.held
	ch <- c.share
	ch <- c.pod
}

func (c *shareCollector) Collect(ch chan<- prometheus.Metric) {
	s := &c.p.share
	share := s.share.Load()
	ch <- prometheus.MustNewConstMetric(c.budget, prometheus.GaugeValue, float64(max(s.budget, 0)))
	ch <- prometheus.MustNewConstMetric(c.held, prometheus.GaugeValue, float64(s.total.Load()))
	if s.budget > 0 {
		ch <- prometheus.MustNewConstMetric(c.share, prometheus.GaugeValue, float64(share))
	}
	c.p.mu.Lock()
	over := make([]*Serving, 0)
	for sv := range c.p.servings {
		if sv.conns.Load() > share {
			over = append(over, sv)
		}
	}
	c.p.mu.Unlock()
	for _, sv := range over {
		w := sv.pod.Workload
		ch <- prometheus.MustNewConstMetric(c.pod, prometheus.GaugeValue, float64(sv.conns.Load()), w.Namespace+"/"+w.Name)
	}
}
