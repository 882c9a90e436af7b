package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
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

func sh(t *testing.T, argv ...string) string {
	t.Helper()
	out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(argv, " "), err, out)
	}
	return string(out)
}

// addNetns creates a named netns with lo up, removed at the end.
func addNetns(t *testing.T, prefix string) string {
	t.Helper()
	name := prefix + rnd()
	sh(t, "ip", "netns", "add", name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	sh(t, "ip", "-n", name, "link", "set", "lo", "up")
	return name
}

// inNamedNetns runs fn on a locked thread inside the named netns; the
// thread is never unlocked, so it dies with the goroutine.
func inNamedNetns(t *testing.T, name string, fn func() error) {
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
	var l net.Listener
	inNamedNetns(t, peer, func() (err error) { l, err = net.Listen("tcp", p.peerIP+":8080"); return err })
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.Write([]byte("hello\n"))
				buf := make([]byte, 512)
				for {
					if _, err := c.Read(buf); err != nil {
						return
					}
				}
			}()
		}
	}()
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

func eventually(t *testing.T, within time.Duration, what string, ok func() bool) {
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
	if got := podB.listeners(t, "15001"); got != 1 {
		t.Fatalf("pod b enrolled by the new agent: %d listeners on 15001, want 1", got)
	}
	drained := podB.dialPeer(t) // held by the new agent: something to drain

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
	drained.Close() // the drain ends with it
	neu.stop(t, 10*time.Second)
	old.stop(t, 10*time.Second)
}
