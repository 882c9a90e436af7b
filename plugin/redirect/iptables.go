package redirect

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"iter"
	"os/exec"
	"sort"
	"strings"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/google/nftables"
	"golang.org/x/sys/unix"
)

// Our iptables chains, in the mangle and nat tables of each family. Only
// these chains and the one jump to each from the built-in chain are ours.
const (
	ChainPrerouting = "AMBIT_PRERT"
	ChainOutput     = "AMBIT_OUTPUT"
)

// iptablesTimeout bounds one iptables(-restore/-save) run when the
// caller's context has no earlier end; the xtables lock is host-wide, so
// a stuck holder must not hang a background loop either. The default of
// WithRunTimeout.
const iptablesTimeout = 10 * time.Second

// ErrRunTimeout is wrapped by the error of an iptables run stopped at its
// own bound (WithRunTimeout, default 10 s) while the caller's context
// was not over. It is a failure of the tool, like a rule the kernel
// refused, not the caller's deadline: until session 15 it wrapped
// context.DeadlineExceeded, and an agent whose requestTimeout exceeds
// the bound answered a hung iptables-legacy-restore "did not finish by
// this request's deadline; retry", counted rules-deadline.
var ErrRunTimeout = errors.New("iptables run stopped at its own bound")

// runTimeoutError is a run stopped at its own bound: its message says
// which run, after how long and what it waited for; it is ErrRunTimeout.
type runTimeoutError struct{ msg string }

func (e *runTimeoutError) Error() string        { return e.msg }
func (e *runTimeoutError) Is(target error) bool { return target == ErrRunTimeout }

type runTimeoutKey struct{}

// WithRunTimeout returns ctx with d as the bound of each iptables run
// made under it, instead of 10 s; d <= 0 keeps the default. The caller's
// own deadline, if earlier, still ends a run first.
func WithRunTimeout(ctx context.Context, d time.Duration) context.Context {
	if d <= 0 {
		return ctx
	}
	return context.WithValue(ctx, runTimeoutKey{}, d)
}

func runTimeout(ctx context.Context) time.Duration {
	if d, ok := ctx.Value(runTimeoutKey{}).(time.Duration); ok {
		return d
	}
	return iptablesTimeout
}

type ipChain struct{ table, parent, chain string }

var ipChains = map[hook]ipChain{
	mangleIn:  {"mangle", "PREROUTING", ChainPrerouting},
	mangleOut: {"mangle", "OUTPUT", ChainOutput},
	natIn:     {"nat", "PREROUTING", ChainPrerouting},
	natOut:    {"nat", "OUTPUT", ChainOutput},
	filterOut: {"filter", "OUTPUT", ChainOutput},
}

// ipTables lists the tables spec's rules of family f are in, in the
// order a restore commits them: filter (IPv6's link-local refusal) before
// nat, whose rule lets that traffic pass the redirect.
func ipTables(s Spec, f family) []string {
	if f == 6 && s.IPv6 {
		return []string{"filter", "mangle", "nat"}
	}
	return []string{"mangle", "nat"}
}

// removalTables is the order of removal. iptables-legacy commits (and
// takes the host's xtables lock) table by table, so a removal cut at
// the lock leaves the tables it had not reached, and the order decides
// which half state a pod lives in until the next removal. Mangle first
// leaves nat's capture without mangle's marks: new outbound connections
// still reach the agent (encrypted), new inbound ones break (the app's
// replies to the agent's transparent dials, unmarked, are routed out of
// the pod). Nat first would leave the marks without the capture: new
// connections in plaintext both ways, past the agent's policy. Breaking
// beats leaking (TestRemovalCutBetweenTablesKeepsTheCapture). Filter
// (IPv6's link-local refusal) after nat, so link-local traffic is never
// let through while the redirect is there to send it to a socket bound
// to its link.
var removalTables = []string{"mangle", "nat", "filter"}

