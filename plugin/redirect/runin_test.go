package redirect

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/plugin/internal/nstest"
)

// TestRunInCutWithChildHoldingOutput: an iptables run cut by its
// context has a child that keeps its output open (iptables-legacy
// forks modprobe for a table module not loaded yet; a modprobe stuck in
// the kernel's module loading outlives its parent). The run must still
// end with the context, and the child with it: the caller's deadline is
// a plugin request's, and an orphan left holding the pipe would wait on.
// Before, only the tool itself was killed and the run returned when the
// child let go of the pipe (the child here: 60 s).
func TestRunInCutWithChildHoldingOutput(t *testing.T) {
	testenv.RequireRoot(t)
	n := nstest.New(t, "ri")
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "child.pid")
	script := "#!/bin/sh\nsleep 60 &\necho $! > " + pidFile + "\nwait\n"
	if err := os.WriteFile(filepath.Join(dir, "ambit-fake-save"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", dir+string(os.PathListSeparator)+os.Getenv("PATH"))

	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	start := time.Now()
	done := make(chan error, 1)
	go func() {
		_, err := runIn(ctx, n, "", "ambit-fake-save")
		done <- err
	}()
	var err error
	select {
	case err = <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("the cut run did not return within 20 s of its 500 ms deadline (its child holds its output for 60 s)")
	}
	t.Logf("cut run: %v after %v", err, time.Since(start).Round(time.Millisecond))
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "at the caller's deadline") {
		t.Errorf("error of the cut run: %v", err)
	}
	b, rerr := os.ReadFile(pidFile)
	if rerr != nil {
		t.Fatal(rerr)
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	gone := false
	for range 50 {
		// Dead, or a zombie its new parent has not reaped yet.
		stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		if err != nil || strings.Contains(string(stat), ") Z ") {
			gone = true
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !gone {
		t.Errorf("the run's child (pid %d) outlived the cut run", pid)
	}
}

// TestRunInOutputDrainedLate: a run that ends on its own, successfully,
// whose output reaches us late (here a child of the tool writes its
// last line 500 ms after the tool exited; on a loaded node the
// goroutine draining the pipe of a save can be that late). Its output
// must be read whole and the run succeed. Before, the 200 ms WaitDelay,
// meant for a cut run, ran from the exit of every run: the pipes were
// closed under the reader and the save failed, "exec: WaitDelay expired
// before I/O complete" (an ip6tables-nft-save in TestRecheckSeesChanges
// under a parallel test load).
func TestRunInOutputDrainedLate(t *testing.T) {
	testenv.RequireRoot(t)
	n := nstest.New(t, "ri")
	dir := t.TempDir()
	script := "#!/bin/sh\necho first\n(sleep 0.5; echo second) &\nexit 0\n"
	if err := os.WriteFile(filepath.Join(dir, "ambit-fake-save"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", dir+string(os.PathListSeparator)+os.Getenv("PATH"))
	out, err := runIn(context.Background(), n, "", "ambit-fake-save")
	if err != nil || string(out) != "first\nsecond\n" {
		t.Errorf("run whose output came 500 ms after its exit: %q, %v; want both lines, no error", out, err)
	}
}
