package redirect

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/plugin/internal/nstest"
)

// TestInstallCutAnswersBeforeTheDeadline: on a loaded node (every save
// and restore 80 ms slower, from the install's first run on) an
// install is cut between its families (the IPv6 restore waits for the
// xtables lock), the lock is free again for the rollback, and the
// rollback (check and removal, ~0.75 s here) finishes before the
// caller's 2 s deadline: the agent's answer, which names the lock's
// holder, still reaches the plugin, and kubectl describe shows "retry"
// and who held the lock rather than "closed the connection without
// answering" (101). Before, the install kept a fixed quarter of the
// time (0.5 s) for its rollback and the error came back ~0.3 s after
// the deadline; now it keeps what this install's own runs say the
// rollback will take.
func TestInstallCutAnswersBeforeTheDeadline(t *testing.T) {
	testenv.RequireRoot(t)
	spec := DefaultSpec()
	slowLegacyTools(t, 80*time.Millisecond)()

	n := nstest.New(t, "xa")
	var release func()
	testHookBetweenRuns = func(f family) {
		if f == 6 {
			release = testenv.HoldXtablesLock(t)
		}
	}
	var cut time.Time
	testHookRollback = func() {
		cut = time.Now()
		release()
	}
	defer func() { testHookBetweenRuns, testHookRollback = nil, nil }()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	dl, _ := ctx.Deadline()
	_, err := Install(ctx, n, IptablesLegacy, spec)
	returned := time.Now()
	testHookBetweenRuns, testHookRollback = nil, nil
	t.Logf("Install: %v", err)
	t.Logf("cut %v before the deadline, returned %v before it (rollback %v)",
		dl.Sub(cut).Round(time.Millisecond), dl.Sub(returned).Round(time.Millisecond), returned.Sub(cut).Round(time.Millisecond))
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "ip6tables-legacy-restore") {
		t.Fatalf("Install cut at the IPv6 restore: %v", err)
	}
	if returned.After(dl) {
		t.Errorf("the error came back %v after the caller's deadline: the agent's answer would miss the plugin's", returned.Sub(dl).Round(time.Millisecond))
	}
	holder := fmt.Sprintf("held by pid %d", os.Getpid())
	if !strings.Contains(err.Error(), holder) {
		t.Errorf("error does not name the lock's holder (%q): %v", holder, err)
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
