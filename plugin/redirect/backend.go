package redirect

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os/exec"
	"strings"
	"sync"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// concrete are the backends that hold state.
var concrete = []Backend{Nftables, IptablesNft, IptablesLegacy}

// Install applies spec inside netns atomically and idempotently and
// returns the backend used. Whatever another backend of ours left in the
// netns is removed, so switching backends never leaves two rule sets. On
// error nothing of ours is left behind, or the error says what could not
// be removed; except an install that did not start (ctx already done, or
// a tool the backend needs missing from the node), which leaves the
// netns as it was: a pod's rules already there stay.
//
// Install returns by ctx's deadline, unless a cut install's removal
// needs longer. The work stops early enough to keep the time its own
// rollback will take (installBudget: sized from this install's runs, at
// least reserveFloor, at most cleanupReserve or half the time): a run
// cut at its end (the legacy restores wait for the host's xtables lock)
// can leave what the runs before it applied (routes, the IPv4 rules, a
// table of two), and that is removed in the time kept, or, when that
// is not enough (the runs slower after the cut than before it), in at
// most rollbackBound from the cut: a removal cut half-way is the half
// rule set the rollback is there to prevent. The error of a cut
// install wraps ctx's error (context.DeadlineExceeded): the caller can
// answer "retry". The install is not cut short when ctx has no
// deadline and is not canceled; each iptables run then has its own
// bound (WithRunTimeout, 10 s), and a run stopped there fails the
// install with ErrRunTimeout, not DeadlineExceeded: the tool failed,
// the caller's time is not up.
func Install(ctx context.Context, netns ns.NetNS, backend Backend, spec Spec) (Backend, error) {
	if err := spec.Validate(); err != nil {
		return "", err
	}
	if err := ctx.Err(); err != nil {
		// Nothing applied, nothing to undo: a pod's rules already
		// there (a repeated ADD) stay.
		return "", fmt.Errorf("installing redirection: not started, %s: %w", endedBy(ctx), err)
	}
	s := newSession(ctx, netns)
	defer s.close()
	s.budget = newInstallBudget(ctx, spec)
	// cut tells whether the work ended with the caller's time (its
	// deadline less the reserve), not with a failure of its own.
	cut := func() bool { return ctx.Err() != nil || s.budget.cut() }
	b, err := resolve(s, backend)
	if err != nil {
		return "", err
	}
	if dl, ok := ctx.Deadline(); ok && b != Nftables && time.Until(dl) < minInstallTime {
		// Not even started, the pod's rules already there stay; begun,
		// the install would be cut with no time left to undo it.
		return "", fmt.Errorf("installing redirection with %s: not started, %v left of the caller's time, less than an install and the removal of a cut one take (%v): %w",
			b, time.Until(dl).Round(time.Millisecond), minInstallTime, context.DeadlineExceeded)
	}
	if err := iptablesTools(b, spec); err != nil {
		// Not started: a pod's rules already there stay. Begun, the
		// IPv4 restore replaced them, the IPv6 one found no tool, and
		// the rollback took the pod's whole capture away: the agent's
		// repair to both families of an IPv4-only iptables pod on a node
		// without ip6tables did that before trying another engine
		// (TestMissingToolKeepsTheRulesThere).
		return "", fmt.Errorf("installing redirection with %s: not started: %w", b, err)
	}
	err = installWith(s, b, spec)
	if err != nil && (backend == Auto || backend == "") && b == Nftables && !cut() {
		// nf_tables answers but cannot hold our table (a kernel before
		// 5.2 has no inet nat; a module may be missing): iptables, not a
		// failed pod.
		v, why := DetectIptables()
		slog.Warn("nftables install failed, falling back to iptables", "err", err, "backend", v, "why", why)
		if terr := iptablesTools(v, spec); terr != nil {
			err = fmt.Errorf("%w (no iptables fallback: %v)", err, terr)
		} else if uerr := uninstall(s); uerr == nil {
			b, err = v, installWith(s, v, spec)
		}
	}
	if err != nil {
		// In the time kept for it, even when the work's time is up.
		cleanup, ccancel := rollbackContext(ctx)
		defer ccancel()
		wasCut := cut()
		s.ctx, s.budget = cleanup, nil
		if wasCut && holdsExactly(s, spec) {
			// The cut changed nothing that matters: a repeated ADD of a
			// served pod whose restore waited on the lock, or a cut
			// after the last rule went in. Removing a complete rule set
			// would take a working pod's capture away (and, the lock
			// still held, half of it: the routes but not the rules).
			slog.Info("install cut by its deadline, but the netns holds exactly the redirection asked for; kept", "netns", netns.Path(), "backend", b, "cut", err)
			return b, nil
		}
		if testHookRollback != nil {
			testHookRollback()
		}
		if uerr := rollback(s); uerr != nil {
			err = fmt.Errorf("%w (and removing the partial state failed: %v)", err, uerr)
		}
		return "", fmt.Errorf("installing redirection with %s: %w", b, err)
	}
	return b, nil
}

