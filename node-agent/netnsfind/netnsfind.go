package netnsfind

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// Namespace is one distinct network namespace found by a scan.
type Namespace struct {
	Inode uint64
	// Path opens it: a bind mount under a netns directory when there is
	// one (stable), else /proc/<pid>/ns/net of its oldest process seen.
	Path  string
	PIDs  []int
	Addrs []netip.Addr
}

// Scanner scans a /proc tree and netns bind-mount directories.
type Scanner struct {
	// ProcRoot is the host's /proc (default /proc).
	ProcRoot string
	// NetnsDirs hold runtimes' bind mounts (default /var/run/netns).
	NetnsDirs []string
}

// Scan is one pass over the namespaces of the host.
type Scan struct {
	byInode map[uint64]*Namespace
	byIP    map[netip.Addr][]*Namespace
	proc    string
	// ownCgroup is the scanning process's /proc/<pid>/cgroup: processes
	// with the same are ours (an iptables run in a pod's netns), never
	// the namespace's owner.
	ownCgroup string
}

// ErrNotFound: no namespace holds any of the pod's IPs.
var ErrNotFound = errors.New("no network namespace holds the pod's IPs")

// ErrOtherPod: the one namespace holding the pod's IPs runs another
// pod's processes (their kubelet pod cgroup names another pod UID): the
// IPs asked for are stale (a previous sandbox's, given since to that
// pod), and the namespace is not this pod's.
var ErrOtherPod = errors.New("the network namespace holding the pod's IPs is another pod's")

// Inode returns the namespace inode of an open netns file.
func Inode(f *os.File) (uint64, error) {
	fi, err := f.Stat()
	if err != nil {
		return 0, err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, errors.New("no inode")
	}
	return st.Ino, nil
}

// ownNetns is the inode of the process's own network namespace: the one
// every unlocked thread is in. Not /proc/self/ns/net: that is the main
// thread's, and the main thread is a thread like any other to the Go
// scheduler; while a goroutine locked to it sits in a pod's namespace
// (podnet, podsysctl), or after one ended there without unlocking (the
// runtime then parks the main thread instead of ending it), it names
// that pod's namespace, and the scan would skip the pod as our own.
func ownNetns() (uint64, error) {
	// Locked so that the thread read is the one this goroutine runs on;
	// unlocked on entry, it is in the process's namespace.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	return inodeOf(fmt.Sprintf("/proc/self/task/%d/ns/net", syscall.Gettid()))
}

func inodeOf(path string) (uint64, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}

// Addrs lists the global unicast addresses configured inside a netns.
func Addrs(f *os.File) ([]netip.Addr, error) {
	h, err := netlink.NewHandleAt(netns.NsHandle(f.Fd()))
	if err != nil {
		return nil, fmt.Errorf("netlink in %s: %w", f.Name(), err)
	}
	defer h.Close()
	list, err := h.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("listing addresses in %s: %w", f.Name(), err)
	}
	var out []netip.Addr
	for _, a := range list {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		if ip.IsLoopback() || ip.IsLinkLocalUnicast() || ip.IsMulticast() || ip.IsUnspecified() {
			continue
		}
		out = append(out, ip)
	}
	return out, nil
}

// HoldsAny reports whether the netns holds one of ips.
func HoldsAny(f *os.File, ips []netip.Addr) (bool, error) {
	have, err := Addrs(f)
	if err != nil {
		return false, err
	}
	for _, a := range have {
		for _, b := range ips {
			if a == b.Unmap() {
				return true, nil
			}
		}
	}
	return false, nil
}

