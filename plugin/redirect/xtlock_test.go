package redirect

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/plugin/internal/nstest"
)

// TestInstallCutWhileXtablesLockHeld: the host's xtables lock, one file
// for every netns of the node, is held (a busy kube-proxy) while rules
// are installed with iptables-legacy, whose restores wait for it.
// Install must return by its context's deadline with an error that says
// so (wrapping context.DeadlineExceeded, naming the lock and its holder)
// and leave nothing of ours in the netns; once the lock is free the same
// install succeeds. Before, every run had its own 10 s bound whatever
// the caller's deadline: the install returned after 10 s.
func TestInstallCutWhileXtablesLockHeld(t *testing.T) {
	testenv.RequireRoot(t)
	release := testenv.HoldXtablesLock(t)
	n := nstest.New(t, "xl")
	spec := DefaultSpec()
	const deadline = 1500 * time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()
	start := time.Now()
	_, err := Install(ctx, n, IptablesLegacy, spec)
	took := time.Since(start)
	t.Logf("Install while the lock is held: %v after %v", err, took.Round(time.Millisecond))
	if err == nil {
		t.Fatal("Install succeeded while the xtables lock was held")
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("error does not wrap context.DeadlineExceeded: %v", err)
	}
	holder := fmt.Sprintf("held by pid %d", os.Getpid())
	// The run stops the rollback's reserve before the deadline, and says
	// so: "the caller's deadline has passed" there read as if the caller
	// had run out with time still left.
	for _, want := range []string{"iptables-legacy-restore", "before the caller's deadline, the time kept for undoing a cut install", "xtables lock " + xtablesLockPath(), holder} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not say %q: %v", want, err)
		}
	}
	// A bound far from the 10 s the run took before; generous for a
	// loaded machine.
	if took > deadline+time.Second {
		t.Errorf("Install returned %v after its deadline", took-deadline)
	}
	if found, err := Installed(context.Background(), n); err != nil || len(found) != 0 {
		t.Errorf("rules left by the cut install: %v %v", found, err)
	}
	if p := routesVerify(n, spec); len(p) != 2*2 {
		t.Errorf("routes left by the cut install (want all 4 missing): %v", p)
	}

	release()
	if _, err := Install(context.Background(), n, IptablesLegacy, spec); err != nil {
		t.Fatalf("Install once the lock is free: %v", err)
	}
	if err := Verify(context.Background(), n, spec); err != nil {
		t.Fatalf("Verify after the retried install: %v", err)
	}
}

// TestInstallCutBetweenFamilies: the IPv4 rules are in when the lock is
// taken, and the IPv6 restore waits for it past the deadline. The IPv4
// rules and the routes must go: removed once the lock is free within the
// time Install keeps for that, or, when it is not, named in the error
// (the DEL that follows a failed ADD removes them) and kept together:
// until session 14's review the routes went while the rules stayed.
func TestInstallCutBetweenFamilies(t *testing.T) {
	testenv.RequireRoot(t)
	spec := DefaultSpec()
	for _, freed := range []bool{true, false} {
		t.Run(fmt.Sprintf("lock freed for the rollback=%v", freed), func(t *testing.T) {
			n := nstest.New(t, "xl")
			var release func()
			testHookBetweenRuns = func(f family) {
				if f == 6 {
					release = testenv.HoldXtablesLock(t)
				}
			}
			testHookRollback = func() {
				if freed {
					release()
				}
			}
			defer func() { testHookBetweenRuns, testHookRollback = nil, nil }()
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			_, err := Install(ctx, n, IptablesLegacy, spec)
			testHookBetweenRuns, testHookRollback = nil, nil
			t.Logf("Install: %v", err)
			if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "ip6tables-legacy-restore") {
				t.Fatalf("Install cut at the IPv6 restore: %v", err)
			}
			found, ferr := Installed(context.Background(), n)
			if ferr != nil {
				t.Fatal(ferr)
			}
			if freed {
				if len(found) != 0 {
					t.Errorf("IPv4 rules left although the lock was free for the rollback: %v", found)
				}
				if strings.Contains(err.Error(), "partial state") {
					t.Errorf("error reports a failed removal: %v", err)
				}
			} else {
				if !slices.Equal(found, []Backend{IptablesLegacy}) {
					t.Errorf("backends left: %v, want the IPv4 legacy rules the rollback could not remove", found)
				}
				if !strings.Contains(err.Error(), "removing the partial state failed") || !strings.Contains(err.Error(), "xtables lock") {
					t.Errorf("error does not report the rules it could not remove and why: %v", err)
				}
				// The IPv4 rules mark the replies to the agent's
				// transparent dials for these routes: without them the
				// replies leave the pod.
				if p := routesVerify(n, spec); len(p) != 0 {
					t.Errorf("routes removed while the IPv4 rules stay: %v", p)
				}
				release()
				if err := Uninstall(context.Background(), n); err != nil {
					t.Fatal(err)
				}
				if found, err := Installed(context.Background(), n); err != nil || len(found) != 0 {
					t.Errorf("after Uninstall: %v %v", found, err)
				}
			}
			if p := routesVerify(n, spec); len(p) != 2*2 {
				t.Errorf("routes left (want all 4 missing): %v", p)
			}
		})
	}
}

