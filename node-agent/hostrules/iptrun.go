package hostrules

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/ambit-mesh/ambit/plugin/redirect"
)

// iptWait is how long one iptables-legacy run waits for the host's
// xtables lock (--wait) before it fails, when no caller's deadline ends
// it sooner: the bound of the reconcile loop, Sync, Remove and Add
// without a context. The nft variant accepts the flag and never waits.
const iptWait = 5

// iptRunTimeout bounds a whole run besides the lock wait (an iptables
// that hangs for another reason must not hold Manager's lock for good):
// the default of Config.RunTimeout.
const iptRunTimeout = 10 * time.Second

// iptTool runs one family's iptables binary. Each run ends with the
// caller's context: an ADD waits for the host rules no longer than its
// deadline, where a held xtables lock would otherwise keep it iptWait per
// run (a dozen runs for a rewrite). Runs exec from the calling thread,
// so they act in the network namespace it is in (iptBackend.in).
type iptTool struct {
	name, path string
	// locks: the legacy variant, whose every run takes the xtables
	// lock.
	locks bool
	// bound is the run's own bound (Config.RunTimeout).
	bound time.Duration
}

// iptExit is the error of a run that exited non-zero.
type iptExit struct {
	cmdline string
	status  int
	stderr  string
}

func (e *iptExit) Error() string {
	return fmt.Sprintf("%s: exit status %d: %s", e.cmdline, e.status, e.stderr)
}

// exitStatus is err's exit status, -1 when it is not an iptExit.
func exitStatus(err error) int {
	var e *iptExit
	if errors.As(err, &e) {
		return e.status
	}
	return -1
}

func (t *iptTool) run(ctx context.Context, args ...string) (string, error) {
	cmdline := t.name + " " + strings.Join(args, " ")
	if err := ctx.Err(); err != nil {
		return "", fmt.Errorf("%s: not started: %w", cmdline, err)
	}
	bound := cmp.Or(t.bound, iptRunTimeout)
	rctx, cancel := context.WithTimeout(ctx, bound)
	defer cancel()
	cmd := exec.CommandContext(rctx, t.path, append(args, "--wait", strconv.Itoa(iptWait))...)
	// Ends with its children (iptables-legacy forks modprobe).
	redirect.EndWithGroup(cmd)
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	start := time.Now()
	err := cmd.Run()
	if err != nil && rctx.Err() != nil {
		// A run stopped at its own bound is a failure like any other,
		// not a deadline: wrapping DeadlineExceeded made an ADD with a
		// requestTimeout above the bound refuse its pod as out of time,
		// where other host-rule errors are logged and left to the
		// reconcile loop.
		why, cause := fmt.Sprintf("at its own %s bound", bound), error(nil)
		if err := ctx.Err(); errors.Is(err, context.Canceled) {
			why, cause = "when the caller gave up (canceled)", err
		} else if err != nil {
			why, cause = "at the caller's deadline", err
		}
		msg := fmt.Sprintf("%s: stopped after %s, %s", cmdline, time.Since(start).Round(time.Millisecond), why)
		if t.locks {
			msg += ", " + redirect.XtablesLockWait()
		}
		if cause == nil {
			return "", errors.New(msg)
		}
		return "", fmt.Errorf("%s: %w", msg, cause)
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return out.String(), &iptExit{cmdline: cmdline, status: ee.ExitCode(), stderr: strings.TrimSpace(stderr.String())}
	}
	if err != nil {
		return "", fmt.Errorf("%s: %w", cmdline, err)
	}
	return out.String(), nil
}

// exists tells whether rule is in table/chain (-C: status 1 is "no").
func (t *iptTool) exists(ctx context.Context, table, chain string, rule ...string) (bool, error) {
	_, err := t.run(ctx, append([]string{"-t", table, "-C", chain}, rule...)...)
	switch {
	case err == nil:
		return true, nil
	case exitStatus(err) == 1:
		return false, nil
	}
	return false, err
}

// chainExists tells whether table holds chain (-S of its first rule
// only, however long the chain).
func (t *iptTool) chainExists(ctx context.Context, table, chain string) (bool, error) {
	_, err := t.run(ctx, "-t", table, "-S", chain, "1")
	switch {
	case err == nil:
		return true, nil
	case exitStatus(err) == 1:
		return false, nil
	}
	return false, err
}

// list is chain's -S lines: its -N line, then one per rule.
func (t *iptTool) list(ctx context.Context, table, chain string) ([]string, error) {
	out, err := t.run(ctx, "-t", table, "-S", chain)
	if err != nil {
		return nil, err
	}
	return strings.Split(strings.TrimSuffix(out, "\n"), "\n"), nil
}

// clearChain makes chain exist and empty.
func (t *iptTool) clearChain(ctx context.Context, table, chain string) error {
	_, err := t.run(ctx, "-t", table, "-N", chain)
	if exitStatus(err) == 1 { // there already
		_, err = t.run(ctx, "-t", table, "-F", chain)
	}
	return err
}

func (t *iptTool) append(ctx context.Context, table, chain string, rule ...string) error {
	_, err := t.run(ctx, append([]string{"-t", table, "-A", chain}, rule...)...)
	return err
}

func (t *iptTool) insert(ctx context.Context, table, chain string, pos int, rule ...string) error {
	_, err := t.run(ctx, append([]string{"-t", table, "-I", chain, strconv.Itoa(pos)}, rule...)...)
	return err
}

// deleteAll deletes every copy of rule from table/chain. Two writers
// checking for a missing rule at once (agents side by side during a
// surge, or a restored save) each add it; -D removes one copy, and the
// one left kept the chain it jumps to from being deleted.
func (t *iptTool) deleteAll(ctx context.Context, table, chain string, rule ...string) error {
	for {
		ok, err := t.exists(ctx, table, chain, rule...)
		if err != nil || !ok {
			return err
		}
		if _, err := t.run(ctx, append([]string{"-t", table, "-D", chain}, rule...)...); err != nil {
			return err
		}
	}
}

// clearAndDeleteChain removes chain, if there, with its rules.
func (t *iptTool) clearAndDeleteChain(ctx context.Context, table, chain string) error {
	ok, err := t.chainExists(ctx, table, chain)
	if err != nil || !ok {
		return err
	}
	if _, err := t.run(ctx, "-t", table, "-F", chain); err != nil {
		return err
	}
	_, err = t.run(ctx, "-t", table, "-X", chain)
	return err
}
