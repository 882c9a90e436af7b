package netnsfind

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/ambit-mesh/ambit/internal/testenv"
)

// uniqueIP returns a random address of 10.231.0.0/16, a block no other
// test uses. A scan sees every namespace of the machine, those of other
// packages' tests running beside this one (go test -p 2, or someone
// else's run) included: with fixed addresses TestFindByIP found the
// agent's and hostrules' 10.77.1.2 as a second namespace and refused to
// guess.
func uniqueIP() netip.Addr {
	var b [2]byte
	rand.Read(b[:])
	return netip.AddrFrom4([4]byte{10, 231, b[0], 1 + b[1]%254})
}

// newNetns makes a named netns (amb-agt-*) holding addr on a dummy link.
func newNetns(t *testing.T, addr string) (string, *os.File) {
	t.Helper()
	b := make([]byte, 4)
	rand.Read(b)
	name := "amb-agt-" + hex.EncodeToString(b)
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
	t.Cleanup(func() { netns.DeleteNamed(name) })
	defer netns.Set(orig)
	defer h.Close()
	// The pod address on lo: dummy links need a module this kernel lacks.
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	pfx, _ := netlink.ParseAddr(addr)
	if err := netlink.AddrAdd(lo, pfx); err != nil {
		t.Fatal(err)
	}
	netlink.LinkSetUp(lo)
	f, err := os.Open("/var/run/netns/" + name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return name, f
}

// startIn runs argv inside the named netns in a process group of its own
// and kills the whole group at cleanup: killing only the shell left its
// sleeps running, and they kept the deleted namespace, address and all,
// alive for the next -count iteration to find instead of its own.
func startIn(t *testing.T, name string, argv ...string) {
	t.Helper()
	cmd := exec.Command("ip", append([]string{"netns", "exec", name}, argv...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		cmd.Wait()
	})
}

func TestFindByIP(t *testing.T) {
	testenv.RequireRoot(t)
	ip, unknown := uniqueIP(), uniqueIP()
	for unknown == ip {
		unknown = uniqueIP()
	}
	name, f := newNetns(t, ip.String()+"/32")
	got, err := HoldsAny(f, []netip.Addr{ip})
	if err != nil || !got {
		t.Fatalf("HoldsAny = %v %v", got, err)
	}
	sc, err := Scanner{}.Scan()
	if err != nil {
		t.Fatal(err)
	}
	n, err := sc.Find([]netip.Addr{ip}, "")
	if err != nil {
		t.Fatal(err)
	}
	want, _ := Inode(f)
	if n.Inode != want || !strings.HasSuffix(n.Path, name) {
		t.Fatalf("found %+v, want inode %d (%s)", n, want, name)
	}
	if _, err := sc.Find([]netip.Addr{unknown}, ""); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown IP: %v", err)
	}
}

func TestNeverHostNetns(t *testing.T) {
	testenv.RequireRoot(t)
	// Every address of the host (and loopback) must be refused.
	var hostIPs []netip.Addr
	addrs, _ := net.InterfaceAddrs()
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil {
			hostIPs = append(hostIPs, p.Addr())
		}
	}
	hostIPs = append(hostIPs, netip.MustParseAddr("127.0.0.1"))
	newNetns(t, uniqueIP().String()+"/32") // something else to scan
	sc, err := Scanner{}.Scan()
	if err != nil {
		t.Fatal(err)
	}
	hostIno, _ := inodeOf("/proc/1/ns/net")
	for _, ip := range hostIPs {
		n, err := sc.Find([]netip.Addr{ip}, "")
		if err == nil && n.Inode == hostIno {
			t.Fatalf("host netns picked for %s", ip)
		}
	}
}

func TestAmbiguousIsAnError(t *testing.T) {
	testenv.RequireRoot(t)
	// Two namespaces with the same IP, one also seen through a process:
	// deduplicated per namespace, and with two namespaces no guess.
	ip := uniqueIP()
	name, _ := newNetns(t, ip.String()+"/32")
	newNetns(t, ip.String()+"/32")
	startIn(t, name, "sleep", "30")
	sc, err := Scanner{}.Scan()
	if err != nil {
		t.Fatal(err)
	}
	_, err = sc.Find([]netip.Addr{ip}, "some-uid")
	if err == nil || !strings.Contains(err.Error(), "refusing to guess") {
		t.Fatalf("ambiguous find: %v", err)
	}
}