// TestInstallEndedContext: an install whose context ended before it
// started (an agent request that spent its time waiting for the pod's
// lock) changes nothing and says why.
func TestInstallEndedContext(t *testing.T) {
	testenv.RequireRoot(t)
	n := nstest.New(t, "xl")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := Install(ctx, n, IptablesLegacy, DefaultSpec())
	if !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "not started") {
		t.Fatalf("Install with an ended context: %v", err)
	}
	p := routesVerify(n, DefaultSpec())
	if len(p) == 0 {
		t.Error("routes installed by an install that should not have started")
	}
	for _, m := range p {
		if !strings.Contains(m, "missing") {
			t.Errorf("routes changed by an install that should not have started: %v", p)
		}
	}
}

// TestInstallCutKeepsCompleteRules: a pod's rules are all in (its first
// ADD, or a repair) when the same install runs again with the xtables
// lock held past its deadline (a repeated ADD of a served sandbox).
// Nothing the cut changed matters: the netns holds exactly the spec's
// redirection, so the install is done and the rules stay. Before, the
// cut install's rollback removed every rule and route of the pod
// (Verify after it: "no redirection rules installed"), taking a working
// pod's capture away while its listeners kept serving.
func TestInstallCutKeepsCompleteRules(t *testing.T) {
	testenv.RequireRoot(t)
	n := nstest.New(t, "xl")
	spec := DefaultSpec()
	if _, err := Install(context.Background(), n, IptablesLegacy, spec); err != nil {
		t.Fatal(err)
	}
	testenv.HoldXtablesLock(t)
	// The deadline only has to cut the restore that waits for the lock;
	// the saves before it (both families, three tables) must fit, and
	// under a parallel test load one took more than 1.5 s.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	b, err := Install(ctx, n, IptablesLegacy, spec)
	t.Logf("second Install while the lock is held: %q, %v", b, err)
	if err != nil || b != IptablesLegacy {
		t.Errorf("second Install while the lock is held: %q, %v; want %s, done (the rules were complete)", b, err, IptablesLegacy)
	}
	if err := Verify(context.Background(), n, spec); err != nil {
		t.Errorf("the complete rules did not survive the cut install: %v", err)
	}
}

// TestFlockHolder: the holder's line is found among others' (POSIX and
// OFD locks, waiters, other files, lines that are not /proc/locks'),
// wherever it is in a long file.
func TestFlockHolder(t *testing.T) {
	var b strings.Builder
	b.WriteString("garbage\n\n1:\n1: FLOCK\n")
	for i := range 20000 {
		fmt.Fprintf(&b, "%d: POSIX  ADVISORY  WRITE %d 00:1a:%d 0 EOF\n", i+2, 100+i, 5000+i)
	}
	b.WriteString("20002: OFDLCK ADVISORY  WRITE -1 fe:00:77 0 EOF\n")
	b.WriteString("20003: FLOCK  ADVISORY  WRITE x fe:00:77 0 EOF\n")
	b.WriteString("20004: -> FLOCK  ADVISORY  WRITE 999 fe:00:77 0 EOF\n")
	b.WriteString("20004: FLOCK  ADVISORY  WRITE 4242 fe:00:77 0 EOF\n")
	cases := []struct {
		maj, min uint32
		ino      uint64
		pid      int
		ok       bool
	}{
		{0xfe, 0, 77, 4242, true},
		{0xfe, 0, 78, 0, false},
		{0, 0x1a, 5000, 0, false}, // a POSIX lock, not the flock iptables takes
	}
	for _, c := range cases {
		pid, ok := flockHolder(strings.NewReader(b.String()), c.maj, c.min, c.ino)
		if pid != c.pid || ok != c.ok {
			t.Errorf("flockHolder(%x:%x:%d) = %d, %v; want %d, %v", c.maj, c.min, c.ino, pid, ok, c.pid, c.ok)
		}
	}
	// An overlong line ends the search instead of growing a buffer.
	long := strings.Repeat("x", 1<<20) + "\n1: FLOCK  ADVISORY  WRITE 7 fe:00:77 0 EOF\n"
	if pid, ok := flockHolder(strings.NewReader(long), 0xfe, 0, 77); ok {
		t.Errorf("found %d past an overlong line", pid)
	}
}

