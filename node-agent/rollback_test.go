package main

import (
	"context"
	"errors"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

// socketOwner is the pid of the process listening at the plugin socket
// path (SO_PEERCRED of a connection to it), or an error when nobody does
// (ECONNREFUSED: the path names a socket whose agent stopped serving).
// The agents run in the test's pid namespace (nsenter changes only the
// network), so the pid is theirs.
func socketOwner(path string) (int, error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	if err := unix.Connect(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		return 0, err
	}
	cred, err := unix.GetsockoptUcred(fd, unix.SOL_SOCKET, unix.SO_PEERCRED)
	if err != nil {
		return 0, err
	}
	return int(cred.Pid), nil
}

// addWithin sends ADDs for p until one is answered Enroll, failing the
// test after within: how long the node's pods stay without an agent.
func (p *testPod) addWithin(t *testing.T, socket string, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	var last string
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		resp, err := cniproto.Call(ctx, socket, p.request(cniproto.OpAdd), p.netnsFile(t))
		cancel()
		switch {
		case err == nil && resp.Decision == cniproto.Enroll && resp.Error == "":
			return time.Since(start)
		case err != nil:
			last = err.Error()
		default:
			last = resp.Error
		}
		if time.Since(start) > within {
			t.Fatalf("ADD %s not served within %s: %s", p.name, within, last)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestOlderAgentTakesThePluginSocketBack: a rollback in the middle of a
// surge (or the newer pod deleted during it) leaves the older agent
// running alone, and nothing newer comes to listen at the plugin socket
// path the newer agent took. The older agent must take the path back
// once it is the newest agent that is not stopping again: at once when
// the newer one gets SIGTERM (it marks itself stopping and closes its
// plugin server, even while it drains for up to drainTimeout), and when
// a newer one is killed outright (kill -9, its entry's lock released).
// Never while a newer live agent runs: that would steal the socket
// mid-surge.
func TestOlderAgentTakesThePluginSocketBack(t *testing.T) {
	n := newNode(t, "drainTimeout: 20s\n")
	old := n.start("old")
	oldPid := old.cmd.Process.Pid
	owner := func() int { pid, _ := socketOwner(n.socket()); return pid }
	if got := owner(); got != oldPid {
		t.Fatalf("plugin socket owned by pid %d, want the only agent's %d", got, oldPid)
	}

	// Surge: the newer agent takes the path, and keeps it.
	neu := n.start("new")
	podA := newTestPod(t, "a", "10.74.31", true)
	podA.add(t, n.socket())
	eventually(t, 10*time.Second, "the old agent's listeners in pod a, enrolled by the new agent", func() bool {
		return podA.listeners(t, "15001") == 2
	})
	time.Sleep(3 * time.Second) // several socket checks of the older agent
	if got := owner(); got != neu.cmd.Process.Pid {
		t.Fatalf("plugin socket owned by pid %d while the newer agent (%d) runs, want the newer one's (the older %d must not take it back mid-surge)", got, neu.cmd.Process.Pid, oldPid)
	}

	// Something for the newer agent to drain, so it lives on, stopping,
	// while the older agent must already serve the plugin.
	var drained []net.Conn
	for range 16 {
		drained = append(drained, podA.dialPeer(t))
	}
	neu.cmd.Process.Signal(syscall.SIGTERM)
	eventually(t, 5*time.Second, "the stopping agent to close its plugin server", func() bool {
		_, err := socketOwner(n.socket())
		return errors.Is(err, unix.ECONNREFUSED) || owner() == oldPid
	})
	if !neu.running() {
		t.Fatal("the newer agent exited at once: nothing drained, the stopping case is not tested")
	}
	podB := newTestPod(t, "b", "10.74.32", false)
	took := podB.addWithin(t, n.socket(), 5*time.Second)
	if got := owner(); got != oldPid {
		t.Fatalf("ADD answered, but the socket is owned by pid %d, not the older agent's %d", got, oldPid)
	}
	if !neu.running() {
		t.Fatal("the newer agent stopped draining before the ADD: the stopping case is not tested")
	}
	t.Logf("newer agent stopping (SIGTERM, draining): ADD served by the older agent %s later", took.Round(time.Millisecond))
	for _, c := range drained {
		c.Close()
	}
	neu.stop(t, 10*time.Second)
	if got := podB.listeners(t, "15001"); got != 1 {
		t.Fatalf("%d listeners on 15001 in pod b, want the older agent's 1", got)
	}

	// Again, the newer agent killed outright this time.
	third := n.start("third")
	if got := owner(); got != third.cmd.Process.Pid {
		t.Fatalf("plugin socket owned by pid %d, want the newest agent's %d", got, third.cmd.Process.Pid)
	}
	third.cmd.Process.Kill()
	<-third.exited
	podC := newTestPod(t, "c", "10.74.33", false)
	took = podC.addWithin(t, n.socket(), 5*time.Second)
	if got := owner(); got != oldPid {
		t.Fatalf("ADD answered, but the socket is owned by pid %d, not the older agent's %d", got, oldPid)
	}
	t.Logf("newer agent killed (SIGKILL): ADD served by the older agent %s later", took.Round(time.Millisecond))
	if out := sh(t, "ip", "netns", "exec", podC.ns, "ss", "-Hltn"); !strings.Contains(out, ":15001") {
		t.Fatalf("pod c has no outbound listener after its ADD:\n%s", out)
	}
	old.stop(t, 10*time.Second)
}