// iptablesRule renders r in the exact form iptables-save prints, so Verify
// can compare text: generic matches (-s -d -o -p) first, then extensions in
// rule order, then the target.
func iptablesRule(r rule) string {
	var generic, ext []string
	var src, dst, oif, proto string
	not := func(neg bool) string {
		if neg {
			return "! "
		}
		return ""
	}
	for _, c := range r.conds {
		switch c.kind {
		case condTCP:
			proto = "-p tcp"
		case condSaddr:
			src = not(c.neg) + "-s " + c.prefix.String()
		case condDaddr:
			dst = not(c.neg) + "-d " + c.prefix.String()
		case condOifLo:
			oif = not(c.neg) + "-o lo"
		case condDport:
			ext = append(ext, fmt.Sprintf("-m tcp %s--dport %d", not(c.neg), c.port))
		case condMark:
			ext = append(ext, fmt.Sprintf("-m mark %s--mark %s", not(c.neg), markMatch(c.value, c.mask)))
		case condCtMark:
			ext = append(ext, fmt.Sprintf("-m connmark %s--mark %s", not(c.neg), markMatch(c.value, c.mask)))
		case condCtNew:
			ext = append(ext, "-m conntrack "+not(c.neg)+"--ctstate NEW")
		}
	}
	for _, g := range []string{src, dst, oif, proto} {
		if g != "" {
			generic = append(generic, g)
		}
	}
	var target string
	switch r.act.kind {
	case actAccept:
		target = "-j ACCEPT"
	case actRedirect:
		target = fmt.Sprintf("-j REDIRECT --to-ports %d", r.act.port)
	case actSetCtMark:
		target = fmt.Sprintf("-j CONNMARK --set-xmark %#x/%#x", r.act.value, r.act.mask)
	case actRestoreMark:
		target = "-j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff"
	case actReject:
		target = "-j REJECT --reject-with tcp-reset"
	}
	parts := append([]string{"-A", ipChains[r.hook].chain}, generic...)
	parts = append(parts, ext...)
	parts = append(parts, target)
	return strings.Join(parts, " ")
}

// markMatch is a mark match's value as iptables-save prints it: the mask
// is left out when it is all 32 bits (xt_mark and xt_connmark print
// it so), and Verify compares this text with the save's.
func markMatch(value, mask uint32) string {
	if mask == 0xffffffff {
		return fmt.Sprintf("%#x", value)
	}
	return fmt.Sprintf("%#x/%#x", value, mask)
}

func jumpRule(c ipChain) string { return "-A " + c.parent + " -j " + c.chain }

// iptablesWant is the expected iptables-save content of our chains per
// table, in order, without the jumps.
func iptablesWant(s Spec, f family) map[string][]string {
	m := map[string][]string{}
	for _, r := range ruleSet(s) {
		if r.fam == f {
			t := ipChains[r.hook].table
			m[t] = append(m[t], iptablesRule(r))
		}
	}
	return m
}

// byChain splits rule lines ("-A CHAIN ...") by chain, keeping order;
// iptables-save lists chains in its own order, rules within one in ours.
func byChain(lines []string) map[string][]string {
	m := map[string][]string{}
	for _, l := range lines {
		f := strings.Fields(l)
		if len(f) > 1 {
			m[f[1]] = append(m[f[1]], l)
		}
	}
	return m
}

// iptablesPayload is the complete iptables-restore --noflush input for
// family f. Declaring our chains flushes them, so re-applying replaces
// rather than appends; the jumps are inserted only where absent (present
// lists the jump rules already there; nil means none).
func iptablesPayload(s Spec, f family, present map[string]bool) string {
	var b strings.Builder
	want := iptablesWant(s, f)
	for _, table := range ipTables(s, f) {
		fmt.Fprintf(&b, "*%s\n", table)
		for _, h := range hooks {
			if c := ipChains[h]; c.table == table {
				fmt.Fprintf(&b, ":%s - [0:0]\n", c.chain)
			}
		}
		for _, h := range hooks {
			c := ipChains[h]
			if c.table == table && !present[table+" "+jumpRule(c)] {
				fmt.Fprintf(&b, "-I %s 1 -j %s\n", c.parent, c.chain)
			}
		}
		for _, l := range want[table] {
			b.WriteString(l + "\n")
		}
		b.WriteString("COMMIT\n")
	}
	return b.String()
}

func variantBinary(b Backend, f family, tool string) string {
	name := "iptables"
	if f == 6 {
		name = "ip6tables"
	}
	v := "legacy"
	if b == IptablesNft {
		v = "nft"
	}
	if tool == "" {
		return name + "-" + v
	}
	return name + "-" + v + "-" + tool
}

func restoreCommand(b Backend, f family) string {
	return variantBinary(b, f, "restore") + " --noflush"
}