// holdsExactly tells whether netns holds exactly spec's redirection,
// reading it in at most half the time s has left, so a check that
// cannot finish still leaves the rollback its share. The reads (saves,
// netlink dumps) never wait for the xtables lock.
func holdsExactly(s *session, spec Spec) bool {
	ctx, saved := s.ctx, s.ctx
	if dl, ok := ctx.Deadline(); ok {
		c, cancel := context.WithDeadline(ctx, time.Now().Add(time.Until(dl)/2))
		defer cancel()
		ctx = c
	}
	s.ctx = ctx
	defer func() { s.ctx = saved }()
	_, err := verify(s, spec)
	return err == nil
}

// minInstallTime is the least time left with which Install starts with
// an iptables backend. Such an install (dual stack) takes ~45 ms on an
// idle test machine, 70 ms at most of 20, and removing a cut one about as
// long; with 30-70 ms left, the install was cut after its IPv4 rules (or
// one of their two tables) and the quarter kept could not remove them.
// An nftables install is one netlink transaction (~3 ms) that no
// deadline cuts.
const minInstallTime = 250 * time.Millisecond

// cleanupReserve is the most of a deadline Install keeps for removing
// what a cut install applied, and never more than half the time left
// when the install starts: the work always gets the other half.
//
// 2 s, not 1 s: with nine busy processes on 2 vCPUs a save takes 66-185
// ms and a cut legacy install's check and removal ~7 saves and a
// restore, 0.7-1.4 s, which the estimate (10 runs at the slowest save)
// puts at up to 1.9 s. Capped at 1 s, the rollback of the agent's 8 s
// request ran past the deadline there and the plugin reported no
// answer (101) instead of "retry, lock held by pid N". The cost: on
// such a node the work gives up on a held xtables lock up to 1 s
// earlier (after 5.5 s of the agent's 7.5 s, not 6.5 s); both fail
// the ADD and kubelet retries, but only the answer tells the operator
// who held the lock. The reserve reaches the cap only when the saves
// are that slow (lock waits do not count: ran), so an idle node's work
// still gets all but reserveFloor.
const cleanupReserve = 2 * time.Second

// reserveFloor is the least Install keeps. An idle node's check and
// removal of a cut legacy install take ~50 ms (8 saves and 2 restores
// of 4-6 ms each by the estimate); one run measured fast by luck must
// not leave the rollback less than a few times that.
const reserveFloor = 150 * time.Millisecond

// rollbackSaves is the most saves a cut iptables install's check and
// removal run: the check reads both families twice (the look for
// chains of ours, then the comparison with the spec), the removal
// twice again (the look, then the save its payload is built from). The
// removal's restores are one per family of the spec. A removal of an
// IPv4 cut usually runs 6 saves and 1 restore: the count is an upper
// bound, and the margin the estimate keeps.
const rollbackSaves = 8

// installBudget sizes, run by run, the part of the caller's time an
// install keeps for its own rollback: what a rollback of this install
// costs, measured on this install's own runs (a loaded node's are
// slower, and so will the rollback's be). Each run ends at the
// caller's deadline less that estimate (run).
//
// The trade: a larger reserve cuts the work earlier, so an install
// waiting for a busy xtables lock gives up sooner, and one that would
// have got the lock in its last half second fails (and kubelet
// retries); a smaller one lets the rollback run past the deadline, and
// the agent's answer, which says "retry" and who holds the lock, is
// written after the plugin stopped reading: the runtime then reports
// no answer (101). Both fail the ADD and leave the netns clean
// (rollbackBound keeps the removal whole either way); the estimate
// keeps the readable answer on a loaded node and, on an idle one, gives
// the work all but reserveFloor (before session 18 it kept a fixed
// quarter, at most 1 s, whatever the node's speed).
type installBudget struct {
	deadline      time.Time     // the caller's
	most          time.Duration // cleanupReserve, or half the time at the start
	restores      int           // the removal's: one per family of the spec
	save, restore time.Duration // the longest of each that finished; restores that take the xtables lock are not counted (ran)
	stopped       bool          // a run ended (or did not start) at the reserve
}

