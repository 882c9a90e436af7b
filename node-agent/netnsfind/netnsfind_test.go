package netnsfind

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/ambit-mesh/ambit/internal/testenv"
)

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
	name, f := newNetns(t, "10.77.1.2/24")
	got, err := HoldsAny(f, []netip.Addr{netip.MustParseAddr("10.77.1.2")})
	if err != nil || !got {
		t.Fatalf("HoldsAny = %v %v", got, err)
	}
	sc, err := Scanner{}.Scan()
	if err != nil {
		t.Fatal(err)
	}
	n, err := sc.Find([]netip.Addr{netip.MustParseAddr("10.77.1.2")}, "")
	if err != nil {
		t.Fatal(err)
	}
	want, _ := Inode(f)
	if n.Inode != want || !strings.HasSuffix(n.Path, name) {
		t.Fatalf("found %+v, want inode %d (%s)", n, want, name)
	}
	if _, err := sc.Find([]netip.Addr{netip.MustParseAddr("10.77.9.9")}, ""); !errors.Is(err, ErrNotFound) {
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
	newNetns(t, "10.77.2.2/24") // something else to scan
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
	name, _ := newNetns(t, "10.77.3.3/24")
	newNetns(t, "10.77.3.3/24")
	startIn(t, name, "sleep", "30")
	sc, err := Scanner{}.Scan()
	if err != nil {
		t.Fatal(err)
	}
	_, err = sc.Find([]netip.Addr{netip.MustParseAddr("10.77.3.3")}, "some-uid")
	if err == nil || !strings.Contains(err.Error(), "refusing to guess") {
		t.Fatalf("ambiguous find: %v", err)
	}
}

func TestProcessOnlyNamespace(t *testing.T) {
	testenv.RequireRoot(t)
	// A namespace reachable only through a process (no bind mount in the
	// scanned dirs) is found through /proc and deduplicated.
	name, f := newNetns(t, "10.77.4.4/24")
	startIn(t, name, "sh", "-c", "sleep 30 & sleep 30")
	want, _ := Inode(f)
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		sc, err := Scanner{NetnsDirs: []string{}}.Scan()
		if err != nil {
			t.Fatal(err)
		}
		n, err := sc.Find([]netip.Addr{netip.MustParseAddr("10.77.4.4")}, "")
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