// runIn runs one iptables tool inside netns. The run ends with ctx or
// after its own bound (runTimeout), whichever comes first: a plugin request passes
// its deadline, which on a busy node the host-wide xtables lock can
// outlast, while a caller without one keeps the fixed bound.
func runIn(ctx context.Context, netns ns.NetNS, stdin string, name string, args ...string) ([]byte, error) {
	cmdline := strings.TrimSpace(name + " " + strings.Join(args, " "))
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("%s: not started, %s: %w", cmdline, endedBy(ctx), err)
	}
	path, err := exec.LookPath(name)
	if err != nil {
		return nil, fmt.Errorf("%s not found: install the iptables package or choose the nftables backend", name)
	}
	var out []byte
	err = netns.Do(func(ns.NetNS) error {
		bound := runTimeout(ctx)
		rctx, cancel := context.WithTimeout(ctx, bound)
		defer cancel()
		start := time.Now()
		cmd := exec.CommandContext(rctx, path, args...)
		EndWithGroup(cmd)
		if stdin != "" {
			cmd.Stdin = strings.NewReader(stdin)
		}
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		o, err := cmd.Output()
		out = o
		if err != nil && rctx.Err() != nil {
			return stoppedRun(ctx, cmdline, time.Since(start), bound, takesXtablesLock(name))
		}
		if err != nil {
			return fmt.Errorf("%s: %v: %s", cmdline, err, strings.TrimSpace(stderr.String()))
		}
		return nil
	})
	return out, err
}

// run is runIn in s's netns, under s's context and, during an install's
// work, its budget: the run ends the rollback's reserve before the
// caller's deadline, and its time sizes that reserve.
func (s *session) run(stdin string, name string, args ...string) ([]byte, error) {
	ctx, cancel := s.budget.run(s.ctx)
	defer cancel()
	start := time.Now()
	out, err := runIn(ctx, s.netns, stdin, name, args...)
	s.budget.ran(ctx, name, time.Since(start), err)
	return out, err
}

// takesXtablesLock tells the runs that wait for the host's xtables lock
// (--wait): the legacy variant's restores. iptables-nft and the saves
// never take it.
func takesXtablesLock(name string) bool { return strings.HasSuffix(name, "-legacy-restore") }

// endedBy says why ctx ended, for messages.
func endedBy(ctx context.Context) string {
	if errors.Is(ctx.Err(), context.Canceled) {
		return "the caller gave up (canceled)"
	}
	if r, ok := ctx.Value(reserveKey{}).(time.Duration); ok {
		return fmt.Sprintf("the last %s before the caller's deadline is kept for undoing a cut install", r.Round(time.Millisecond))
	}
	return "the caller's deadline has passed"
}

// endedAt says when a run stopped by ctx's deadline stopped, for
// messages.
func endedAt(ctx context.Context) string {
	if r, ok := ctx.Value(reserveKey{}).(time.Duration); ok {
		return fmt.Sprintf("%s before the caller's deadline, the time kept for undoing a cut install", r.Round(time.Millisecond))
	}
	return "at the caller's deadline"
}

// stoppedRun is the error of a run killed before it finished, at ctx's
// end or at its own bound. At ctx's end it wraps the context error, so a
// caller tells "out of time: retry" from a rule the kernel refused; at
// the bound it wraps ErrRunTimeout, the tool's failure. It names the
// xtables lock's holder when the run was waiting for it.
func stoppedRun(ctx context.Context, cmdline string, took, bound time.Duration, locks bool) error {
	why, cause := fmt.Sprintf("at its own %s bound (not the caller's deadline)", bound), error(nil)
	if err := ctx.Err(); err != nil {
		why, cause = "when "+endedBy(ctx), err
		if !errors.Is(err, context.Canceled) {
			why = endedAt(ctx)
		}
	}
	msg := fmt.Sprintf("%s: stopped after %s, %s", cmdline, took.Round(time.Millisecond), why)
	if locks {
		msg += ", " + XtablesLockWait()
	}
	if cause == nil {
		return &runTimeoutError{msg}
	}
	return fmt.Errorf("%s: %w", msg, cause)
}

// textLines yields out's lines without their line ends, however long.
// bufio.Scanner stops at its 64 KiB token limit, and a loop over
// sc.Scan() then ends there as if the save did: a rule of someone
// else's with a long match or comments dropped every line after it.
func textLines(out []byte) iter.Seq[string] {
	return func(yield func(string) bool) {
		for l := range bytes.Lines(out) {
			if !yield(strings.TrimSuffix(string(l), "\n")) {
				return
			}
		}
	}
}

// saveLines returns "table line" for every rule line of iptables-save.
func saveLines(out []byte) map[string]bool {
	m := map[string]bool{}
	table := ""
	for l := range textLines(out) {
		switch {
		case strings.HasPrefix(l, "*"):
			table = l[1:]
		case strings.HasPrefix(l, "-A "):
			m[table+" "+l] = true
		}
	}
	return m
}