// newInstallBudget returns the budget of an install with ctx and spec;
// nil when ctx has no deadline: nothing to keep time from.
func newInstallBudget(ctx context.Context, spec Spec) *installBudget {
	dl, ok := ctx.Deadline()
	if !ok {
		return nil
	}
	return budgetAt(dl, time.Now(), spec)
}

// budgetAt is newInstallBudget for an install starting at now.
func budgetAt(dl, now time.Time, spec Spec) *installBudget {
	return &installBudget{deadline: dl, most: min(cleanupReserve, dl.Sub(now)/2), restores: len(families(spec))}
}

// reserve is the time kept for the rollback, as estimated now.
func (b *installBudget) reserve() time.Duration {
	est := rollbackSaves*b.save + time.Duration(b.restores)*max(b.restore, b.save)
	return min(max(est, reserveFloor), b.most)
}

// run returns the context of one run of the work: ctx, ending the
// reserve before the caller's deadline.
func (b *installBudget) run(ctx context.Context) (context.Context, context.CancelFunc) {
	if b == nil {
		return ctx, func() {}
	}
	r := b.reserve()
	return context.WithDeadline(context.WithValue(ctx, reserveKey{}, r), b.deadline.Add(-r))
}

// reserveKey is the context value of a budgeted run: the reserve its
// deadline keeps before the caller's, so a run stopped there says that
// time was kept, not that the caller's deadline passed (with 0.7 s of a
// 2 s request left, it read as if the caller had run out).
type reserveKey struct{}

// ran records a run of the tool name that took took; rctx is the
// context run gave it, err its error.
func (b *installBudget) ran(rctx context.Context, name string, took time.Duration, err error) {
	if b == nil {
		return
	}
	if err != nil && rctx.Err() != nil {
		b.stopped = true
		return
	}
	if err != nil || takesXtablesLock(name) {
		// A legacy restore's time is mostly its wait for the host's
		// xtables lock, which says nothing of what the rollback's own
		// runs cost (a wait of the rollback's is rollbackBound's).
		// Counted, one restore that waited 1.2 s of a 2 s request for
		// kube-proxy to let go set the reserve to its 1 s cap and cut
		// the IPv6 run that would have finished: the install that got
		// the lock in time failed all the same. A lock-free restore
		// takes about a save (12 vs 10-14 ms idle, 70-114 vs 66-185 ms
		// with nine busy processes on 2 vCPUs): the saves stand for it.
		return
	}
	if strings.HasSuffix(name, "-save") {
		b.save = max(b.save, took)
	} else {
		b.restore = max(b.restore, took)
	}
}

// cut tells whether a run of the work ended at the reserve.
func (b *installBudget) cut() bool { return b != nil && b.stopped }

// rollbackBound is the least time a cut install's check and removal get
// from the cut, whatever is left of the caller's deadline. The reserve
// alone (0.5 s of a 2 s request) ran out on a loaded node: with nine
// busy processes on the two vCPUs of the test machine the check took
// ~200 ms and the removal of a legacy install ~350 ms, and a removal cut
// there leaves the rules it had not reached yet (the IPv6 ones without
// the IPv4 ones, nat without mangle: a restore killed between its
// tables). Past the caller's deadline by at most this much: an agent's
// answer then misses its connection's deadline and the plugin reports
// no answer instead of "retry", but the ADD fails and is retried
// either way, while a half rule set would stay. A caller without a
// deadline is not bounded here at all (each run keeps its own bound).
const rollbackBound = 3 * time.Second