// FuzzFlockHolder: whatever /proc/locks holds, no panic, and a holder
// found is on a line naming the file.
func FuzzFlockHolder(f *testing.F) {
	f.Add("1: FLOCK  ADVISORY  WRITE 4242 fe:00:77 0 EOF\n", uint32(0xfe), uint32(0), uint64(77))
	f.Add("1: -> FLOCK  ADVISORY  WRITE 1 fe:00:77 0 EOF\n2: FLOCK ADVISORY WRITE -3 00:1a:1 0 EOF", uint32(0), uint32(0x1a), uint64(1))
	f.Fuzz(func(t *testing.T, locks string, maj, min uint32, ino uint64) {
		pid, ok := flockHolder(strings.NewReader(locks), maj, min, ino)
		if ok && !strings.Contains(locks, fmt.Sprintf("%02x:%02x:%d", maj, min, ino)) {
			t.Errorf("holder %d found for a file no line names", pid)
		}
		if !ok && pid != 0 {
			t.Errorf("pid %d without a holder", pid)
		}
	})
}

// TestXtablesLockOutsidePIDNamespace: the agent runs in a PID namespace
// of its own (a container without hostPID) while a process outside it
// holds the xtables lock; the kernel leaves that lock out of the
// agent's /proc/locks. A cut legacy restore must still point at the
// lock. Before, the message named the lock only when /proc/locks showed
// its holder, so such an agent said "stopped after 1s, at the caller's
// deadline" and nothing about the lock.
func TestXtablesLockOutsidePIDNamespace(t *testing.T) {
	testenv.RequireRoot(t)
	if os.Getenv("AMBIT_XTL_HELPER") != "" {
		t.Skip("helper process")
	}
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		t.Skip("no unshare(1)")
	}
	testenv.HoldXtablesLock(t)
	cmd := exec.Command(unshare, "--pid", "--fork", "--mount-proc",
		os.Args[0], "-test.run=^TestXtablesLockHelperProcess$", "-test.v")
	cmd.Env = append(os.Environ(), "AMBIT_XTL_HELPER=1")
	out, err := cmd.CombinedOutput()
	t.Logf("helper in a PID namespace of its own:\n%s", out)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"MESSAGE: ", "xtables lock " + xtablesLockPath(), "no holder in this PID namespace"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("message does not say %q", want)
		}
	}
}

// TestXtablesLockHelperProcess is TestXtablesLockOutsidePIDNamespace's
// reader, run by it in a PID namespace of its own.
func TestXtablesLockHelperProcess(t *testing.T) {
	if os.Getenv("AMBIT_XTL_HELPER") == "" {
		t.Skip("run by TestXtablesLockOutsidePIDNamespace")
	}
	if who, ok := xtablesLockHolder(); ok {
		t.Logf("holder visible from here: %s", who)
	}
	ctx, cancel := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancel()
	fmt.Printf("MESSAGE: %v\n", stoppedRun(ctx, "iptables-legacy-restore --noflush --wait", time.Second, iptablesTimeout, true))
}

