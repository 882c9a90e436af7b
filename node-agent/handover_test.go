package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

// The hand-over tests run real agents (the built binary) in a network
// namespace standing for the node, so the host probe rules they write
// (hostRules: on) are real nftables of that namespace and nobody else's.

func rnd() string {
	var b [3]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func sh(t testing.TB, argv ...string) string {
	t.Helper()
	out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(argv, " "), err, out)
	}
	return string(out)
}

// addNetns creates a named netns with lo up, removed at the end.
func addNetns(t testing.TB, prefix string) string {
	t.Helper()
	name := prefix + rnd()
	sh(t, "ip", "netns", "add", name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	sh(t, "ip", "-n", name, "link", "set", "lo", "up")
	return name
}

// inNamedNetns runs fn on a locked thread inside the named netns; the
// thread is never unlocked, so it dies with the goroutine.
func inNamedNetns(t testing.TB, name string, fn func() error) {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		h, err := netns.GetFromName(name)
		if err != nil {
			errc <- err
			return
		}
		defer h.Close()
		if err := netns.Set(h); err != nil {
			errc <- err
			return
		}
		errc <- fn()
	}()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

// testPod is a pod's netns; with a peer, a veth leads to a netns holding
// a TCP server outside the mesh (peerIP:8080), reached through the
// agent's outbound listener once the pod is enrolled.
type testPod struct {
	name, uid, ns string
	ip            string
	peerIP        string
}

func newTestPod(t *testing.T, name, subnet string, withPeer bool) *testPod {
	t.Helper()
	p := &testPod{name: name, uid: "uid-" + name + "-" + rnd(), ns: addNetns(t, "amb-ho-p")}
	p.ip = subnet + ".2"
	if !withPeer {
		sh(t, "ip", "-n", p.ns, "addr", "add", p.ip+"/24", "dev", "lo")
		return p
	}
	peer := addNetns(t, "amb-ho-x")
	p.peerIP = subnet + ".1"
	a, b := "hoa"+rnd(), "hob"+rnd()
	sh(t, "ip", "link", "add", a, "netns", p.ns, "type", "veth", "peer", "name", b, "netns", peer)
	sh(t, "ip", "-n", p.ns, "addr", "add", p.ip+"/24", "dev", a)
	sh(t, "ip", "-n", peer, "addr", "add", p.peerIP+"/24", "dev", b)
	sh(t, "ip", "-n", p.ns, "link", "set", a, "up")
	sh(t, "ip", "-n", peer, "link", "set", b, "up")
	testenv.ServeInNetns(t, peer, p.peerIP+":8080", "hello", testenv.Drain)
	return p
}

func (p *testPod) request(op cniproto.Op) *cniproto.Request {
	return &cniproto.Request{Version: cniproto.Version, Op: op,
		Pod: cniproto.Pod{Namespace: "apps", Name: p.name, UID: p.uid, ContainerID: "cid-" + p.uid,
			Netns: "/var/run/netns/" + p.ns, IPs: []netip.Prefix{netip.MustParsePrefix(p.ip + "/24")}}}
}

func (p *testPod) netnsFile(t *testing.T) *os.File {
	t.Helper()
	f, err := os.Open("/var/run/netns/" + p.ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// add enrolls p through the plugin socket (whichever agent holds it).
func (p *testPod) add(t *testing.T, socket string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	resp, err := cniproto.Call(ctx, socket, p.request(cniproto.OpAdd), p.netnsFile(t))
	if err != nil || resp.Decision != cniproto.Enroll {
		t.Fatalf("ADD %s: %+v %v", p.name, resp, err)
	}
}

// listeners counts the sockets listening on port in p's netns: one per
// agent serving the pod.
func (p *testPod) listeners(t *testing.T, port string) int {
	t.Helper()
	out := sh(t, "ip", "netns", "exec", p.ns, "ss", "-Hltn", "sport = :"+port)
	return strings.Count(out, "LISTEN")
}

// dialPeer opens a connection from inside p to its peer's server, through
// the agents' outbound listener, and reads the server's greeting.
func (p *testPod) dialPeer(t *testing.T) net.Conn {
	t.Helper()
	var c net.Conn
	inNamedNetns(t, p.ns, func() (err error) { c, err = net.DialTimeout("tcp", p.peerIP+":8080", 3*time.Second); return err })
	t.Cleanup(func() { c.Close() })
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || line != "hello\n" {
		t.Fatalf("connection from %s to its peer: %q %v", p.name, line, err)
	}
	c.SetReadDeadline(time.Time{})
	return c
}

// node is a netns with agents running in it, sharing a state dir.
type node struct {
	t        *testing.T
	bin, cfg string
	dir, ns  string
}

func newNode(t *testing.T, extra string) *node {
	testenv.RequireRoot(t)
	n := &node{t: t, bin: testenv.Binary(t, "ambit-agent"), ns: addNetns(t, "amb-ho-n")}
	n.dir, n.cfg = staticNode(t, "amb-ho-", func(string) string {
		return "healthAddr: 127.0.0.1:15021\nhostRules: \"on\"\n" + extra
	})
	return n
}

func (n *node) socket() string { return filepath.Join(n.dir, "cni.sock") }

// agentProc is an agent process; exited is closed once it is gone.
type agentProc struct {
	cmd    *exec.Cmd
	file   string
	exited chan struct{}
}

func (n *node) start(name string) *agentProc {
	n.t.Helper()
	file := filepath.Join(n.dir, name+".instance")
	cmd := startProcess(n.t, "nsenter", "--net=/var/run/netns/"+n.ns, n.bin, "run", "-config", n.cfg, "--instance-file", file)
	p := &agentProc{cmd: cmd, file: file, exited: make(chan struct{})}
	go func() { cmd.Wait(); close(p.exited) }()
	eventually(n.t, 30*time.Second, name+" agent ready", func() bool {
		return exec.Command(n.bin, "probe", "-config", n.cfg, "--instance-file", file).Run() == nil
	})
	return p
}

func (p *agentProc) running() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

func (p *agentProc) stop(t *testing.T, within time.Duration) {
	t.Helper()
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(within):
		t.Fatalf("agent did not exit within %s of SIGTERM", within)
	}
}

// readyz asks the node's shared health port (whichever agent is on it)
// from inside the node's netns.
func (n *node) readyz(t *testing.T) string {
	t.Helper()
	var status string
	inNamedNetns(t, n.ns, func() error {
		c, err := net.DialTimeout("tcp", "127.0.0.1:15021", 2*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		c.Write([]byte("GET /readyz HTTP/1.0\r\n\r\n"))
		b, _ := io.ReadAll(c)
		status, _, _ = strings.Cut(string(b), "\r\n")
		if _, body, ok := strings.Cut(string(b), "\r\n\r\n"); ok {
			status += ": " + strings.TrimSpace(body)
		}
		return nil
	})
	return status
}

// hostRules is the node's ambit-host table as nft prints it ("" if
// there is none).
func (n *node) hostRules() string {
	out, err := exec.Command("ip", "netns", "exec", n.ns, "nft", "list", "table", "inet", "ambit-host").CombinedOutput()
	if err != nil {
		return ""
	}
	return string(out)
}

func eventually(t testing.TB, within time.Duration, what string, ok func() bool) {
	t.Helper()
	for deadline := time.Now().Add(within); !ok(); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", within, what)
		}
	}
}

// TestStoppingAgentHandsHostRulesBack: an older agent has yielded the
// host rules to a ready newer one; the newer one gets SIGTERM (its pod
// deleted during the surge, a rollback) and drains an established
// connection for up to drainTimeout. From the SIGTERM on it maintains
// nothing, so the older one must be in charge again at once, not when
// the drain ends: a deleted table is put back within one reconcile
// while the newer agent is still draining.
func TestStoppingAgentHandsHostRulesBack(t *testing.T) {
	n := newNode(t, "drainTimeout: 20s\n")
	old := n.start("old")
	podA := newTestPod(t, "a", "10.74.21", false)
	podA.add(t, n.socket())

	neu := n.start("new") // adopts pod a; the old agent yields
	podB := newTestPod(t, "b", "10.74.22", true)
	podB.add(t, n.socket()) // the new agent holds the socket now
	// The old agent follows the records the new one writes (a rollback
	// leaves it alone with them): it serves pod b too.
	eventually(t, 10*time.Second, "the old agent's listeners in pod b, enrolled by the new agent", func() bool {
		return podB.listeners(t, "15001") == 2
	})
	// Something for the new agent to drain: connections through pod b's
	// outbound listeners, spread over both agents (SO_REUSEPORT); with 16
	// the new agent holds none once in 65,536 runs.
	var drained []net.Conn
	for range 16 {
		drained = append(drained, podB.dialPeer(t))
	}

	// The old agent yields: a deleted table is put back by the new one.
	sh(t, "ip", "netns", "exec", n.ns, "nft", "delete", "table", "inet", "ambit-host")
	eventually(t, 8*time.Second, "the new agent to restore the host rules", func() bool {
		return strings.Contains(n.hostRules(), podA.ip)
	})

	neu.cmd.Process.Signal(syscall.SIGTERM)
	time.Sleep(300 * time.Millisecond) // let the new agent see its signal
	if !neu.running() {
		t.Fatal("the new agent exited at once: nothing to drain, the test proves nothing")
	}
	sh(t, "ip", "netns", "exec", n.ns, "nft", "delete", "table", "inet", "ambit-host")
	start := time.Now()
	for !strings.Contains(n.hostRules(), podA.ip) {
		if !neu.running() {
			t.Fatalf("the host rules were not restored in the %s the stopping agent drained (an older agent kept yielding to it)", time.Since(start).Round(100*time.Millisecond))
		}
		if time.Since(start) > 8*time.Second {
			t.Fatalf("host rules not restored within %s of their deletion while the newer agent drains (an older agent keeps yielding to a stopping one)", time.Since(start).Round(100*time.Millisecond))
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("host rules restored by the older agent %s after their deletion, the newer one still draining", time.Since(start).Round(time.Millisecond))
	// The older agent answers for the node again: the stopping one is
	// not "a newer agent starting" (that 503 would make the DaemonSet
	// controller count the node's remaining agent unavailable).
	for range 5 {
		if st := n.readyz(t); !strings.Contains(st, " 200 ") {
			t.Fatalf("readyz while the newer agent drains: %q, want 200", st)
		}
	}
	if !neu.running() {
		t.Fatal("the newer agent stopped draining before the check: the test proves nothing")
	}
	if rules := n.hostRules(); !strings.Contains(rules, podB.ip) {
		t.Errorf("the older agent's picture lacks pod b, which the newer one enrolled:\n%s", rules)
	}
	for _, c := range drained {
		c.Close() // the drain ends with them
	}
	neu.stop(t, 10*time.Second)
	// The older agent alone: it serves the pod the newer one enrolled.
	if got := podB.listeners(t, "15001"); got != 1 {
		t.Fatalf("newer agent gone: %d listeners on 15001 in pod b, want the older agent's 1", got)
	}
	podB.dialPeer(t).Close()
	old.stop(t, 10*time.Second)
}

// preConnected is a plugin exchange whose connection the agent holding
// the socket accepted before the request was sent: an ambit-cni that
// connected just before the hand-over and was slow to write (preempted,
// a loaded node). The request is answered by that agent, whoever holds
// the socket by then.
type preConnected struct{ fd int }

func preConnect(t *testing.T, socket string) *preConnected {
	t.Helper()
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Connect(fd, &unix.SockaddrUnix{Name: socket}); err != nil {
		t.Fatal(err)
	}
	return &preConnected{fd: fd}
}

func (c *preConnected) call(t *testing.T, req *cniproto.Request, netnsFile *os.File) *cniproto.Response {
	t.Helper()
	b, err := json.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Sendmsg(c.fd, b, unix.UnixRights(int(netnsFile.Fd())), nil, 0); err != nil {
		t.Fatal(err)
	}
	tv := unix.NsecToTimeval((20 * time.Second).Nanoseconds())
	unix.SetsockoptTimeval(c.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	buf := make([]byte, cniproto.MaxMessageSize)
	n, _, _, _, err := unix.Recvmsg(c.fd, buf, nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := cniproto.DecodeResponse(buf[:n])
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

// TestPodEnrolledByTheOldAgentAfterTheScan: an ADD the old agent
// accepted before the new agent took the plugin socket is served by the
// old agent after the new one has read the pod records (here: after it
// is ready). The new agent must end up serving that pod too: listeners
// beside the old agent's, the pod in its host-rule picture (its
// reconciles keep the entry), and the pod still served once the old
// agent is gone.
func TestPodEnrolledByTheOldAgentAfterTheScan(t *testing.T) {
	n := newNode(t, "drainTimeout: 1s\nrequestTimeout: 60s\n")
	old := n.start("old")
	pc := preConnect(t, n.socket()) // accepted by the old agent
	time.Sleep(100 * time.Millisecond)
	neu := n.start("new") // took the socket, re-adopted (nothing), ready

	pod := newTestPod(t, "late", "10.74.23", true)
	resp := pc.call(t, pod.request(cniproto.OpAdd), pod.netnsFile(t))
	if resp.Error != "" || resp.Decision != cniproto.Enroll {
		t.Fatalf("ADD served by the old agent: %+v", resp)
	}
	if got := pod.listeners(t, "15001"); got < 1 {
		t.Fatal("the old agent did not serve the pod")
	}
	eventually(t, 10*time.Second, "the new agent's listeners in the pod the old agent enrolled after its scan (2 on 15001)", func() bool {
		return pod.listeners(t, "15001") == 2
	})
	// More than one host-rule reconcile of the new agent (every 5 s): the
	// entry the old agent added is in its picture, not drift.
	time.Sleep(6 * time.Second)
	if !strings.Contains(n.hostRules(), pod.ip) {
		t.Fatalf("the new agent's reconcile removed the host rule of the pod the old agent enrolled:\n%s", n.hostRules())
	}
	old.stop(t, 10*time.Second)
	for _, port := range []string{"15001", "15006", "15008"} {
		if got := pod.listeners(t, port); got != 1 {
			t.Fatalf("old agent gone: %d listeners on %s in the pod, want the new agent's 1", got, port)
		}
	}
	pod.dialPeer(t).Close() // served by the new agent
	if !strings.Contains(n.hostRules(), pod.ip) {
		t.Fatalf("old agent gone: the pod's host rule is missing:\n%s", n.hostRules())
	}
	neu.stop(t, 10*time.Second)
}
