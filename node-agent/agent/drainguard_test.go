package agent

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/plugin/redirect"
	"github.com/ambit-mesh/ambit/tunnel/podnet"
)

// TestDrainGuardMarksDialsDuringTheDrain: a draining pod still dials its
// app (what its listeners accepted before they closed, a stream an HBONE
// client sent before it saw the last GOAWAY: tunnel's Serving.enter), as
// the agent always does: marked, from the client's address. The
// unenrollment's removal of the rules took the marking of such a
// connection with them, so the guard held the replies of the
// connections dialed before only: the app's answer to a dial during the
// drain left for the real client and the dial timed out. Now the dial is
// answered; a connection the app accepts from a real client meanwhile
// is the app's alone (answered through the pod's interface, not taken
// by the agent's routing); and nothing of the guard is left after the
// drain. Both rule backends, whose rules the guard outlives.
func TestDrainGuardMarksDialsDuringTheDrain(t *testing.T) {
	testenv.RequireRoot(t)
	for i, backend := range []redirect.Backend{redirect.Nftables, redirect.IptablesLegacy} {
		t.Run(string(backend), func(t *testing.T) {
			podIP, client := fmt.Sprintf("10.98.%d.2", i+1), fmt.Sprintf("10.98.%d.1", i+1)
			app := podIP + ":8080"
			pod, peer := newPair(t, podIP, client)
			serveLines(t, pod, app, "app")
			spec := redirect.DefaultSpec()
			n := enrolledNet(t, pod, backend, spec)
			before, r := agentDial(t, n, client, app)
			if r != nil {
				t.Fatalf("the agent's dial to the app while enrolled: %v", r)
			}
			defer before.Close()

			// unenrollLive's order.
			if err := holdDrainGuard(pod.file, spec); err != nil {
				t.Fatal(err)
			}
			released := false
			defer func() {
				if !released {
					releaseDrainGuard(pod.file)
				}
			}()
			if err := (Rules{}).Uninstall(context.Background(), pod.file); err != nil {
				t.Fatal(err)
			}
			if got, err := echo(before, "before"); err != nil || got != "before" {
				t.Fatalf("the connection dialed before the unenrollment, during the drain: %q %v", got, err)
			}
			during, err := agentDial(t, n, client, app)
			if err != nil {
				t.Fatalf("the agent's dial to the app during the drain: %v (the app's replies did not come back)", err)
			}
			defer during.Close()
			if got, err := echo(during, "during"); err != nil || got != "during" {
				t.Fatalf("the connection dialed during the drain: %q %v", got, err)
			}
			if got, err := dialIn(peer, app); err != nil || got != "app" {
				t.Fatalf("the client's own connection to the app during the drain: %q %v", got, err)
			}

			if guardLeft(t, pod) == "" {
				t.Fatal("no guard seen during the drain (the check after it would prove nothing)")
			}
			released = true
			if err := releaseDrainGuard(pod.file); err != nil {
				t.Fatal(err)
			}
			if left := guardLeft(t, pod); left != "" {
				t.Fatalf("after the drain the pod still holds:\n%s", left)
			}
		})
	}
}