// TestInstallShortDeadline: an install whose caller has little time
// left (an agent request that spent its time waiting for the pod's
// lock) either installs everything or leaves nothing: never the IPv4
// rules and the routes without the IPv6 ones. Before, with 30 to 50 ms
// left a legacy install (~45 ms on the test machine) was cut at the
// IPv6 save or restore, and its rollback, with a quarter of the time
// (8-12 ms), could not remove the IPv4 rules: "removing the partial
// state failed". Now an iptables install does not start with less than
// minInstallTime left.
func TestInstallShortDeadline(t *testing.T) {
	testenv.RequireRoot(t)
	spec := DefaultSpec()
	for _, d := range []time.Duration{5, 20, 30, 40, 50, 70, 100, 150} {
		d *= time.Millisecond
		n := nstest.New(t, "xs")
		ctx, cancel := context.WithTimeout(context.Background(), d)
		_, err := Install(ctx, n, IptablesLegacy, spec)
		cancel()
		if err == nil {
			if verr := Verify(context.Background(), n, spec); verr != nil {
				t.Errorf("%v: Install succeeded but: %v", d, verr)
			}
			continue
		}
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("%v: error does not wrap context.DeadlineExceeded: %v", d, err)
		}
		found, ferr := Installed(context.Background(), n)
		if ferr != nil {
			t.Fatal(ferr)
		}
		p := routesVerify(n, spec)
		left := len(found) != 0 || len(p) == 0
		for _, m := range p {
			left = left || !strings.Contains(m, "missing")
		}
		if left {
			t.Errorf("%v: half a rule set left (backends %v, routes: %q): %v", d, found, p, err)
		}
	}
	// nftables: one netlink transaction, never cut; it needs no floor.
	n := nstest.New(t, "xs")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := Install(ctx, n, Nftables, spec); err != nil {
		t.Errorf("nftables install with 20 ms left: %v", err)
	}
}

// TestUninstallCutKeepsRoutes: a pod's iptables-legacy rules are
// removed (DEL, a live unenroll) while the xtables lock is held past the
// removal's deadline. The rules cannot go, so the routes must stay with
// them, and the error says so: the capture rules without their routes
// would route the replies to the agent's transparent dials out of the
// pod (a live pod's traffic black-holed). Once the lock is free the
// next removal takes both. Before, a plain Uninstall removed the routes
// whatever became of the rules (only the install's rollback kept them).
func TestUninstallCutKeepsRoutes(t *testing.T) {
	testenv.RequireRoot(t)
	n := nstest.New(t, "xl")
	spec := DefaultSpec()
	if _, err := Install(context.Background(), n, IptablesLegacy, spec); err != nil {
		t.Fatal(err)
	}
	release := testenv.HoldXtablesLock(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	err := Uninstall(ctx, n)
	t.Logf("Uninstall while the lock is held: %v", err)
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "the routes stay with the rules left") {
		t.Errorf("Uninstall cut at the lock: %v, want the deadline and that the routes stay", err)
	}
	if found, err := Installed(context.Background(), n); err != nil || !slices.Equal(found, []Backend{IptablesLegacy}) {
		t.Fatalf("rules after the cut removal: %v %v (the test wants them left)", found, err)
	}
	if p := routesVerify(n, spec); len(p) != 0 {
		t.Errorf("routes removed while the capture rules stay: %v", p)
	}
	release()
	if err := Uninstall(context.Background(), n); err != nil {
		t.Fatal(err)
	}
	if found, err := Installed(context.Background(), n); err != nil || len(found) != 0 {
		t.Errorf("after the removal with the lock free: %v %v", found, err)
	}
	if p := routesVerify(n, spec); len(p) != 2*2 {
		t.Errorf("routes left (want all 4 missing): %v", p)
	}
}

// TestInstallCutRollbackOnALoadedNode: an install is cut between its
// families (the IPv6 restore waits for the xtables lock past the
// deadline), the lock is free again for the rollback, but every save
// and restore of the rollback is slow (here a wrapper sleeps 150 ms
// before each: a node with its CPUs far oversubscribed, where the test
// machine measured ~350 ms for the removal with nine busy processes on
// two vCPUs). The rollback must finish: nothing of ours left, no
// "partial state" in the error. Before, it ended at the caller's
// deadline, 0.5 s after the cut, half-way: "removing the partial state
// failed: ... stopped after ..., at the caller's deadline", the IPv4
// rules left without the IPv6 ones.
func TestInstallCutRollbackOnALoadedNode(t *testing.T) {
	testenv.RequireRoot(t)
	spec := DefaultSpec()
	slowDown := slowLegacyTools(t, 150*time.Millisecond)

	n := nstest.New(t, "xr")
	cut := cutAtIPv6Restore(t, slowDown)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_, err := Install(ctx, n, IptablesLegacy, spec)
	testHookBetweenRuns, testHookRollback = nil, nil
	t.Logf("Install: %v (rollback took %v)", err, time.Since(cut.at).Round(time.Millisecond))
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "ip6tables-legacy-restore") {
		t.Fatalf("Install cut at the IPv6 restore: %v", err)
	}
	if strings.Contains(err.Error(), "partial state") {
		t.Errorf("the rollback did not finish: %v", err)
	}
	if found, err := Installed(context.Background(), n); err != nil || len(found) != 0 {
		t.Errorf("rules left by the cut install's rollback: %v %v", found, err)
	}
	if p := routesVerify(n, spec); len(p) != 2*2 {
		t.Errorf("routes left (want all 4 missing): %v", p)
	}
}

