package testenv

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// HoldXtablesLock takes the xtables lock as kube-proxy or a CNI
// rewriting the host's rules would (flock, exclusive) and returns its
// release (also run at cleanup). It holds a lock file of the test's own,
// which every iptables run of this process and its children is pointed
// at through XTABLES_LOCKFILE: holding the host's /run/xtables.lock
// would stall, or fail, every other iptables user on the shared
// machine. Run with XTABLES_LOCKFILE=/run/xtables.lock to hold the real
// one.
func HoldXtablesLock(t *testing.T) (release func()) {
	t.Helper()
	path := os.Getenv("XTABLES_LOCKFILE")
	if path == "" {
		path = filepath.Join(t.TempDir(), "xtables.lock")
		t.Setenv("XTABLES_LOCKFILE", path)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	released := false
	release = func() {
		if !released {
			released = true
			f.Close() // drops the flock
		}
	}
	t.Cleanup(release)
	return release
}

// PathWithoutIp6tables sets PATH, for t, to a directory holding the IPv4
// iptables tools of both variants and nothing else: a node without
// ip6tables (nftables works over netlink, without a tool). The tools must
// be installed (.ci/run installs them): their absence fails t.
func PathWithoutIp6tables(t testing.TB) {
	t.Helper()
	dir := t.TempDir()
	for _, v := range []string{"legacy", "nft"} {
		for _, tool := range []string{"", "-save", "-restore"} {
			name := "iptables-" + v + tool
			p, err := exec.LookPath(name)
			if err != nil {
				t.Fatalf("%s not installed (the iptables package)", name)
			}
			if err := os.Symlink(p, filepath.Join(dir, name)); err != nil {
				t.Fatal(err)
			}
		}
	}
	t.Setenv("PATH", dir)
}
