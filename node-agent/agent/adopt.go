package agent

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ambit-mesh/ambit/node-agent/cluster"
	"github.com/ambit-mesh/ambit/node-agent/health"
	"github.com/ambit-mesh/ambit/node-agent/state"
	"github.com/ambit-mesh/ambit/plugin/redirect"
)

// adopt re-adopts every pod recorded by a previous agent: finds its netns
// (recorded path verified by inode and pod IP, else the /proc scan), opens
// its listeners beside the old agent's (SO_REUSEPORT), and verifies and
// repairs its rules. Records of pods that are gone are dropped. It returns
// the number of enrolled pods adopted and the names of the records read.
func (a *Agent) adopt(ctx context.Context) (int, map[string]bool) {
	recs, errs := a.store.List()
	for _, err := range errs {
		a.log.Warn("pod record unreadable", "err", err)
	}
	if adoptListed != nil {
		adoptListed(a) // a test serving a DEL here
	}
	var n atomic.Int64
	var scan lazyScan
	sem := make(chan struct{}, a.cfg.AdoptConcurrency)
	var wg sync.WaitGroup
	for _, rec := range recs {
		if ctx.Err() != nil {
			break
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if a.adoptOne(ctx, rec, &scan) {
				n.Add(1)
			}
		}()
	}
	wg.Wait()
	return int(n.Load()), namesOf(recs)
}

func (a *Agent) adoptOne(ctx context.Context, rec state.Pod, scan *lazyScan) bool {
	unlock := a.lock(rec.Namespace, rec.Name)
	defer unlock()
	// Again under the pod's lock: the plugin socket is served while
	// adoption runs, and a DEL of this sandbox served since the list
	// (under this lock, finding no pod yet) removed the record; adopting
	// from the listed copy would serve a deleted sandbox and hold its
	// netns, on a lone agent until a GC. A record that cannot be read
	// again for another reason is adopted as listed.
	if cur, err := a.store.Read(state.FileName(rec.ContainerID)); err == nil {
		rec = cur
	} else if errors.Is(err, os.ErrNotExist) {
		a.log.Info("recorded pod deleted while the records were being adopted", "pod", rec.Namespace+"/"+rec.Name)
		return false
	}
	p := a.adoptLocked(ctx, rec, scan)
	if p == nil {
		return false
	}
	// Rules are verified after the agent is ready (verifyAdopted): the
	// check execs iptables-save, and serving every pod again comes first.
	a.mu.Lock()
	a.toVerify = append(a.toVerify, p)
	a.mu.Unlock()
	return true
}