// slowLegacyTools puts wrappers of the legacy saves and restores first
// in PATH that sleep d before each run once the returned function was
// called: every run of a loaded node slower, deterministically.
func slowLegacyTools(t *testing.T, d time.Duration) (slowDown func()) {
	t.Helper()
	dir := t.TempDir()
	slow := dir + "/slow"
	for _, tool := range []string{"iptables-legacy-save", "iptables-legacy-restore", "ip6tables-legacy-save", "ip6tables-legacy-restore"} {
		real, err := exec.LookPath(tool)
		if err != nil {
			t.Fatalf("%s not installed (the iptables package; .ci/run installs it): %v", tool, err)
		}
		script := fmt.Sprintf("#!/bin/sh\nif [ -e %s ]; then sleep %.3f; fi\nexec %s \"$@\"\n", slow, d.Seconds(), real)
		if err := os.WriteFile(dir+"/"+tool, []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv("PATH", dir+string(os.PathListSeparator)+os.Getenv("PATH"))
	return func() {
		if err := os.WriteFile(slow, nil, 0o644); err != nil {
			t.Error(err)
		}
	}
}

// TestInstallCutKeepsCompleteRulesOnALoadedNode: as
// TestInstallCutKeepsCompleteRules (a repeated ADD of a served pod cut
// at the held xtables lock), with a 2 s deadline and every save 150 ms
// slower, as on a loaded node. The check that finds the rules complete
// must get the time to read them. Before, it got half the 0.5 s
// reserve, could not finish its four saves, and the install was
// answered as failed ("retry") for a pod whose rules were all in, its
// rollback then cut at the lock.
func TestInstallCutKeepsCompleteRulesOnALoadedNode(t *testing.T) {
	testenv.RequireRoot(t)
	n := nstest.New(t, "xk")
	spec := DefaultSpec()
	if _, err := Install(context.Background(), n, IptablesLegacy, spec); err != nil {
		t.Fatal(err)
	}
	slowDown := slowLegacyTools(t, 150*time.Millisecond)
	testenv.HoldXtablesLock(t)
	// The first save runs at full speed: the slowing is the check's.
	testHookBetweenRuns = func(family) { slowDown() }
	defer func() { testHookBetweenRuns = nil }()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	b, err := Install(ctx, n, IptablesLegacy, spec)
	testHookBetweenRuns = nil
	t.Logf("second Install while the lock is held, saves slowed: %q, %v", b, err)
	if err != nil || b != IptablesLegacy {
		t.Errorf("second Install: %q, %v; want %s, done (the rules were complete)", b, err, IptablesLegacy)
	}
	if err := Verify(context.Background(), n, spec); err != nil {
		t.Errorf("the complete rules did not survive the cut install: %v", err)
	}
}

// cutAtIPv6Restore sets the hooks for an Install cut at its IPv6
// restore: the xtables lock is taken between the families, released as
// the rollback starts, and then then runs (if not nil). The hooks are
// cleared when the test ends.
func cutAtIPv6Restore(t *testing.T, then func()) *ipv6Cut {
	var release func()
	c := &ipv6Cut{}
	testHookBetweenRuns = func(f family) {
		if f == 6 {
			release = testenv.HoldXtablesLock(t)
			c.locked = true
		}
	}
	testHookRollback = func() {
		c.at = time.Now()
		if release != nil {
			release()
		}
		if then != nil {
			then()
		}
	}
	t.Cleanup(func() { testHookBetweenRuns, testHookRollback = nil, nil })
	return c
}

// ipv6Cut is what cutAtIPv6Restore saw: whether the lock was taken
// before the IPv6 runs, and when the rollback started.
type ipv6Cut struct {
	locked bool
	at     time.Time
}
