package redirect

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/plugin/internal/nstest"
)

// TestVerifyCutIsNotADifference: a CHECK's verification is cut by its
// deadline while it reads the rules (here the second
// iptables-legacy-save, the first of the rule comparison, stalls: a
// loaded machine). The pod's rules are intact; the error must say the
// check did not finish (wrapping context.DeadlineExceeded, which the
// agent answers as "retry"), not that the rules differ. Before, the
// cut read became one of the "problems" of a plain error: the agent
// answered CHECK with code 111, "redirection in ...: iptables-legacy-save:
// stopped ..., at the caller's deadline", for healthy rules.
func TestVerifyCutIsNotADifference(t *testing.T) {
	testenv.RequireRoot(t)
	real, err := exec.LookPath("iptables-legacy-save")
	if err != nil {
		t.Fatalf("iptables-legacy-save not installed (the iptables package; .ci/run installs it): %v", err)
	}
	n := nstest.New(t, "vc")
	spec := DefaultSpec()
	if _, err := Install(context.Background(), n, IptablesLegacy, spec); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	count := filepath.Join(dir, "count")
	script := "#!/bin/sh\necho x >> " + count + "\n" +
		"if [ \"$(wc -l < " + count + ")\" -eq 2 ]; then sleep 30; fi\nexec " + real + " \"$@\"\n"
	if err := os.WriteFile(filepath.Join(dir, "iptables-legacy-save"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", dir+string(os.PathListSeparator)+os.Getenv("PATH"))

	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	err = Verify(ctx, n, spec)
	t.Logf("Verify cut while reading: %v", err)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("a cut verification does not wrap context.DeadlineExceeded: %v", err)
	}
	if b, _ := os.ReadFile(count); strings.Count(string(b), "x") != 2 {
		t.Fatalf("the stall was not at the second save (%d saves)", strings.Count(string(b), "x"))
	}
}