// Scan walks the netns directories and every process, skipping the host's
// and our own namespace, and reads each distinct namespace's addresses.
func (s Scanner) Scan() (*Scan, error) {
	proc := s.ProcRoot
	if proc == "" {
		proc = "/proc"
	}
	dirs := s.NetnsDirs
	if dirs == nil {
		dirs = []string{"/var/run/netns"}
	}
	// The agent runs on the host network, so its own namespace is the
	// host's; PID 1's is skipped too when readable (it is not in some
	// sandboxes). Without either, a scan could pick the host: refuse.
	skip := map[uint64]bool{}
	self, err := ownNetns()
	if err != nil {
		return nil, fmt.Errorf("netnsfind: cannot identify the agent's own network namespace: %w", err)
	}
	skip[self] = true
	if host, err := inodeOf(filepath.Join(proc, "1", "ns", "net")); err == nil {
		skip[host] = true
	}
	sc := &Scan{byInode: map[uint64]*Namespace{}, byIP: map[netip.Addr][]*Namespace{}, proc: proc}
	if b, err := os.ReadFile(filepath.Join(proc, "self", "cgroup")); err == nil {
		sc.ownCgroup = string(b)
	}
	add := func(path string, pid int) {
		ino, err := inodeOf(path)
		if err != nil || skip[ino] {
			return
		}
		n := sc.byInode[ino]
		if n == nil {
			n = &Namespace{Inode: ino, Path: path}
			sc.byInode[ino] = n
		}
		if pid > 0 {
			n.PIDs = append(n.PIDs, pid)
		}
	}
	for _, d := range dirs {
		ents, err := os.ReadDir(d)
		if err != nil {
			continue
		}
		for _, e := range ents {
			add(filepath.Join(d, e.Name()), 0)
		}
	}
	ents, err := os.ReadDir(proc)
	if err != nil {
		return nil, fmt.Errorf("netnsfind: %w", err)
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid <= 1 {
			continue
		}
		add(filepath.Join(proc, e.Name(), "ns", "net"), pid)
	}
	for _, n := range sc.byInode {
		f, err := os.Open(n.Path)
		if err != nil {
			continue // process exited meanwhile
		}
		// The path may now be another namespace (pid reuse): recheck.
		if ino, err := Inode(f); err != nil || ino != n.Inode {
			f.Close()
			continue
		}
		addrs, err := Addrs(f)
		f.Close()
		if err != nil {
			continue
		}
		n.Addrs = addrs
		for _, a := range addrs {
			sc.byIP[a] = append(sc.byIP[a], n)
		}
	}
	return sc, nil
}

// Len is the number of distinct namespaces seen.
func (sc *Scan) Len() int { return len(sc.byInode) }

// Find returns the one namespace holding one of ips; uid (may be empty)
// breaks ties by the cgroup of the namespace's processes.
//
// A lone namespace is not taken on its IP alone either when uid is set:
// if its processes run in kubelet pod cgroups that name other pod UIDs
// and none names uid, it is another pod's (ErrOtherPod). Trusted, a
// stale IP (an API status still naming a previous sandbox's address,
// given since to another pod) had the agent serve this pod, with its
// identity, in that pod's namespace. A namespace whose processes name no
// pod (a bind mount alone, the demo, podman) is taken as before: there
// is nothing to tell.
func (sc *Scan) Find(ips []netip.Addr, uid string) (*Namespace, error) {
	seen := map[uint64]*Namespace{}
	for _, ip := range ips {
		for _, n := range sc.byIP[ip.Unmap()] {
			seen[n.Inode] = n
		}
	}
	switch len(seen) {
	case 0:
		return nil, fmt.Errorf("%w (%v)", ErrNotFound, ips)
	case 1:
		for _, n := range seen {
			if uid == "" || sc.cgroupNames(n, uid) {
				return n, nil
			}
			if others := sc.podUIDs(n); len(others) > 0 {
				return nil, fmt.Errorf("netnsfind: %w: %s (inode %d) holds %v and its processes run in the kubelet cgroup of pod UID %s, not %s; the IPs asked for are stale",
					ErrOtherPod, n.Path, n.Inode, ips, strings.Join(others, ", "), uid)
			}
			return n, nil
		}
	}
	if uid != "" {
		var match []*Namespace
		for _, n := range seen {
			if sc.cgroupNames(n, uid) {
				match = append(match, n)
			}
		}
		if len(match) == 1 {
			return match[0], nil
		}
	}
	return nil, fmt.Errorf("netnsfind: %d distinct network namespaces hold %v and the pod UID does not single one out; refusing to guess", len(seen), ips)
}

