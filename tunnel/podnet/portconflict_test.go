package podnet_test

import (
	"context"
	"errors"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/tunnel/internal/podtest"
	"github.com/ambit-mesh/ambit/tunnel/podnet"
)

// appListen listens as an application of the pod would: a root process
// (the tests run as root, like many containers), no SO_MARK, with
// SO_REUSEPORT when reuse is set (nginx "reuseport", Envoy, many Go
// servers).
func appListen(t *testing.T, p *podtest.Pod, network, addr string, reuse bool) (net.Listener, error) {
	return listenAs(t, p, network, addr, reuse, 0)
}

// oldAgentListen listens as an agent before ListenerUID did: root, Go's
// default listener (MPTCP since Go 1.24), SO_REUSEPORT, the agent's mark.
func oldAgentListen(t *testing.T, p *podtest.Pod, port int) net.Listener {
	t.Helper()
	ln, err := listenAs(t, p, "tcp6", "[::]:"+strconv.Itoa(port), true, podnet.DefaultMark)
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

func listenAs(t *testing.T, p *podtest.Pod, network, addr string, reuse bool, mark int) (net.Listener, error) {
	t.Helper()
	var ln net.Listener
	var lerr error
	p.Do(t, func() error {
		lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
			var serr error
			if err := rc.Control(func(fd uintptr) {
				if reuse {
					serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
				}
				if mark != 0 && serr == nil {
					serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, mark)
				}
				if mark != 0 && serr == nil && network == "tcp6" {
					// Dual-stack, as the agent's.
					serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0)
				}
			}); err != nil {
				return err
			}
			return serr
		}}
		ln, lerr = lc.Listen(context.Background(), network, addr)
		return nil
	})
	if ln != nil {
		t.Cleanup(func() { ln.Close() })
	}
	return ln, lerr
}

func openNet(t *testing.T, p *podtest.Pod, opts ...podnet.Option) *podnet.Net {
	t.Helper()
	n, err := podnet.Open(p.File(t), opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

// wantPortInUse checks that err is the clear "an application holds the
// port" error: a *PortInUseError naming the port, EADDRINUSE underneath.
func wantPortInUse(t *testing.T, err error, port uint16) {
	t.Helper()
	if err == nil {
		t.Fatalf("Listen(%d) beside an application's socket succeeded: the agent shares the port with the app", port)
	}
	var pe *podnet.PortInUseError
	if !errors.As(err, &pe) {
		t.Fatalf("Listen(%d): %v (%T), want a *podnet.PortInUseError", port, err, err)
	}
	if pe.Port != port || len(pe.Holders) == 0 {
		t.Errorf("PortInUseError = %+v, want port %d and the app's socket", pe, port)
	}
	if !errors.Is(err, unix.EADDRINUSE) {
		t.Errorf("%v: errors.Is(EADDRINUSE) = false", err)
	}
	if !strings.Contains(err.Error(), strconv.Itoa(int(port))) || !strings.Contains(err.Error(), "not the agent's") {
		t.Errorf("error %q does not say the port is held by a socket that is not the agent's", err)
	}
}

// An application already listening on the port when the agent comes (a
// pod enrolled live): with SO_REUSEPORT of its own the agent used to join
// its group silently and the kernel split the connections between the
// two; without it, the agent failed with a bare EADDRINUSE. Both are now
// the same clear error, whatever address the app holds (a specific
// address or a v4-only wildcard outranks the agent's dual-stack [::] in
// the kernel's lookup and would have taken every connection to it).
func TestListenRefusesAnApplicationsPort(t *testing.T) {
	testenv.RequireRoot(t)
	cases := []struct {
		name, network, addr string
		reuse               bool
	}{
		{"reuseport dual-stack", "tcp6", "[::]:%d", true},
		{"reuseport v4 wildcard", "tcp4", "0.0.0.0:%d", true},
		{"reuseport loopback", "tcp4", "127.0.0.1:%d", true},
		{"plain dual-stack", "tcp6", "[::]:%d", false},
		{"plain loopback v6", "tcp6", "[::1]:%d", false},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := podtest.NewNetns(t)
			port := uint16(15101 + i)
			addr := strings.Replace(c.addr, "%d", strconv.Itoa(int(port)), 1)
			if _, err := appListen(t, p, c.network, addr, c.reuse); err != nil {
				t.Fatalf("app listen %s: %v", addr, err)
			}
			n := openNet(t, p)
			ln, err := n.Listen(port, podnet.ListenOptions{})
			if err == nil {
				ln.Close()
			}
			wantPortInUse(t, err, port)
			if got := p.Run(t, "ss", "-Htln", "sport = :"+strconv.Itoa(int(port))); strings.Count(got, "LISTEN") != 1 {
				t.Errorf("after the refused Listen, the pod's listeners on %d are %q, want the app's alone", port, got)
			}
			// Go's MPTCP fallback put the listener there before.
			if host, _ := execOut("ss", "-Htln", "sport = :"+strconv.Itoa(int(port))); strings.Contains(host, "LISTEN") {
				t.Errorf("a listener on %d in the host's namespace: %q", port, host)
			}
		})
	}
}