// ourSaveLines returns, per table, our chain rules in order plus a set of
// jump lines.
func ourSaveLines(out []byte) (rules map[string][]string, jumps map[string]int, chains map[string]bool) {
	rules, jumps, chains = map[string][]string{}, map[string]int{}, map[string]bool{}
	table := ""
	for l := range textLines(out) {
		switch {
		case strings.HasPrefix(l, "*"):
			table = l[1:]
		case strings.HasPrefix(l, ":"+ChainPrerouting+" ") || strings.HasPrefix(l, ":"+ChainOutput+" "):
			chains[table+" "+strings.Fields(l[1:])[0]] = true
		case strings.HasPrefix(l, "-A "+ChainPrerouting+" ") || strings.HasPrefix(l, "-A "+ChainOutput+" "):
			rules[table] = append(rules[table], l)
		case strings.HasPrefix(l, "-A ") && (strings.HasSuffix(l, " -j "+ChainPrerouting) || strings.HasSuffix(l, " -j "+ChainOutput)):
			jumps[table+" "+l]++
		}
	}
	return
}

// iptablesTools reports the first tool an install of s with b needs
// that the node lacks (nil for nftables, or when all are there).
func iptablesTools(b Backend, s Spec) error {
	if b == Nftables {
		return nil
	}
	for _, f := range families(s) {
		for _, tool := range []string{"save", "restore"} {
			if name := variantBinary(b, f, tool); !haveTool(name) {
				return fmt.Errorf("%s not found: install the iptables package or choose the nftables backend", name)
			}
		}
	}
	return nil
}

func haveTool(name string) bool {
	_, err := exec.LookPath(name)
	return err == nil
}

func iptablesInstall(ss *session, b Backend, s Spec) error {
	for _, f := range families(s) {
		out, err := ss.run("", variantBinary(b, f, "save"))
		if err != nil {
			return err
		}
		if testHookBetweenRuns != nil {
			testHookBetweenRuns(f)
		}
		payload := iptablesPayload(s, f, saveLines(out))
		if _, err := ss.run(payload, variantBinary(b, f, "restore"), "--noflush", "--wait"); err != nil {
			return err
		}
	}
	return nil
}

// testHookBetweenRuns, when set (tests), runs before each family's
// restore.
var testHookBetweenRuns func(f family)

func iptablesVerify(ss *session, b Backend, s Spec) error {
	var problems []string
	for _, f := range []family{4, 6} {
		enabled := (f == 4 && s.IPv4) || (f == 6 && s.IPv6)
		if _, err := exec.LookPath(variantBinary(b, f, "save")); err != nil && !enabled {
			// A node without ip6tables runs with ipv6: off (as the
			// host rules require): no tool put rules of ours there,
			// and failing for it had every such pod "repaired" by
			// the periodic check (TestIPv4OnlyWithoutIp6tables).
			// Install and removal skip a missing tool the same way.
			continue
		}
		out, err := ss.run("", variantBinary(b, f, "save"))
		if err != nil {
			return err
		}
		rules, jumps, chains := ourSaveLines(out)
		if !enabled {
			if len(rules)+len(jumps)+len(chains) > 0 {
				problems = append(problems, fmt.Sprintf("IPv%d rules present although the spec disables IPv%d", f, f))
			}
			continue
		}
		want := iptablesWant(s, f)
		for _, table := range ipTables(s, f) {
			for _, h := range hooks {
				c := ipChains[h]
				if c.table != table {
					continue
				}
				if n := jumps[table+" "+jumpRule(c)]; n != 1 {
					problems = append(problems, fmt.Sprintf("IPv%d %s: %d jumps %s → %s (want 1)", f, table, n, c.parent, c.chain))
				}
			}
			gotC, wantC := byChain(rules[table]), byChain(want[table])
			for _, chain := range []string{ChainPrerouting, ChainOutput} {
				got, w := gotC[chain], wantC[chain]
				for i := range w {
					if i >= len(got) {
						problems = append(problems, fmt.Sprintf("IPv%d %s: missing %q", f, table, w[i]))
					} else if got[i] != w[i] {
						problems = append(problems, fmt.Sprintf("IPv%d %s: rule %d of %s is %q, want %q", f, table, i, chain, got[i], w[i]))
					}
				}
				for i := len(w); i < len(got); i++ {
					problems = append(problems, fmt.Sprintf("IPv%d %s: unexpected %q", f, table, got[i]))
				}
			}
		}
	}
	if len(problems) > 0 {
		return fmt.Errorf("%s rules differ: %s", b, strings.Join(problems, "; "))
	}
	return nil
}