// cgroupNames reports whether a process of n runs in a cgroup naming uid
// (systemd writes it with '_' for '-', cgroupfs as is).
func (sc *Scan) cgroupNames(n *Namespace, uid string) bool {
	alt := strings.ReplaceAll(uid, "-", "_")
	for _, pid := range n.PIDs {
		b, err := os.ReadFile(filepath.Join(sc.proc, strconv.Itoa(pid), "cgroup"))
		if err != nil {
			continue
		}
		s := string(b)
		if strings.Contains(s, uid) || strings.Contains(s, alt) {
			return true
		}
	}
	return false
}

// podUIDs lists, sorted, the pod UIDs the kubelet cgroups of n's
// processes name, the scanning process's own cgroup left out.
func (sc *Scan) podUIDs(n *Namespace) []string {
	set := map[string]bool{}
	for _, pid := range n.PIDs {
		b, err := os.ReadFile(filepath.Join(sc.proc, strconv.Itoa(pid), "cgroup"))
		if err != nil || (sc.ownCgroup != "" && string(b) == sc.ownCgroup) {
			continue
		}
		for _, u := range PodUIDsOfCgroup(string(b)) {
			set[u] = true
		}
	}
	return slices.Sorted(maps.Keys(set))
}

// PodUIDsOfCgroup returns the pod UIDs a /proc/<pid>/cgroup names through
// the kubelet's pod cgroups, in either driver's spelling:
//
//	cgroupfs: .../kubepods/burstable/pod<uid>/<container>
//	systemd:  .../kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid with _ for ->.slice/...
//
// UIDs are given with '-' and in lower case. Only a UID of the Kubernetes
// form (a UUID) counts, and only in a kubelet pod cgroup: a cgroupfs
// pod<uid> below a kubepods component, a systemd slice whose name has a
// kubepods part (with a cgroupRoot, kind's /kubelet, the slices are
// kubelet-kubepods-...: every slice spells its ancestry). A path read
// from a cgroup namespace of our own (the agent's container on cgroup
// v2 gets one) is relative to our cgroup: it starts with "..", the
// kubepods ancestors hidden above them, and a pod<uid> after them
// counts. A "podman.slice" or a user's "pods" directory names no pod.
func PodUIDsOfCgroup(content string) []string {
	var out []string
	for line := range strings.Lines(content) {
		// hierarchy-ID:controllers:path
		parts := strings.SplitN(strings.TrimSpace(line), ":", 3)
		if len(parts) != 3 {
			continue
		}
		under := false
		for c := range strings.SplitSeq(parts[2], "/") {
			if c == ".." || strings.HasPrefix(c, "kubepods") {
				under = true
			}
			var u string
			if name, ok := strings.CutSuffix(c, ".slice"); ok {
				u = podOfSlice(name)
			} else if rest, ok := strings.CutPrefix(c, "pod"); ok && under {
				u = rest
			}
			u = strings.ToLower(strings.ReplaceAll(u, "_", "-"))
			if isUUID(u) && !slices.Contains(out, u) {
				out = append(out, u)
			}
		}
	}
	return out
}

// podOfSlice returns the UID part of a kubelet pod slice's name,
// [prefix-]kubepods[-qos]-pod<uid_>, "" for any other slice. The UID is
// spelt with '_', so the name's last '-' part is it.
func podOfSlice(name string) string {
	ps := strings.Split(name, "-")
	last := ps[len(ps)-1]
	if len(ps) < 2 || !strings.HasPrefix(last, "pod") || !slices.Contains(ps[:len(ps)-1], "kubepods") {
		return ""
	}
	return last[len("pod"):]
}

// isUUID tells the 8-4-4-4-12 hexadecimal form of a Kubernetes UID.
func isUUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i, c := range s {
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return false
			}
		default:
			if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
				return false
			}
		}
	}
	return true
}
