package netnsfind

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
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
}

// ErrNotFound: no namespace holds any of the pod's IPs.
var ErrNotFound = errors.New("no network namespace holds the pod's IPs")

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