func TestProcessOnlyNamespace(t *testing.T) {
	testenv.RequireRoot(t)
	// A namespace reachable only through a process (no bind mount in the
	// scanned dirs) is found through /proc and deduplicated.
	ip := uniqueIP()
	name, f := newNetns(t, ip.String()+"/32")
	startIn(t, name, "sh", "-c", "sleep 30 & sleep 30")
	want, _ := Inode(f)
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		sc, err := Scanner{NetnsDirs: []string{}}.Scan()
		if err != nil {
			t.Fatal(err)
		}
		n, err := sc.Find([]netip.Addr{ip}, "")
		if err == nil {
			if n.Inode != want || !strings.HasPrefix(n.Path, "/proc/") {
				t.Fatalf("found %+v", n)
			}
			return
		}
		if !errors.Is(err, ErrNotFound) {
			t.Fatal(err)
		}
		// the child may not have entered the netns yet
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("namespace of the process not found within 10s")
}

// mainThreadNetnsEnv names a netns the test binary's main thread enters
// during init, for TestScanWhileMainThreadInAPod's child.
const mainThreadNetnsEnv = "AMBIT_NETNSFIND_MAIN_THREAD_NETNS"

func init() {
	name := os.Getenv(mainThreadNetnsEnv)
	if name == "" {
		return
	}
	// Package init runs on the main thread; locked here, the main
	// goroutine keeps it (m.Run waits on it) while tests run on others.
	runtime.LockOSThread()
	h, err := netns.GetFromName(name)
	if err == nil {
		err = netns.Set(h)
	}
	if err != nil {
		panic(err)
	}
}

// The main thread in a pod's namespace (a goroutine locked to it by podnet
// or podsysctl, or one that ended there without unlocking, which parks
// the main thread there for good): /proc/self/ns/net then names the pod,
// and a scan that took it for the agent's own skipped that pod, so live
// enrollment could not find it ("no network namespace holds the pod's
// IPs"). Run in a child whose main thread sits in such a namespace.
func TestScanWhileMainThreadInAPod(t *testing.T) {
	testenv.RequireRoot(t)
	if name := os.Getenv(mainThreadNetnsEnv); name != "" {
		ip := netip.MustParseAddr(os.Getenv(mainThreadNetnsEnv + "_IP"))
		sc, err := Scanner{NetnsDirs: []string{}}.Scan()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := sc.Find([]netip.Addr{ip}, ""); err != nil {
			t.Fatalf("the namespace the main thread is in: %v", err)
		}
		return
	}
	ip := uniqueIP()
	name, _ := newNetns(t, ip.String()+"/32")
	cmd := exec.Command(os.Args[0], "-test.run=^TestScanWhileMainThreadInAPod$", "-test.count=1")
	cmd.Env = append(os.Environ(), mainThreadNetnsEnv+"="+name, mainThreadNetnsEnv+"_IP="+ip.String())
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("scan with the main thread in %s: %v\n%s", name, err, out)
	}
}

// fakeProc is a /proc tree for Scanner.ProcRoot: each process is a
// directory whose ns/net links to a real namespace and whose cgroup file
// says what a kubelet (or nothing) put it in; self/cgroup is the
// scanner's own.
type fakeProc struct {
	t    *testing.T
	root string
	next int
}