// adoptLocked is adoptOne under the pod's lock. It returns the pod it
// serves, nil if none: whoever adopted it has its rules checked
// (verifyPod), adoption at start after ready, the watcher at once.
func (a *Agent) adoptLocked(ctx context.Context, rec state.Pod, scan *lazyScan) *pod {
	start := time.Now()
	orig := rec
	podName := rec.Namespace + "/" + rec.Name
	f, rec, err := a.locate(rec, podKey{rec.Namespace, rec.Name, rec.UID}, rec.IPs, scan)
	if err != nil {
		if errors.Is(err, errNotRunning) {
			a.log.Info("recorded pod is gone, forgetting it", "pod", podName, "err", err)
			a.store.Delete(rec.ContainerID)
			return nil
		}
		if !a.keepOrDropLocked(ctx, orig) {
			return nil // outlived its sandbox and its pod (kept.go)
		}
		if reasonOf(err) == reasonNetnsOwner {
			// Its sandbox went while no agent ran and its IP is another
			// pod's now: not that pod's namespace to serve it in.
			// Status says why; the live enrollment looks again.
			a.m.failures.WithLabelValues(reasonNetnsOwner).Inc()
			a.setStatus(cluster.Pod{Namespace: rec.Namespace, Name: rec.Name, UID: rec.UID, IPs: rec.IPs}, "failed", eventNetnsOwner, message(err))
			a.log.Warn("recorded pod's IPs are in another pod's netns; not adopting it there, keeping the record for the next pass", "pod", podName, "err", err)
			return nil
		}
		a.log.Warn("recorded pod's netns not found; keeping the record for the next pass", "pod", podName, "err", err)
		return nil
	}
	// A guard an agent that died mid-drain left there (drainguard.go),
	// whatever the pod is now.
	a.sweepDrainGuard(f, rec.Netns, podName)
	if l, ok := a.view.(Learner); ok && len(rec.IPs) > 0 {
		l.Learn(rec.Namespace, rec.Name, rec.UID, rec.IPs)
	}
	p := &pod{rec: rec}
	a.register(p)
	if !rec.Enrolled {
		f.Close()
		if rec.Netns != orig.Netns || rec.NetnsInode != orig.NetnsInode {
			a.rewrite(rec) // refreshed by the scan
		}
		return nil
	}
	cctx, cancel := context.WithTimeout(ctx, a.cfg.RequestTimeout.Duration)
	defer cancel()
	cp, found, err := a.view.Pod(cctx, rec.Namespace, rec.Name)
	if err != nil || !found {
		// Keep serving what was enrolled until the API or a DEL says
		// otherwise: failing closed beats dropping a pod's listeners.
		cp = cluster.Pod{Namespace: rec.Namespace, Name: rec.Name, UID: rec.UID, ServiceAccount: saOf(rec.Identity), IPs: rec.IPs, NodeName: a.cfg.NodeName}
	} else {
		var nsp *cluster.Namespace
		if n, ok := a.view.Namespace(rec.Namespace); ok {
			nsp = &n
		}
		if d := a.policy.Decide(cp, nsp); !d.Enroll {
			// Unlabelled while no agent ran.
			p.netns = f
			if err := a.rules.Uninstall(loopCtx, f); err != nil {
				a.log.Warn("removing redirection of a pod unenrolled while the agent was away", "pod", podName, "err", err)
			}
			p.netns = nil
			f.Close()
			a.setRec(p, func(r *state.Pod) { r.Enrolled, r.Backend = false, "" })
			a.rewrite(p.rec)
			a.setStatus(cp, "", "", "")
			a.log.Info("pod unenrolled while the agent was away", "pod", podName, "reason", d.Reason)
			return nil
		}
		if cp.UID == "" {
			cp.UID = rec.UID
		}
		if len(cp.IPs) == 0 {
			cp.IPs = rec.IPs
		}
	}
	// The families this agent captures (both unless ipv6: off), not the
	// record's: agents before session 16 captured an IPv4-only pod's
	// IPv4 alone, which let IPv6 link-local plaintext between enrolled
	// pods through (TestLinkLocalIPv6IsCaptured). The check after
	// re-adoption installs the rest (a repair, once per such pod;
	// TestReadoptionWidensToBothFamilies).
	spec := a.specFor(rec.IPs, f)
	p.spec = spec
	a.setRec(p, func(r *state.Pod) { r.IPv4, r.IPv6 = spec.IPv4, spec.IPv6 })
	wl := a.workload(cp)
	if len(rec.IPs) > 0 {
		// The record's IPs, as at ADD: the ones its namespace was found
		// by and its host entries name. The view's may still be a
		// previous sandbox's, and the tunnel reset traffic to the pod's
		// real IP as another pod's (TestReadoptionServesTheRecordsIPs).
		wl.IPs = slices.Clone(rec.IPs)
	}
	if wl.Identity != rec.Identity && rec.Identity != "" && cp.ServiceAccount == "" {
		wl.Identity = rec.Identity
	}
	a.setRec(p, func(r *state.Pod) { r.Identity = wl.Identity })
	if err := a.serve(p, f, wl, false); err != nil {
		f.Close()
		a.m.failures.WithLabelValues(reasonOf(err)).Inc()
		why := "AdoptionFailed"
		if reasonOf(err) == reasonNetnsOwner {
			// Another pod is served there: the record keeps naming
			// the namespace it named.
			why = eventNetnsOwner
			a.setRec(p, func(r *state.Pod) { r.Netns, r.NetnsInode = orig.Netns, orig.NetnsInode })
		}
		a.setStatus(cp, "failed", why, err.Error())
		a.log.Error("re-adopting pod failed; its connections are refused until it is fixed", "pod", podName, "err", err)
		return nil
	}
	if p.rec.Netns != orig.Netns || p.rec.NetnsInode != orig.NetnsInode || p.rec.Identity != orig.Identity || p.rec.MigrateReq != orig.MigrateReq ||
		p.rec.IPv4 != orig.IPv4 || p.rec.IPv6 != orig.IPv6 {
		a.rewrite(p.rec)
	}
	// Listening again, rules kept from the agent before (verified next):
	// the pod is meshed. Usually its annotation says so already and
	// nothing is written; if the write after its ADD was lost (an API
	// error, the agent died first), this is what repairs it.
	a.setStatus(cp, "enabled", "", "")
	a.m.adopted.Inc()
	a.m.latency.WithLabelValues("adopt").Observe(time.Since(start).Seconds())
	return p
}

