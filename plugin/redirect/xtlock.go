package redirect

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// The xtables lock is one file for the whole host, shared by every
// network namespace: iptables-legacy-restore --wait takes it per table
// (on "*table", released at COMMIT), so kube-proxy, a CNI or a firewall
// rewriting the host's rules stalls our restore in a pod's netns. The
// nft variant and this package's netlink backends never take it.

// xtablesLockPath is the lock iptables uses: XTABLES_LOCKFILE, which
// iptables honours and our runs inherit, else the compiled-in default.
func xtablesLockPath() string {
	if p := os.Getenv("XTABLES_LOCKFILE"); p != "" {
		return p
	}
	return "/run/xtables.lock"
}

// XtablesLockWait describes the host's xtables lock for the error of a
// run stopped while it may have waited for it: its path and holder
// ("waiting for the host's xtables lock /run/xtables.lock, held by pid
// 4242 (kube-proxy)"), or, when /proc/locks shows none, the lock as the
// likeliest cause all the same: the one the operator can look at from
// the host.
func XtablesLockWait() string {
	if who, ok := xtablesLockHolder(); ok {
		return fmt.Sprintf("waiting for the host's xtables lock %s, %s", xtablesLockPath(), who)
	}
	return fmt.Sprintf("which waits for the host's xtables lock %s (no holder in this PID namespace's /proc/locks: free by now, or held from outside it)", xtablesLockPath())
}

// xtablesLockHolder describes who holds the xtables lock, from
// /proc/locks (no lock is taken to find out: even a probe could make
// someone's iptables without --wait fail). ok is false when nobody
// holds it, or it cannot tell: the kernel leaves out of /proc/locks the
// locks of processes outside the reader's PID namespace, so an agent in
// a container without the host's PID namespace never sees kube-proxy's.
func xtablesLockHolder() (who string, ok bool) {
	var st unix.Stat_t
	if err := unix.Stat(xtablesLockPath(), &st); err != nil {
		return "", false
	}
	f, err := os.Open("/proc/locks")
	if err != nil {
		return "", false
	}
	defer f.Close()
	pid, ok := flockHolder(f, unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino)
	if !ok {
		return "", false
	}
	if pid <= 0 {
		// A remote lock (negative); 0 is not printed by current kernels.
		return "held by a process whose pid this namespace does not show", true
	}
	name := ""
	// The pid may have been reused since the lock was taken (the taker
	// died, a child it forked keeps the lock): the name is a hint.
	if comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); err == nil {
		name = " (" + strings.TrimSpace(string(comm)) + ")"
	}
	return "held by pid " + strconv.Itoa(pid) + name, true
}

// flockHolder returns the pid of the process holding a flock on the
// file (major, minor, inode) in r, /proc/locks' text: lines like
// "1: FLOCK  ADVISORY  WRITE 4242 fe:00:9773057 0 EOF", where a waiter's
// line has "->" after the number. It reads line by line and stops at the
// holder's; a line it cannot parse is skipped, an overlong one ends the
// search (ok false).
func flockHolder(r io.Reader, major, minor uint32, ino uint64) (pid int, ok bool) {
	// As the kernel prints it: "%02x:%02x:%lu".
	dev := fmt.Sprintf("%02x:%02x:%d", major, minor, ino)
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 6 || f[1] != "FLOCK" || f[5] != dev {
			continue
		}
		n, err := strconv.Atoi(f[4])
		if err != nil {
			continue
		}
		return n, true
	}
	return 0, false
}
