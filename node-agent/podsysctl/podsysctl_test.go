package podsysctl

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/ambit-mesh/ambit/internal/testenv"
)

// newNetns makes a named network namespace for the test and returns its
// name and an open handle on it.
func newNetns(t *testing.T) (string, *os.File) {
	t.Helper()
	name := fmt.Sprintf("amb-sysctl-%d", os.Getpid())
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer orig.Close()
	h, err := netns.NewNamed(name)
	if err != nil {
		t.Fatal(err)
	}
	h.Close()
	if err := netns.Set(orig); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { netns.DeleteNamed(name) })
	f, err := os.Open("/var/run/netns/" + name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return name, f
}

func sysctlIn(t *testing.T, name, key string) string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "exec", name, "sysctl", "-n", key).CombinedOutput()
	if err != nil {
		t.Fatalf("reading %s in %s: %v %s", key, name, err, out)
	}
	return strings.TrimSpace(string(out))
}

// TestSetFromReadOnlyProcSys runs a Writer in a process whose /proc/sys is
// read-only, as container runtimes mount it for the agent: the plain
// setns-and-write fails there (EROFS), the Writer's must not.
func TestSetFromReadOnlyProcSys(t *testing.T) {
	testenv.RequireRoot(t)
	name, _ := newNetns(t)
	if got := sysctlIn(t, name, "net.ipv4.tcp_migrate_req"); got != "0" {
		t.Fatalf("a new netns has tcp_migrate_req=%s, want the default 0", got)
	}
	cmd := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c",
		`mount -o bind,ro /proc/sys /proc/sys && exec "$0" -test.run='^TestHelperContainer$' -test.v`, os.Args[0])
	cmd.Env = append(os.Environ(), "AMBIT_PODSYSCTL_HELPER=/var/run/netns/"+name)
	out, err := cmd.CombinedOutput()
	t.Logf("helper:\n%s", out)
	if err != nil {
		t.Fatalf("helper (needs unshare(1) and mount(8) from util-linux): %v", err)
	}
	if !strings.Contains(string(out), "plain write: EROFS") {
		t.Fatal("the helper's /proc/sys was not read-only: the test does not model a container")
	}
	if got := sysctlIn(t, name, "net.ipv4.tcp_migrate_req"); got != "1" {
		t.Fatalf("after Set: tcp_migrate_req=%s in the pod, want 1", got)
	}
	// The agent's own namespace is untouched.
	if b, err := os.ReadFile("/proc/sys/net/ipv4/tcp_migrate_req"); err != nil || strings.TrimSpace(string(b)) != "0" {
		t.Logf("host tcp_migrate_req=%q %v (not ours to check if something else set it)", b, err)
	}
}

// TestHelperContainer is the process TestSetFromReadOnlyProcSys starts
// (the os/exec helper-process idiom): in a normal run it does nothing.
func TestHelperContainer(t *testing.T) {
	path := os.Getenv("AMBIT_PODSYSCTL_HELPER")
	if path == "" {
		return
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// What the agent did before: setns and write through its own /proc.
	runtime.LockOSThread()
	home, _ := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
	if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
		t.Fatal(err)
	}
	werr := os.WriteFile("/proc/sys/net/ipv4/tcp_migrate_req", []byte("1"), 0)
	if err := unix.Setns(int(home.Fd()), unix.CLONE_NEWNET); err != nil {
		t.Fatal(err)
	}
	runtime.UnlockOSThread()
	if errors := fmt.Sprint(werr); strings.Contains(errors, "read-only file system") {
		fmt.Println("plain write: EROFS")
	} else {
		fmt.Println("plain write:", werr)
	}
	var w Writer
	fmt.Println("mode:", w.Mode())
	if err := w.Set(f, "net.ipv4.tcp_migrate_req", "1"); err != nil {
		t.Fatal(err)
	}
	// Many calls share the one thread.
	for range 50 {
		if err := w.Set(f, "net.ipv4.tcp_migrate_req", "1"); err != nil {
			t.Fatal(err)
		}
	}
}

func TestKeysOutsideNetAreRefused(t *testing.T) {
	var w Writer
	for _, k := range []string{"kernel.core_pattern", "net/../kernel/core_pattern", "net.ipv4..x", "vm.swappiness", ""} {
		if err := w.Set(nil, k, "1"); err == nil || !strings.Contains(err.Error(), "not a network sysctl") {
			t.Errorf("Set(%q) = %v, want a refusal", k, err)
		}
	}
}

// BenchmarkSet is the cost the agent pays per pod at enrollment and at
// re-adoption (two setns and a write through the private procfs), over
// eight namespaces in turn as re-adoption would.
func BenchmarkSet(b *testing.B) {
	testenv.RequireRoot(b)
	var fs []*os.File
	for i := range 8 {
		name := fmt.Sprintf("amb-sysctl-b%d-%d", os.Getpid(), i)
		run := func(args ...string) {
			if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
				b.Fatalf("%v: %v %s", args, err, out)
			}
		}
		run("ip", "netns", "add", name)
		b.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
		f, err := os.Open("/var/run/netns/" + name)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { f.Close() })
		fs = append(fs, f)
	}
	var w Writer
	if err := w.Set(fs[0], "net.ipv4.tcp_migrate_req", "1"); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := w.Set(fs[i%len(fs)], "net.ipv4.tcp_migrate_req", "1"); err != nil {
			b.Fatal(err)
		}
	}
}