// rollbackContext returns the context for removing what a failed
// install applied. It ignores ctx's cancel (a stopping caller must not
// leave half a rule set) and ends at ctx's deadline or rollbackBound
// from now, whichever is later.
func rollbackContext(ctx context.Context) (context.Context, func()) {
	c := context.WithoutCancel(ctx)
	dl, ok := ctx.Deadline()
	if !ok {
		return c, func() {}
	}
	return context.WithDeadline(c, later(dl, time.Now().Add(rollbackBound)))
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// testHookCaptured, when set (tests), runs the moment the capture rules
// are in; testHookRollback when a failed install starts removing what it
// applied.
var testHookCaptured, testHookRollback func()

func installWith(s *session, b Backend, spec Spec) error {
	netns := s.netns
	if err := s.ctx.Err(); err != nil {
		return fmt.Errorf("not started, %s: %w", endedBy(s.ctx), err)
	}
	// Routes before rules: without the rules no packet carries the mark,
	// so the routes are inert until then; the other way round, a pod
	// enrolled while it runs (a label flip) would have its capture, and
	// the agent's transparent dials to its apps, live for a moment with
	// the apps' replies routed out of the pod instead of back to the
	// agent.
	if err := routesInstall(netns, spec); err != nil {
		return err
	}
	switch b {
	case Nftables:
		if err := nftInstall(s, spec); err != nil {
			return err
		}
	default:
		if err := iptablesInstall(s, b, spec); err != nil {
			return err
		}
	}
	if testHookCaptured != nil {
		testHookCaptured()
	}
	for _, other := range concrete {
		if other == b {
			continue
		}
		if err := uninstallBackend(s, other); err != nil {
			return fmt.Errorf("removing older %s rules: %w", other, err)
		}
	}
	return nil
}

func resolve(s *session, b Backend) (Backend, error) {
	switch b {
	case Nftables, IptablesLegacy, IptablesNft:
		return b, nil
	case Iptables:
		v, why := DetectIptables()
		logChoice("iptables variant chosen", v, why)
		return v, nil
	case Auto, "":
		if err := nftAvailable(s); err == nil {
			return Nftables, nil
		} else {
			// nf_tables absent: iptables-nft cannot work either.
			logChoice("nftables unavailable, using iptables-legacy", IptablesLegacy, err.Error())
			return IptablesLegacy, nil
		}
	}
	return "", fmt.Errorf("unknown rule backend %q", b)
}

// choicesLogged holds the engine choices already logged at info. The
// choice is made at every install, and an agent installs at every ADD
// and every repair: on a node without nf_tables the same line at every
// pod and every retried repair was noise. Once per process and choice
// tells the operator why; later ones go to debug.
var choicesLogged sync.Map

func logChoice(msg string, b Backend, why string) {
	if _, seen := choicesLogged.LoadOrStore(msg+"\x00"+string(b)+"\x00"+why, true); seen {
		slog.Debug(msg, "backend", b, "why", why)
		return
	}
	slog.Info(msg, "backend", b, "why", why)
}

func uninstallBackend(s *session, b Backend) error {
	if b == Nftables {
		return nftUninstall(s)
	}
	ok, err := iptablesPresent(s, b)
	if err != nil || !ok {
		return err
	}
	return iptablesUninstall(s, b)
}

// Uninstall removes whatever any backend of ours installed in netns:
// the nftables table, our iptables chains and jumps in either variant, and
// the ip rules and routes tagged with our protocol. It is a no-op when
// nothing is there and never touches others' rules. ctx bounds the
// iptables runs (each also has its own bound, iptablesTimeout); an error
// of a run it cut wraps ctx's error. When the rules cannot all be
// removed the routes stay, and the error says so (removeAll).
func Uninstall(ctx context.Context, netns ns.NetNS) error {
	s := newSession(ctx, netns)
	defer s.close()
	return uninstall(s)
}

func uninstall(s *session) error { return removeAll(s) }

// rollback removes what a failed install applied (removeAll).
func rollback(s *session) error { return removeAll(s) }

// removeAll removes our rules, then our routes: the reverse of an
// install's order. The routes stay while rules of ours do (a removal cut
// at the xtables lock): rules without their routes is a state no install
// makes, in which the pod's inbound is captured but the replies to the
// agent's transparent dials are routed out of the pod (a live pod's
// traffic black-holed while its agent still listens), while rules with
// their routes is the partial state the error reports and the next
// removal (a repeated DEL, the agent's repair or unenroll) takes away.
func removeAll(s *session) error {
	netns := s.netns
	var errs []error
	for _, b := range concrete {
		if err := uninstallBackend(s, b); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", b, err))
		}
	}
	if len(errs) > 0 {
		errs = append(errs, errors.New("the routes stay with the rules left"))
	} else if err := routesUninstall(netns); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("removing redirection from %s: %w", netns.Path(), err)
	}
	return nil
}

