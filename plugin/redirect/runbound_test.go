package redirect

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/plugin/internal/nstest"
)

// TestRunStoppedAtItsOwnBound: an iptables-legacy install whose restore
// hangs (the held xtables lock stands in for a hung tool) past the run's
// own bound (here 300 ms, WithRunTimeout) while the caller's deadline (5
// s) is far off. The error is the tool's failure, ErrRunTimeout, saying
// which bound; it does not wrap context.DeadlineExceeded, which callers
// read as "out of time, retry". Before, it did: an agent whose
// requestTimeout exceeds the 10 s bound answered a hung restore as its
// request's deadline. The caller's deadline, reached first, still wraps
// DeadlineExceeded and not ErrRunTimeout.
func TestRunStoppedAtItsOwnBound(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.HoldXtablesLock(t)
	spec := DefaultSpec()

	n := nstest.New(t, "rb")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := Install(WithRunTimeout(ctx, 300*time.Millisecond), n, IptablesLegacy, spec)
	t.Logf("run bound 300 ms, caller's deadline 5 s: %v", err)
	if err == nil {
		t.Fatal("Install succeeded while the xtables lock was held")
	}
	if !errors.Is(err, ErrRunTimeout) || errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("error: ErrRunTimeout %v, DeadlineExceeded %v; want true, false",
			errors.Is(err, ErrRunTimeout), errors.Is(err, context.DeadlineExceeded))
	}
	for _, want := range []string{"iptables-legacy-restore", "at its own 300ms bound", "xtables lock"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not say %q: %v", want, err)
		}
	}
	if found, ferr := Installed(context.Background(), n); ferr != nil || len(found) != 0 {
		t.Errorf("rules left by the failed install: %v %v", found, ferr)
	}

	n2 := nstest.New(t, "rb")
	ctx2, cancel2 := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel2()
	_, err = Install(WithRunTimeout(ctx2, time.Minute), n2, IptablesLegacy, spec)
	t.Logf("run bound 1 min, caller's deadline 1.5 s: %v", err)
	if !errors.Is(err, context.DeadlineExceeded) || errors.Is(err, ErrRunTimeout) {
		t.Errorf("error: DeadlineExceeded %v, ErrRunTimeout %v; want true, false: %v",
			errors.Is(err, context.DeadlineExceeded), errors.Is(err, ErrRunTimeout), err)
	}
}
