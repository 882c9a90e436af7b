package instance

import (
	"os"
	"path/filepath"
	"runtime"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambit-mesh/ambit/internal/testenv"
)

// withoutDACOverride runs fn on a thread that lost CAP_DAC_OVERRIDE and
// CAP_DAC_READ_SEARCH, so file permissions apply to it although it is
// root: capabilities are per thread, and the thread, never unlocked,
// exits with its goroutine instead of serving others.
func withoutDACOverride(t *testing.T, fn func()) {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
		var data [2]unix.CapUserData
		if err := unix.Capget(&hdr, &data[0]); err != nil {
			errc <- err
			return
		}
		data[0].Effective &^= 1<<unix.CAP_DAC_OVERRIDE | 1<<unix.CAP_DAC_READ_SEARCH
		if err := unix.Capset(&hdr, &data[0]); err != nil {
			errc <- err
			return
		}
		fn()
		errc <- nil
	}()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

// twoAgents registers an older and a ready newer agent in dir.
func twoAgents(t *testing.T, dir string) (old, neu *Self) {
	t.Helper()
	old, err := Register(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { old.Close() })
	time.Sleep(time.Microsecond)
	neu, err = Register(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { neu.Close() })
	neu.SetReady()
	return old, neu
}

// An entry that exists but cannot be opened (here EACCES, for real: the
// entry's mode is 0 and the looking thread has no DAC override) is of an
// agent whose state is unknown, not of a dead one: it is not pruned, and
// still counts as a successor. Taking it for dead removed a live agent's
// registration, and made the older agent take back the host rules, the
// node's files and the plugin socket from a newer agent that serves.
func TestUnopenableEntryIsNotDead(t *testing.T) {
	testenv.RequireRoot(t)
	dir := t.TempDir()
	old, neu := twoAgents(t, dir)
	entry := filepath.Join(dir, Dir, neu.Name())
	if err := os.Chmod(entry, 0); err != nil {
		t.Fatal(err)
	}
	var (
		openErr         error
		succ, readySucc Peer
		ok, readyOK     bool
		others          bool
	)
	withoutDACOverride(t, func() {
		f, err := os.Open(entry)
		if err == nil {
			f.Close()
		}
		openErr = err
		old.Prune()
		succ, ok = old.Successor()
		readySucc, readyOK = old.ReadySuccessor()
		others = old.Others()
	})
	if !os.IsPermission(openErr) {
		t.Fatalf("opening the entry without DAC override: %v, want EACCES (the test proves nothing)", openErr)
	}
	if _, err := os.Stat(entry); err != nil {
		t.Fatalf("a live agent's entry was pruned because it could not be opened: %v", err)
	}
	if !ok || succ.Name != neu.Name() {
		t.Fatalf("Successor with the entry unreadable: %+v %v, want the live newer agent", succ, ok)
	}
	if !readyOK || readySucc.Name != neu.Name() {
		t.Fatalf("ReadySuccessor with the entry unreadable: %+v %v, want the live newer agent", readySucc, readyOK)
	}
	if !others {
		t.Fatal("Others with the entry unreadable: false, want true")
	}
	// Gone for real: dead, pruned.
	neu.Close()
	old.Prune()
	if p, ok := old.Successor(); ok {
		t.Fatalf("after the newer agent closed: successor %+v", p)
	}
}

// A registry that cannot be read at all (the process out of descriptors:
// EMFILE, for real, RLIMIT_NOFILE lowered to 0 for an instant) says
// nothing about the other agents: Successor keeps the last answer rather
// than report none (which made the older agent act as the newest).
func TestUnreadableRegistryKeepsLastAnswer(t *testing.T) {
	dir := t.TempDir()
	old, neu := twoAgents(t, dir)
	if p, ok := old.Successor(); !ok || p.Name != neu.Name() {
		t.Fatalf("Successor: %+v %v, want the newer agent", p, ok)
	}
	if !old.Others() {
		t.Fatal("Others: false with a newer agent running")
	}
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	low := lim
	low.Cur = 0
	var (
		probe           error
		succ, readySucc Peer
		ok, readyOK     bool
		others          bool
	)
	func() {
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &low); err != nil {
			t.Fatal(err)
		}
		defer syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
		_, probe = os.ReadDir(filepath.Join(dir, Dir))
		old.Prune()
		succ, ok = old.Successor()
		readySucc, readyOK = old.ReadySuccessor()
		others = old.Others()
	}()
	if probe == nil {
		t.Fatal("the registry was readable with RLIMIT_NOFILE 0: the test proves nothing")
	}
	if !ok || succ.Name != neu.Name() || !succ.Ready {
		t.Fatalf("Successor while the registry cannot be read (%v): %+v %v, want the last answer (the newer agent, ready)", probe, succ, ok)
	}
	if !readyOK || readySucc.Name != neu.Name() {
		t.Fatalf("ReadySuccessor while the registry cannot be read: %+v %v, want the newer agent", readySucc, readyOK)
	}
	if !others {
		t.Fatal("Others while the registry cannot be read: false, want the last answer (true)")
	}
	if _, err := os.Stat(filepath.Join(dir, Dir, neu.Name())); err != nil {
		t.Fatalf("the newer agent's entry: %v", err)
	}
	// Readable again: the registry's answer, not the remembered one.
	neu.Stopping()
	if p, ok := old.Successor(); ok {
		t.Fatalf("after the newer agent marked itself stopping: successor %+v", p)
	}
}

// An entry last seen stopping that cannot be opened any more stays
// stopping: the older agent keeps what it took back from the draining
// agent rather than yield it again to an agent that maintains nothing.
func TestUnopenableStoppingEntryStaysStopping(t *testing.T) {
	testenv.RequireRoot(t)
	dir := t.TempDir()
	old, neu := twoAgents(t, dir)
	neu.Stopping()
	if p, ok := old.Successor(); ok {
		t.Fatalf("a stopping agent counts as a successor: %+v", p)
	}
	entry := filepath.Join(dir, Dir, neu.Name())
	if err := os.Chmod(entry, 0); err != nil {
		t.Fatal(err)
	}
	var (
		succ Peer
		ok   bool
	)
	withoutDACOverride(t, func() {
		old.Prune()
		succ, ok = old.Successor()
	})
	if ok {
		t.Fatalf("Successor with the stopping agent's entry unreadable: %+v, want none", succ)
	}
	if _, err := os.Stat(entry); err != nil {
		t.Fatalf("a live (stopping) agent's entry was pruned: %v", err)
	}
}