// Installed reports which backends of ours hold rules in netns; ctx
// bounds the iptables runs, as for Uninstall.
func Installed(ctx context.Context, netns ns.NetNS) ([]Backend, error) {
	s := newSession(ctx, netns)
	defer s.close()
	return installed(s)
}

func installed(s *session) ([]Backend, error) {
	var found []Backend
	// A kernel that does not answer nf_tables holds no table of ours.
	if c, err := s.conn(); err == nil {
		if ok, err := nftPresent(c); err == nil && ok {
			found = append(found, Nftables)
		} else if err != nil {
			s.reset()
		}
	}
	for _, b := range []Backend{IptablesNft, IptablesLegacy} {
		ok, err := iptablesPresent(s, b)
		if err != nil {
			return nil, fmt.Errorf("looking for %s rules: %w", b, err)
		}
		if ok {
			found = append(found, b)
		}
	}
	return found, nil
}

// Verify returns an error naming what is missing or different, nil when
// the netns holds exactly spec's redirection (by whichever backend); ctx
// bounds the iptables runs, as for Uninstall.
func Verify(ctx context.Context, netns ns.NetNS, spec Spec) error {
	if err := spec.Validate(); err != nil {
		return err
	}
	s := newSession(ctx, netns)
	defer s.close()
	_, err := verify(s, spec)
	return err
}

// verify is Verify on a session; it also returns the backend holding the
// rules when exactly one does.
func verify(s *session, spec Spec) (Backend, error) {
	netns := s.netns
	found, err := installed(s)
	if err != nil {
		return "", err
	}
	var backend Backend
	var problems []string
	switch len(found) {
	case 0:
		problems = append(problems, "no redirection rules installed")
	case 1:
		backend = found[0]
		var err error
		if found[0] == Nftables {
			err = nftVerify(s, spec)
		} else {
			err = iptablesVerify(s, found[0], spec)
		}
		if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) || errors.Is(err, ErrRunTimeout) {
			// A read cut short, not a difference: the caller tells
			// "retry" from "the rules are wrong" by the wrapped error
			// (a save hung past its own bound is neither: a failed
			// read, which no reinstall would mend).
			return backend, fmt.Errorf("reading the redirection in %s: %w", netns.Path(), err)
		}
		if err != nil {
			problems = append(problems, err.Error())
		}
	default:
		problems = append(problems, fmt.Sprintf("rules installed by several backends at once: %v", found))
	}
	problems = append(problems, routesVerify(netns, spec)...)
	if len(problems) > 0 {
		return backend, fmt.Errorf("redirection in %s: %s", netns.Path(), strings.Join(problems, "; "))
	}
	return backend, nil
}

var detectOnce struct {
	sync.Once
	b   Backend
	why string
}

// DetectIptables picks the iptables variant the host uses, the way
// Kubernetes' iptables-wrapper does: kubelet's hint chains decide first;
// otherwise whichever variant holds more rules on the host wins, and a tie
// goes to nft (the default of every current distribution). It runs in the
// caller's network namespace (the host's) once per process; the answer
// and its reason are returned for logging.
func DetectIptables() (Backend, string) {
	detectOnce.Do(func() {
		detectOnce.b, detectOnce.why = detectIptables(runSave)
	})
	return detectOnce.b, detectOnce.why
}

// saveTimeout bounds each save DetectIptables runs on the host. The
// saves never wait for the xtables lock, but one that hangs (a wedged
// binary, a ruleset in the hundreds of thousands of rules) held the
// first install with backend "iptables" (a plugin request) and the host
// rules' start with it, for good: once per process, unbounded. A save
// that does not finish in time counts as its variant's ruleset being the
// larger (saveSlow).
var saveTimeout = 5 * time.Second

// saveResult is what one save told the detection.
type saveResult int