func newFakeProc(t *testing.T, selfCgroup string) *fakeProc {
	root := t.TempDir()
	if err := os.MkdirAll(root+"/self", 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(root+"/self/cgroup", []byte(selfCgroup), 0o644); err != nil {
		t.Fatal(err)
	}
	return &fakeProc{t: t, root: root, next: 100}
}

// process adds a process in the netns named name, in cgroup.
func (p *fakeProc) process(name, cgroup string) {
	p.t.Helper()
	dir := p.root + "/" + strconv.Itoa(p.next)
	p.next++
	if err := os.MkdirAll(dir+"/ns", 0o755); err != nil {
		p.t.Fatal(err)
	}
	if err := os.Symlink("/var/run/netns/"+name, dir+"/ns/net"); err != nil {
		p.t.Fatal(err)
	}
	if err := os.WriteFile(dir+"/cgroup", []byte(cgroup), 0o644); err != nil {
		p.t.Fatal(err)
	}
}

const (
	webUID   = "3f0d6a52-9c1e-4b7a-8d2f-0a1b2c3d4e5f"
	otherUID = "8e2b7c14-5d3a-4f6e-9b1c-f0e1d2c3b4a5"
	agentUID = "c1d2e3f4-a5b6-4c7d-8e9f-a0b1c2d3e4f5"
)

// systemdCgroup is a cgroup v2 line as the kubelet's systemd driver
// writes it (containerd), cgroupfsCgroup as its cgroupfs driver does on
// cgroup v1 (every controller).
func systemdCgroup(uid string) string {
	return "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + strings.ReplaceAll(uid, "-", "_") +
		".slice/cri-containerd-4b1f9e0c2d7a.scope\n"
}

func cgroupfsCgroup(uid string) string {
	var b strings.Builder
	for i, c := range []string{"pids", "memory", "cpu,cpuacct", "name=systemd"} {
		fmt.Fprintf(&b, "%d:%s:/kubepods/besteffort/pod%s/4b1f9e0c2d7a\n", 9-i, c, uid)
	}
	b.WriteString("0::/\n")
	return b.String()
}

// TestFindRefusesAnotherPodsNamespace: the only namespace holding the IP
// asked for runs processes of a kubelet pod cgroup. When that cgroup
// names another pod UID, the namespace is that pod's, the IP is stale
// (a previous sandbox's, given to that pod since), and Find refuses with
// ErrOtherPod naming it. Before, the lone namespace was returned
// whatever its processes said: the agent then served apps/web, with
// web's identity, in the other pod's namespace.
func TestFindRefusesAnotherPodsNamespace(t *testing.T) {
	testenv.RequireRoot(t)
	for _, tc := range []struct {
		name    string
		uid     string
		cgroups []string
		self    string
		want    error // nil: found
	}{
		{"systemd driver, another pod", webUID, []string{systemdCgroup(otherUID)}, "", ErrOtherPod},
		{"cgroupfs driver on cgroup v1, another pod", webUID, []string{cgroupfsCgroup(otherUID)}, "", ErrOtherPod},
		{"systemd driver, this pod", webUID, []string{systemdCgroup(webUID)}, "", nil},
		{"cgroupfs driver, this pod", webUID, []string{cgroupfsCgroup(webUID)}, "", nil},
		{"this pod and an agent's run in it", webUID, []string{systemdCgroup(agentUID), systemdCgroup(webUID)}, "", nil},
		{"no pod cgroup (podman, the demo)", webUID, []string{"0::/user.slice/user-0.slice/session-4.scope\n"}, "", nil},
		{"the scanner's own run alone (its cgroup)", webUID, []string{systemdCgroup(agentUID)}, systemdCgroup(agentUID), nil},
		{"no UID asked for", "", []string{systemdCgroup(otherUID)}, "", nil},
		// The agent's container on cgroup v2 has a cgroup namespace of
		// its own: paths are relative to its cgroup, "0::/" its own.
		{"cgroupfs driver on cgroup v2, read from the agent's cgroup namespace", webUID, []string{"0::/../../../besteffort/pod" + otherUID + "/4b1f9e0c2d7a\n"}, "0::/\n", ErrOtherPod},
		{"kind (systemd, cgroupRoot /kubelet), read from the agent's cgroup namespace", webUID, []string{"0::/../../../kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod" + strings.ReplaceAll(otherUID, "-", "_") + ".slice/cri-containerd-4b1f9e0c2d7a.scope\n"}, "0::/\n", ErrOtherPod},
		{"the scanner's own run alone, in its cgroup namespace", webUID, []string{"0::/\n"}, "0::/\n", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ip := uniqueIP()
			name, f := newNetns(t, ip.String()+"/32")
			p := newFakeProc(t, tc.self)
			for _, cg := range tc.cgroups {
				p.process(name, cg)
			}
			sc, err := Scanner{ProcRoot: p.root, NetnsDirs: []string{}}.Scan()
			if err != nil {
				t.Fatal(err)
			}
			n, err := sc.Find([]netip.Addr{ip}, tc.uid)
			if tc.want != nil {
				if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), otherUID) {
					t.Fatalf("Find = %+v, %v; want %v naming %s", n, err, tc.want, otherUID)
				}
				t.Logf("refused: %v", err)
				return
			}
			want, _ := Inode(f)
			if err != nil || n.Inode != want {
				t.Fatalf("Find = %+v, %v; want inode %d", n, err, want)
			}
		})
	}
}