// iptablesPresent reports whether variant b holds any chain of ours in
// netns, as cheaply as possible: the nft variant is read over netlink,
// the legacy one only when the kernel has legacy nat, mangle or filter
// tables there.
func iptablesPresent(s *session, b Backend) (bool, error) {
	netns := s.netns
	if b == IptablesNft {
		c, err := s.conn()
		if err != nil {
			return false, nil // no nf_tables, so no iptables-nft state
		}
		for _, fam := range []nftables.TableFamily{nftables.TableFamilyIPv4, nftables.TableFamilyIPv6} {
			chains, err := c.ListChainsOfTableFamily(fam)
			if err != nil {
				s.reset()
				return false, nil // no nf_tables, so no iptables-nft state
			}
			for _, ch := range chains {
				if ch.Name == ChainPrerouting || ch.Name == ChainOutput {
					return true, nil
				}
			}
		}
		return false, nil
	}
	var found bool
	err := netns.Do(func(ns.NetNS) error {
		found = legacyTablesHere()
		return nil
	})
	if err != nil || !found {
		return false, err
	}
	for _, f := range []family{4, 6} {
		if _, err := exec.LookPath(variantBinary(b, f, "save")); err != nil {
			continue
		}
		out, err := s.run("", variantBinary(b, f, "save"))
		if err != nil {
			return false, err
		}
		_, jumps, chains := ourSaveLines(out)
		if len(jumps)+len(chains) > 0 {
			return true, nil
		}
	}
	return false, nil
}

// legacyTablesHere reports whether the calling thread's netns has a
// legacy nat, mangle or filter table, where chains of ours could be. The
// filter table counts too: an IPv6 restore commits it first (the
// link-local refusal) and takes the xtables lock again for mangle, so a
// cut there leaves our filter chain in a netns with no legacy nat or
// mangle table; looked for only there, it was never found, and neither
// a rollback nor a DEL nor an unenroll removed it
// (TestLegacyFilterOnlyStateIsFound).
// The files are read with bare system calls: an *os.File costs a fcntl,
// an fstat and a finalizer each, half of this function's time, and the
// periodic check of every pod calls it.
func legacyTablesHere() bool {
	var buf [256]byte
	for _, f := range []string{"/proc/thread-self/net/ip_tables_names", "/proc/thread-self/net/ip6_tables_names"} {
		fd, err := unix.Open(f, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			continue // module not loaded: no legacy tables anywhere
		}
		var names []byte
		for {
			n, err := unix.Read(fd, buf[:])
			if n <= 0 || err != nil {
				break
			}
			names = append(names, buf[:n]...)
		}
		unix.Close(fd)
		for _, t := range strings.Fields(string(names)) {
			if t == "nat" || t == "mangle" || t == "filter" {
				return true
			}
		}
	}
	return false
}

// iptablesUninstall removes our jumps and chains for variant b with one
// iptables-restore --noflush payload per family (delete every jump to our
// chains, flush and delete the chains), built from what iptables-save
// shows: one exec pair instead of dozens of go-iptables calls, and atomic
// per table. Rules of others in the same tables stay untouched.
func iptablesUninstall(s *session, b Backend) error {
	var errs []error
	for _, f := range []family{4, 6} {
		if _, err := exec.LookPath(variantBinary(b, f, "restore")); err != nil {
			continue
		}
		out, err := s.run("", variantBinary(b, f, "save"))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		payload := removalPayload(out)
		if payload == "" {
			continue
		}
		if _, err := s.run(payload, variantBinary(b, f, "restore"), "--noflush", "--wait"); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// removalPayload turns iptables-save output into the restore input that
// removes our state; "" when there is none.
func removalPayload(save []byte) string {
	_, jumps, chains := ourSaveLines(save)
	var b strings.Builder
	for _, table := range removalTables {
		var lines []string
		for j, n := range jumps {
			t, rule, _ := strings.Cut(j, " ")
			if t != table {
				continue
			}
			for i := 0; i < n; i++ {
				lines = append(lines, "-D"+strings.TrimPrefix(rule, "-A"))
			}
		}
		sort.Strings(lines)
		for _, ch := range []string{ChainPrerouting, ChainOutput} {
			if chains[table+" "+ch] {
				lines = append(lines, "-F "+ch, "-X "+ch)
			}
		}
		if len(lines) > 0 {
			fmt.Fprintf(&b, "*%s\n%s\nCOMMIT\n", table, strings.Join(lines, "\n"))
		}
	}
	return b.String()
}