// saOf extracts the service account from spiffe://td/ns/N/sa/S.
func saOf(identity string) string {
	if i := strings.LastIndex(identity, "/sa/"); i >= 0 {
		return identity[i+4:]
	}
	return "default"
}

// verifyAdopted checks the rules of every re-adopted pod and repairs what
// is missing or different, a few pods at a time.
func (a *Agent) verifyAdopted(ctx context.Context) {
	a.mu.Lock()
	pods := a.toVerify
	a.toVerify, a.verifyTaken = nil, true
	a.mu.Unlock()
	a.verifyPods(ctx, pods, a.live.rulesBeat())
	a.log.Info("rules of re-adopted pods verified", "pods", len(pods))
	a.auditLoop(ctx)
}

// verifyPods runs verifyPod over pods, a few at a time, and records how
// long the pass took; hb (nil: none) beats after each pod.
func (a *Agent) verifyPods(ctx context.Context, pods []*pod, hb *health.Heartbeat) {
	start := time.Now()
	defer func() { a.m.ruleCheck.Observe(time.Since(start).Seconds()) }()
	sem := make(chan struct{}, 4)
	var wg sync.WaitGroup
	for _, p := range pods {
		if ctx.Err() != nil || a.stopping.Load() {
			break
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			a.verifyPod(p)
			beat(hb, 0)
		}()
	}
	wg.Wait()
}

// auditLoop verifies every enrolled pod's redirection each
// RuleCheckInterval and repairs what differs: rules flushed by someone in
// the pod (an init container running `iptables -F`, a tool resetting
// nftables) would otherwise let its traffic bypass the mesh until the
// next agent restart. A few pods at a time, so a node of many pods costs
// a short burst a minute, not a stall.
func (a *Agent) auditLoop(ctx context.Context) {
	every := a.cfg.RuleCheckInterval.Duration
	var tickC <-chan time.Time
	if every > 0 {
		tick := time.NewTicker(every)
		defer tick.Stop()
		tickC = tick.C
	} else if a.peers == nil {
		return
	}
	// (With checks off, the loop still sweeps the drain guards met while
	// another agent ran, once none runs: drainguard.go.)
	// While another agent runs on the node (a surge, a rollback), its
	// checks may put its own version's rules back in pods this one has
	// verified: an agent before session 17 takes the link-local refusal
	// out, one before session 16 an IPv4-only pod's IPv6 capture. Once it
	// is gone nothing else writes them, so they are verified at once, not
	// up to a RuleCheckInterval later (s17d: a pod the newer agent
	// enrolled during the surge, reverted by the older agent adopting its
	// record, kept the older rules for up to 1 m after the older exited).
	var othersTick <-chan time.Time
	if a.peers != nil {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		othersTick = t.C
	}
	hadOthers := a.otherAgents()
	hb := a.live.rulesBeat()
	for {
		// Due within a tick; a pass beats after each pod.
		beat(hb, every)
		select {
		case <-ctx.Done():
			return
		case <-tickC:
		case <-othersTick:
			others := a.otherAgents()
			gone := hadOthers && !others
			hadOthers = others
			if !others && leftDrainGuards() {
				// Not only when seen going: it may have gone
				// before this loop started.
				a.sweepLeftDrainGuards()
			}
			if !gone || every <= 0 {
				continue
			}
			a.log.Info("no other agent runs on the node: verifying every pod's rules now")
		}
		beat(hb, 0)
		a.mu.Lock()
		pods := make([]*pod, 0, len(a.byCID))
		for _, p := range a.byCID {
			if p.enrolled() {
				pods = append(pods, p)
			}
		}
		a.mu.Unlock()
		a.verifyPods(ctx, pods, hb)
		a.resyncKeeper(pods)
	}
}