// agentDial dials the app at dst in pod n as the agent delivers an
// inbound stream (podnet's DialLocal: marked, transparent, from the
// client's address src) and reads the app's greeting, which arrives only
// if the app's replies reach the agent's socket.
func agentDial(t *testing.T, n *podnet.Net, src, dst string) (net.Conn, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	c, err := n.DialLocal(ctx, netip.MustParseAddr(src), netip.MustParseAddrPort(dst))
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(3 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err == nil && line != "app\n" {
		err = fmt.Errorf("greeting %q, want the app's", line)
	}
	if err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// echo sends line on c and reads what the app echoes.
func echo(c net.Conn, line string) (string, error) {
	c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := c.Write([]byte(line + "\n")); err != nil {
		return "", err
	}
	got := make([]byte, len(line)+1)
	if _, err := io.ReadFull(c, got); err != nil {
		return "", err
	}
	return strings.TrimSpace(string(got)), nil
}

// guardLeft describes what of a drain guard n holds: its tables, rules
// and routes, by name and protocol ("" when none).
func guardLeft(t *testing.T, n *testNetns) string {
	t.Helper()
	var left []string
	for _, argv := range [][]string{
		{"nft", "list", "tables"},
		{"ip", "-4", "rule", "show"},
		{"ip", "-6", "rule", "show"},
		{"ip", "-4", "route", "show", "table", "all"},
		{"ip", "-6", "route", "show", "table", "all"},
	} {
		out, err := exec.Command("ip", append([]string{"netns", "exec", n.name}, argv...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("%v: %v\n%s", argv, err, out)
		}
		for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			if strings.Contains(l, drainTable) || strings.Contains(l, "proto 168") {
				left = append(left, l)
			}
		}
	}
	return strings.Join(left, "\n")
}

// TestDrainGuardWithIPv6OffInThePod: a pod whose IPv6 is off (lo without
// ::1, where no IPv6 local route can be added) still gets the guard, its
// IPv4 part doing its work, rather than none because the IPv6 part
// failed, which would cut every connection of the unenrollment.
func TestDrainGuardWithIPv6OffInThePod(t *testing.T) {
	testenv.RequireRoot(t)
	pod, _ := newPair(t, "10.98.5.2", "10.98.5.1")
	for _, dev := range []string{"all", "default", "lo"} {
		run(t, "ip", "netns", "exec", pod.name, "sysctl", "-qw", "net.ipv6.conf."+dev+".disable_ipv6=1")
	}
	serveLines(t, pod, "10.98.5.2:8080", "app")
	spec := redirect.DefaultSpec() // both families, as for a dual-stack pod
	n := enrolledNet(t, pod, redirect.Nftables, spec)
	if err := holdDrainGuard(pod.file, spec); err != nil {
		t.Fatalf("the guard of a pod with IPv6 off: %v", err)
	}
	if err := (Rules{}).Uninstall(context.Background(), pod.file); err != nil {
		releaseDrainGuard(pod.file)
		t.Fatal(err)
	}
	c, err := agentDial(t, n, "10.98.5.1", "10.98.5.2:8080")
	if err == nil {
		c.Close()
	}
	if rerr := releaseDrainGuard(pod.file); rerr != nil {
		t.Fatal(rerr)
	}
	if err != nil {
		t.Fatalf("the agent's dial to the app during the drain: %v", err)
	}
	if left := guardLeft(t, pod); left != "" {
		t.Fatalf("after the drain the pod still holds:\n%s", left)
	}
}

// TestDrainGuardSharedByTwoAgents: during a surge upgrade the old agent
// may still be draining a pod the new one unenrolls again. Each counted
// its own holds, so both held one guard, and whichever drain ended first
// removed it from under the other's connections. Now the guard names its
// holders: the first to release leaves it whole (tables, rules, routes)
// and the other's dial still answered; the second removes all of it.
// Two holders stand for the two processes.
func TestDrainGuardSharedByTwoAgents(t *testing.T) {
	testenv.RequireRoot(t)
	pod, _ := newPair(t, "10.98.7.2", "10.98.7.1")
	serveLines(t, pod, "10.98.7.2:8080", "app")
	spec := redirect.DefaultSpec()
	n := enrolledNet(t, pod, redirect.Nftables, spec)
	old, neu := newDrainHolders(), newDrainHolders()
	if err := old.hold(pod.file, spec); err != nil {
		t.Fatal(err)
	}
	defer old.release(pod.file)
	if err := (Rules{}).Uninstall(context.Background(), pod.file); err != nil {
		t.Fatal(err)
	}
	if err := neu.hold(pod.file, spec); err != nil {
		t.Fatal(err)
	}
	defer neu.release(pod.file)
	held := guardLeft(t, pod)
	if held == "" {
		t.Fatal("no guard seen while both hold it (the checks after would prove nothing)")
	}
	if ids, err := drainHolderIDs(pod.file); err != nil || len(ids) != 2 {
		t.Fatalf("holders recorded: %v %v, want both", ids, err)
	}

	if err := neu.release(pod.file); err != nil {
		t.Fatal(err)
	}
	if left := guardLeft(t, pod); left != held {
		t.Fatalf("after one agent's drain ended, the other's guard is\n%s\nwas\n%s", left, held)
	}
	c, err := agentDial(t, n, "10.98.7.1", "10.98.7.2:8080")
	if err != nil {
		t.Fatalf("the draining agent's dial to the app after the other's drain ended: %v", err)
	}
	c.Close()

	if err := old.release(pod.file); err != nil {
		t.Fatal(err)
	}
	if left := guardLeft(t, pod); left != "" {
		t.Fatalf("after both drains the pod still holds:\n%s", left)
	}
}

// enrolledNet installs spec's rules in pod with backend, as an ADD does,
// and opens the pod's network for the agent's dials (closed when the
// test ends).
func enrolledNet(t *testing.T, pod *testNetns, backend redirect.Backend, spec redirect.Spec) *podnet.Net {
	t.Helper()
	if _, err := (Rules{}).Install(context.Background(), pod.file, backend, spec); err != nil {
		t.Fatal(err)
	}
	n, err := podnet.Open(pod.file)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}