func TestPodUIDsOfCgroup(t *testing.T) {
	for _, tc := range []struct {
		name, content string
		want          []string
	}{
		{"systemd", systemdCgroup(otherUID), []string{otherUID}},
		{"systemd, guaranteed QoS", "0::/kubepods.slice/kubepods-pod" + strings.ReplaceAll(otherUID, "-", "_") + ".slice/crio-1.scope\n", []string{otherUID}},
		{"cgroupfs v1", cgroupfsCgroup(otherUID), []string{otherUID}},
		{"cgroupfs under a cgroup root", "0::/kubelet/kubepods/pod" + otherUID + "/abc\n", []string{otherUID}},
		{"upper case", "0::/kubepods/pod" + strings.ToUpper(otherUID) + "/abc\n", []string{otherUID}},
		// systemd with a cgroupRoot (kind: /kubelet): every slice name
		// spells its ancestry, kubepods not first.
		{"systemd under a cgroup root", "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod" + strings.ReplaceAll(otherUID, "-", "_") + ".slice/cri-containerd-1.scope\n", []string{otherUID}},
		// Read from a cgroup namespace of its own (the agent's container
		// on cgroup v2): the path is relative to the agent's cgroup and
		// the kubepods ancestors are hidden above the "..".
		{"cgroupfs seen from a cgroup namespace, same QoS", "0::/../../pod" + otherUID + "/abc\n", []string{otherUID}},
		{"cgroupfs seen from a cgroup namespace, other QoS", "0::/../../../besteffort/pod" + otherUID + "/abc\n", []string{otherUID}},
		{"systemd seen from a cgroup namespace", "0::/../../../kubepods-besteffort.slice/kubepods-besteffort-pod" + strings.ReplaceAll(otherUID, "-", "_") + ".slice/cri-containerd-1.scope\n", []string{otherUID}},
		{"kind, systemd, seen from a cgroup namespace", "0::/../../../kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod" + strings.ReplaceAll(otherUID, "-", "_") + ".slice/cri-containerd-1.scope\n", []string{otherUID}},
		{"not a kubepods slice", "0::/machine.slice/machine-pod" + strings.ReplaceAll(otherUID, "-", "_") + ".slice\n", nil},
		{"podman seen from a cgroup namespace", "0::/../../machine.slice/libpod-" + strings.Repeat("a", 64) + ".scope\n", nil},
		{"no kubepods", "0::/pod" + otherUID + "/x\n", nil},
		{"podman", "0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-pod-1.slice/podman-1.scope\n", nil},
		{"not a UID", "0::/kubepods/podman/x\n", nil},
		{"host", "0::/init.scope\n", nil},
		{"garbage", "no colons here\n::\n", nil},
	} {
		if got := PodUIDsOfCgroup(tc.content); !slices.Equal(got, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}

// FuzzPodUIDsOfCgroup: whatever a /proc/<pid>/cgroup holds, the parse
// never panics and names only lower-case UUIDs, each once.
func FuzzPodUIDsOfCgroup(f *testing.F) {
	f.Add(systemdCgroup(otherUID))
	f.Add(cgroupfsCgroup(otherUID))
	f.Add("0::/../../pod" + otherUID + "/abc\n")
	f.Add("0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod" + strings.ReplaceAll(otherUID, "-", "_") + ".slice\n")
	f.Add("0::/-.slice\n1:a:/kubepods/pod\n::\n")
	f.Fuzz(func(t *testing.T, content string) {
		got := PodUIDsOfCgroup(content)
		for i, u := range got {
			if !isUUID(u) || slices.Contains(got[:i], u) {
				t.Fatalf("%q: %v", content, got)
			}
		}
	})
}