// resyncKeeper puts every served pod's listeners to the keeper again when
// it holds fewer entries than there are pods: its container restarted
// (it starts empty), and until then a crash of this agent would close
// those pods' listeners.
func (a *Agent) resyncKeeper(pods []*pod) {
	hb := a.live.rulesBeat()
	if a.keeper == nil || a.stopping.Load() {
		return
	}
	n, _, err := a.keeper.Count()
	if err != nil {
		a.m.keeperErrors.WithLabelValues("count").Inc()
		return
	}
	if n >= len(pods) {
		return
	}
	put := 0
	for _, p := range pods {
		unlock := a.lockOf(p)
		if p.enrolled() && len(p.lns) > 0 {
			if err := a.keeper.Put(p.rec.ContainerID, p.lns...); err != nil {
				a.m.keeperErrors.WithLabelValues("put").Inc()
			} else {
				put++
			}
		}
		unlock()
		// Each put waits up to the keeper's call time-out (2 s).
		beat(hb, 0)
	}
	a.log.Info("keeper held fewer pods than served (restarted?): listeners put again", "kept", n, "pods", len(pods), "put", put)
}

func (a *Agent) verifyPod(p *pod) {
	unlock := a.lockOf(p)
	defer unlock()
	if !p.enrolled() || p.netns == nil {
		return // deleted or unenrolled meanwhile
	}
	name := p.rec.Namespace + "/" + p.rec.Name
	err := a.rules.Recheck(loopCtx, p.netns, p.spec, &p.checked)
	if err == nil {
		p.repairFailing = false
		return
	}
	lvl := slog.LevelWarn
	if p.repairFailing {
		lvl = slog.LevelDebug // said at the first failed repair
	}
	a.log.Log(loopCtx, lvl, "redirection differs from what it should be, repairing", "pod", name, "problem", err)
	// With the engine the rules were installed with (the conflist's
	// ruleBackend, or what auto chose then), not a new choice: before,
	// every repaired iptables pod moved to nftables. If that engine
	// fails (its tools gone from the node), any working one: a pod's
	// capture comes before its engine.
	// A record with no engine (a version 1 ambit-cni installed the rules
	// itself) takes the engine its live rules are in: before, it got the
	// default, and an iptables pod moved to nftables at the repair that
	// widened it to both families.
	engine := redirect.Backend(p.rec.Backend)
	if engine == "" {
		engine = a.liveEngine(p.netns)
	}
	backend, err := a.rules.Install(loopCtx, p.netns, engine, p.spec)
	if err != nil && engine != "" {
		a.log.Log(loopCtx, lvl, "repairing redirection with the pod's rule engine failed; trying any", "pod", name, "backend", engine, "err", err)
		backend, err = a.rules.Install(loopCtx, p.netns, "", p.spec)
	}
	if err != nil {
		if p.repairFailing {
			a.log.Debug("repairing redirection failed again", "pod", name, "err", err)
			return
		}
		p.repairFailing = true
		a.m.failures.WithLabelValues("redirect").Inc()
		a.log.Error("repairing redirection failed; each rule check retries, logged again only once it succeeds", "pod", name, "err", err)
		return
	}
	if p.repairFailing {
		p.repairFailing = false
		a.log.Info("redirection repaired after failed attempts", "pod", name, "backend", backend)
	}
	a.m.repairs.Inc()
	a.setRec(p, func(r *state.Pod) { r.Backend = backend })
	a.rewrite(p.rec)
}

// liveEngine names the one engine holding rules of ours in netns, ""
// when none or several do or the look fails (then the default engine
// repairs, as before).
func (a *Agent) liveEngine(netns *os.File) redirect.Backend {
	found, err := a.rules.Installed(loopCtx, netns)
	if err != nil || len(found) != 1 {
		return ""
	}
	return found[0]
}

// rewrite writes the record of a pod this agent serves again (refreshed
// or repaired), unless it was removed: another agent of the node removes
// a record when it serves the pod's DEL (a surge upgrade), and writing
// it back would hide that removal from this agent's record following
// (peers.go), which then never releases the pod. Alone on the node, a
// record removed by hand is not brought back either.
func (a *Agent) rewrite(rec state.Pod) {
	if _, err := a.store.Update(rec); err != nil {
		a.log.Warn("persisting pod record", "pod", rec.Namespace+"/"+rec.Name, "err", err)
	}
}

// adoptListed, if set, runs between the list of the records and their
// adoption (tests: a DEL served there).
var adoptListed func(*Agent)