// An application that binds the port after the agent, with SO_REUSEPORT
// and as root (the agent's uid before): it used to join the agent's group
// and receive a share of the agent's connections. The agent's listeners
// now belong to a uid of their own (ListenerUID), so the kernel refuses
// the app with EADDRINUSE, whatever address it asks for.
func TestApplicationCannotJoinTheAgentsPort(t *testing.T) {
	testenv.RequireRoot(t)
	p := podtest.NewNetns(t)
	n := openNet(t, p)
	const port = 15111
	ln, err := n.Listen(port, podnet.ListenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if err := podnet.Exclusive(podnet.ListenerUID); err != nil {
		t.Fatalf("Exclusive as root: %v", err)
	}
	hs, err := n.Holders(port)
	if err != nil {
		t.Fatal(err)
	}
	if len(hs) != 1 || hs[0].UID != podnet.ListenerUID || hs[0].Mark != podnet.DefaultMark || hs[0].Addr.Port() != port {
		t.Fatalf("Holders(%d) = %v, want one socket of uid %d with mark %#x", port, hs, podnet.ListenerUID, podnet.DefaultMark)
	}
	for _, a := range []struct{ network, addr string }{
		{"tcp6", "[::]:15111"}, {"tcp4", "0.0.0.0:15111"}, {"tcp4", "127.0.0.1:15111"},
	} {
		if app, err := appListen(t, p, a.network, a.addr, true); err == nil {
			app.Close()
			t.Errorf("an application (root, SO_REUSEPORT) listened on %s beside the agent", a.addr)
		} else if !errors.Is(err, unix.EADDRINUSE) {
			t.Errorf("app listen %s: %v, want EADDRINUSE", a.addr, err)
		}
	}
	// Every connection still reaches the agent.
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	p.Do(t, func() error {
		for range 20 {
			c, err := net.DialTimeout("tcp", "127.0.0.1:15111", time.Second)
			if err != nil {
				return err
			}
			c.Close()
		}
		return nil
	})
}

// Two agents (an upgrade, a restart beside the keeper's sockets) still
// share: the second joins the first's group.
func TestAgentsStillShareThePort(t *testing.T) {
	testenv.RequireRoot(t)
	p := podtest.NewNetns(t)
	const port = 15112
	old, err := openNet(t, p).Listen(port, podnet.ListenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	nu, err := openNet(t, p).Listen(port, podnet.ListenOptions{})
	if err != nil {
		t.Fatalf("second agent's Listen beside the first: %v", err)
	}
	nu.Close()
}

// An agent before ListenerUID made its sockets as root: the new agent
// finds them (they carry the agent's mark), joins their group as root, so
// an upgrade still hands over; an application beside them is still
// refused.
func TestJoinsAnOlderAgentsRootGroup(t *testing.T) {
	testenv.RequireRoot(t)
	p := podtest.NewNetns(t)
	const port = 15113
	old, err := openNet(t, p, podnet.WithListenerUID(-1)).Listen(port, podnet.ListenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	nu, err := openNet(t, p).Listen(port, podnet.ListenOptions{})
	if err != nil {
		t.Fatalf("Listen beside an older agent's root-owned listener: %v", err)
	}
	nu.Close()
	// What those agents really made: Go's default listener, MPTCP.
	const port3 = 15115
	oldAgentListen(t, p, port3)
	nu, err = openNet(t, p).Listen(port3, podnet.ListenOptions{})
	if err != nil {
		t.Fatalf("Listen beside an older agent's MPTCP listener: %v", err)
	}
	nu.Close()

	// The same root-owned group with an application in it: refused.
	const port2 = 15114
	old2, err := openNet(t, p, podnet.WithListenerUID(-1)).Listen(port2, podnet.ListenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer old2.Close()
	if _, err := appListen(t, p, "tcp6", "[::]:15114", true); err != nil {
		t.Fatalf("app joining the old agent's root group: %v (the old agent's sockets should still let it in)", err)
	}
	ln, err := openNet(t, p).Listen(port2, podnet.ListenOptions{})
	if err == nil {
		ln.Close()
	}
	wantPortInUse(t, err, port2)
}

// The first upgrade to an agent with ListenerUID: connections queued on
// the older agent's listener (Go's default MPTCP listener, root) move to
// the new agent's when the old one closes (net.ipv4.tcp_migrate_req, set
// in every enrolled pod), as between two agents of one version.
func TestQueuedConnectionsMoveFromAnOlderAgent(t *testing.T) {
	testenv.RequireRoot(t)
	p := podtest.NewNetns(t)
	p.Run(t, "sysctl", "-qw", "net.ipv4.tcp_migrate_req=1")
	const port = 15116
	old := oldAgentListen(t, p, port)
	const queued = 8
	var conns []net.Conn
	p.Do(t, func() error {
		for range queued {
			c, err := net.DialTimeout("tcp", "127.0.0.1:15116", time.Second)
			if err != nil {
				return err
			}
			conns = append(conns, c)
		}
		return nil
	})
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	nu, err := openNet(t, p).Listen(port, podnet.ListenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer nu.Close()
	old.Close()
	nu.(*net.TCPListener).SetDeadline(time.Now().Add(3 * time.Second))
	for i := range queued {
		c, err := nu.Accept()
		if err != nil {
			t.Fatalf("accepted %d of the %d connections queued on the older agent's listener: %v", i, queued, err)
		}
		c.Close()
	}
}

// No thread of the process keeps the listeners' fsuid after listens good
// and refused: a thread left with it would open files as that uid.
func TestNoThreadKeepsTheListenerUID(t *testing.T) {
	testenv.RequireRoot(t)
	p := podtest.NewNetns(t)
	n := openNet(t, p)
	if _, err := appListen(t, p, "tcp6", "[::]:15117", false); err != nil {
		t.Fatal(err)
	}
	for i := range 50 {
		if ln, err := n.Listen(uint16(15200+i), podnet.ListenOptions{}); err != nil {
			t.Fatal(err)
		} else {
			ln.Close()
		}
		if _, err := n.Listen(15117, podnet.ListenOptions{}); err == nil {
			t.Fatal("Listen beside the app succeeded")
		}
	}
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Fatal(err)
	}
	for _, task := range tasks {
		b, err := os.ReadFile("/proc/self/task/" + task.Name() + "/status")
		if err != nil {
			continue // the thread exited
		}
		for _, line := range strings.Split(string(b), "\n") {
			if f := strings.Fields(line); len(f) == 5 && f[0] == "Uid:" && f[4] != "0" {
				t.Errorf("thread %s: fsuid %s after the listens", task.Name(), f[4])
			}
		}
	}
}