const (
	// saveAbsent: the binary is not there or failed (no such tables).
	saveAbsent saveResult = iota
	saveDone
	// saveSlow: present, but still reading after saveTimeout. Formatting
	// the ruleset is what takes a save long, so this is the variant with
	// the rules in the hundreds of thousands (kube-proxy's): counting it
	// absent would pick the other variant on exactly the nodes that use
	// this one.
	saveSlow
)

func runSave(name string) ([]byte, saveResult) {
	path, err := exec.LookPath(name)
	if err != nil {
		return nil, saveAbsent
	}
	ctx, cancel := context.WithTimeout(context.Background(), saveTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, path)
	EndWithGroup(cmd)
	out, err := cmd.Output()
	if err != nil {
		if ctx.Err() != nil {
			slog.Warn("iptables variant detection: a save did not finish in time; its variant counts as holding the larger ruleset", "save", name, "bound", saveTimeout)
			return nil, saveSlow
		}
		return nil, saveAbsent
	}
	return out, saveDone
}

func detectIptables(save func(string) ([]byte, saveResult)) (Backend, string) {
	// The four saves at once: with each bounded (runSave), so is the
	// whole detection, by one bound rather than four.
	outs := map[string][]byte{}
	slow := map[string]bool{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, v := range []string{"legacy", "nft"} {
		for _, bin := range []string{"iptables-" + v + "-save", "ip6tables-" + v + "-save"} {
			wg.Go(func() {
				out, res := save(bin)
				mu.Lock()
				defer mu.Unlock()
				switch res {
				case saveDone:
					outs[bin] = out
				case saveSlow:
					slow[bin] = true
				}
			})
		}
	}
	wg.Wait()
	saved := func(bin string) ([]byte, bool) { out, ok := outs[bin]; return out, ok }
	type view struct {
		ok    bool // installed: a save finished or outlasted the bound
		slow  bool // a save outlasted the bound: rules not counted
		rules int
		hint  bool
	}
	look := func(v string) view {
		var r view
		for _, bin := range []string{"iptables-" + v + "-save", "ip6tables-" + v + "-save"} {
			if slow[bin] {
				r.ok, r.slow = true, true
			}
			out, ok := saved(bin)
			if !ok {
				continue
			}
			r.ok = true
			for l := range textLines(out) {
				if strings.HasPrefix(l, ":KUBE-IPTABLES-HINT") || strings.HasPrefix(l, ":KUBE-KUBELET-CANARY") {
					r.hint = true
				}
				if strings.HasPrefix(l, "-") {
					r.rules++
				}
			}
		}
		return r
	}
	legacy, nft := look("legacy"), look("nft")
	switch {
	case !legacy.ok && !nft.ok:
		return IptablesNft, "neither iptables-legacy-save nor iptables-nft-save runs; assuming nft"
	case !nft.ok:
		return IptablesLegacy, "only the legacy variant is installed"
	case !legacy.ok:
		return IptablesNft, "only the nft variant is installed"
	case nft.hint:
		return IptablesNft, "kubelet's KUBE-IPTABLES-HINT/KUBE-KUBELET-CANARY chains are in iptables-nft"
	case legacy.hint:
		return IptablesLegacy, "kubelet's KUBE-IPTABLES-HINT/KUBE-KUBELET-CANARY chains are in iptables-legacy"
	case legacy.slow && nft.slow:
		return IptablesNft, fmt.Sprintf("the saves of both variants did not finish in %s; assuming nft", saveTimeout)
	case legacy.slow:
		return IptablesLegacy, fmt.Sprintf("the legacy variant's save did not finish in %s (a ruleset too large to read in time) while the nft variant's did (%d rules)", saveTimeout, nft.rules)
	case nft.slow:
		return IptablesNft, fmt.Sprintf("the nft variant's save did not finish in %s (a ruleset too large to read in time) while the legacy variant's did (%d rules)", saveTimeout, legacy.rules)
	case legacy.rules > nft.rules:
		return IptablesLegacy, fmt.Sprintf("the host has %d legacy rules and %d nft rules", legacy.rules, nft.rules)
	default:
		return IptablesNft, fmt.Sprintf("the host has %d nft rules and %d legacy rules", nft.rules, legacy.rules)
	}
}
