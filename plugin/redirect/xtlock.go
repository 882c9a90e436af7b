package redirect

import (
	"bufio"
	"bytes"
	"fmt"
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

// xtablesLockHolder describes who holds the xtables lock, from
// /proc/locks (no lock is taken to find out: even a probe could make
// someone's iptables without --wait fail). ok is false when nobody
// holds it, or it cannot tell.
func xtablesLockHolder() (who string, ok bool) {
	path := xtablesLockPath()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return "", false
	}
	locks, err := os.ReadFile("/proc/locks")
	if err != nil {
		return "", false
	}
	dev := fmt.Sprintf("%02x:%02x:%d", unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino)
	sc := bufio.NewScanner(bytes.NewReader(locks))
	for sc.Scan() {
		// "1: FLOCK  ADVISORY  WRITE 4242 fe:00:9773057 0 EOF"; a
		// waiter's line has "->" after the number.
		f := strings.Fields(sc.Text())
		if len(f) < 6 || f[1] != "FLOCK" || f[5] != dev {
			continue
		}
		pid := f[4]
		if pid == "0" {
			// Outside our PID namespace: the agent runs in a container.
			return "held by a process outside the agent's PID namespace", true
		}
		name := ""
		if n, err := strconv.Atoi(pid); err == nil {
			if comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", n)); err == nil {
				name = " (" + strings.TrimSpace(string(comm)) + ")"
			}
		}
		return "held by pid " + pid + name, true
	}
	return "", false
}
