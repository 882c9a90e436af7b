package redirect

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/plugin/internal/nstest"
)

// TestRemovalCutBetweenTablesKeepsTheCapture: a pod's iptables-legacy
// rules are being removed (a DEL, an unenroll, a cut install's
// rollback) when the host's xtables lock is taken between the tables of
// the IPv4 removal restore, which takes the lock per table: the removal
// stops at its deadline with one table gone and the other there. The
// table that goes first decides what the pod's traffic does meanwhile:
//
//   - mangle first (the order kept): nat's capture stays without
//     mangle's marks. The app's new outbound connections still reach
//     the agent (15001), so nothing leaves in plaintext; inbound ones
//     break, since the app's replies to the agent's transparent dials,
//     unmarked, are routed out of the pod. Fail closed.
//   - nat first: mangle's marks stay without the capture, which only
//     the agent's own connections use: the app's new connections leave
//     the pod in plaintext to enrolled peers, and inbound ones reach the
//     app around the agent's policy. Fail open.
//
// Here the app dials a peer while the removal is cut: the agent's
// listener must get the connection and the peer must not. The DEL
// that follows, with the lock free, removes the rest. On the nat-first
// order the peer gets the plaintext connection and the test fails.
func TestRemovalCutBetweenTablesKeepsTheCapture(t *testing.T) {
	testenv.RequireRoot(t)
	spec := DefaultSpec()
	between, goOn := cutRemovalBetweenTables(t)
	lockPath := filepath.Join(t.TempDir(), "xtables.lock")
	t.Setenv("XTABLES_LOCKFILE", lockPath)

	pod, peer := nstest.New(t, "ro"), nstest.New(t, "rp")
	podIP, peerIP := "10.238.0.2", "10.238.0.1"
	veth := "ambr" + nstest.Name("")[len(nstest.Prefix)+1:][:6]
	nstest.Run(t, pod, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", veth)
	nstest.Run(t, pod, "ip", "link", "set", veth, "netns", peer.Path())
	nstest.Run(t, pod, "ip", "addr", "add", podIP+"/24", "dev", "eth0")
	nstest.Run(t, pod, "ip", "link", "set", "eth0", "up")
	nstest.Run(t, pod, "ip", "link", "set", "lo", "up")
	nstest.Run(t, peer, "ip", "addr", "add", peerIP+"/24", "dev", veth)
	nstest.Run(t, peer, "ip", "link", "set", veth, "up")
	if _, err := Install(context.Background(), pod, IptablesLegacy, spec); err != nil {
		t.Fatal(err)
	}

	// The lock is taken the moment the first table's removal committed,
	// and held until the cut removal has given up.
	locked := make(chan *os.File, 1)
	go func() {
		<-between
		f, err := os.OpenFile(lockPath, os.O_RDWR|os.O_CREATE, 0o600)
		if err == nil {
			err = unix.Flock(int(f.Fd()), unix.LOCK_EX)
		}
		if err != nil {
			t.Errorf("taking the xtables lock: %v", err)
		}
		locked <- f
		close(goOn)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	err := Uninstall(ctx, pod)
	t.Logf("Uninstall cut between the tables: %v", err)
	var lock *os.File
	select {
	case lock = <-locked:
	default:
		t.Fatalf("the removal never reached its second table: %v", err)
	}
	defer lock.Close()
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "the routes stay with the rules left") {
		t.Errorf("Uninstall: %v, want the deadline, and the routes kept with the rules left", err)
	}

	var tables []string
	pod.Do(func(ns.NetNS) error {
		out, _ := exec.Command("iptables-legacy-save").Output()
		for _, tb := range []string{"mangle", "nat"} {
			if rules, _, _ := ourSaveLines(out); len(rules[tb]) > 0 {
				tables = append(tables, tb)
			}
		}
		return nil
	})
	t.Logf("IPv4 tables still holding rules of ours: %v", tables)
	if !slices.Equal(tables, []string{"nat"}) {
		t.Errorf("after the cut removal our IPv4 rules are in %v, want [nat] (the capture, mangle gone)", tables)
	}

	// The app's new outbound connection, during the half state.
	listen := func(n ns.NetNS, addr string) *net.TCPListener {
		var l net.Listener
		if err := n.Do(func(ns.NetNS) (err error) { l, err = net.Listen("tcp4", addr); return }); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		return l.(*net.TCPListener)
	}
	agent, app := listen(pod, fmt.Sprintf(":%d", spec.OutboundPort)), listen(peer, ":8080")
	accepted := func(l *net.TCPListener) bool {
		l.SetDeadline(time.Now().Add(time.Second))
		c, err := l.Accept()
		if err == nil {
			c.Close()
		}
		return err == nil
	}
	var dialErr error
	pod.Do(func(ns.NetNS) error {
		var c net.Conn
		if c, dialErr = net.DialTimeout("tcp4", peerIP+":8080", time.Second); dialErr == nil {
			defer c.Close()
			c.Write([]byte("plaintext"))
		}
		return nil
	})
	byAgent, byPeer := accepted(agent), accepted(app)
	t.Logf("the app's connection to %s:8080: dial %v, taken by the agent %v, reached the peer %v", peerIP, dialErr, byAgent, byPeer)
	if byPeer {
		t.Error("the app's new connection left the pod in plaintext while the removal was cut")
	}
	if !byAgent {
		t.Error("the app's new connection was not captured while the removal was cut")
	}

	lock.Close()
	if err := Uninstall(context.Background(), pod); err != nil {
		t.Fatalf("the DEL that follows: %v", err)
	}
	if found, err := Installed(context.Background(), pod); err != nil || len(found) != 0 {
		t.Errorf("after the DEL that follows: %v %v", found, err)
	}
	if p := routesVerify(pod, spec); len(p) != 2*2 {
		t.Errorf("routes left after the DEL that follows (want all 4 missing): %v", p)
	}
}

// cutRemovalBetweenTables puts first in PATH an iptables-legacy-restore
// that, on its first removal payload (one with -X), commits the first
// table as the real restore would, then waits, where the real one takes
// the xtables lock again for the next table: between is closed then,
// and the rest goes to the real restore once goOn is closed (its runs
// are killed with their process group, the wait too). Later runs go
// straight to the real restore.
func cutRemovalBetweenTables(t *testing.T) (between, goOn chan struct{}) {
	t.Helper()
	real, err := exec.LookPath("iptables-legacy-restore")
	if err != nil {
		t.Fatalf("iptables-legacy-restore not installed (the iptables package; .ci/run installs it): %v", err)
	}
	dir := t.TempDir()
	script := fmt.Sprintf(`#!/bin/sh
in=$(mktemp) || exit 1
cat > "$in"
if grep -q '^-X ' "$in" && mkdir %[1]s/first 2>/dev/null; then
	awk '/^\*/ { n++ } n == 1' "$in" | %[2]s "$@" || exit $?
	touch %[1]s/between
	while [ ! -e %[1]s/go ]; do sleep 0.01; done
	awk '/^\*/ { n++ } n >= 2' "$in" | %[2]s "$@"
	rc=$?
	rm -f "$in"
	exit $rc
fi
%[2]s "$@" < "$in"
rc=$?
rm -f "$in"
exit $rc
`, dir, real)
	if err := os.WriteFile(dir+"/iptables-legacy-restore", []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", dir+string(os.PathListSeparator)+os.Getenv("PATH"))
	between, goOn = make(chan struct{}), make(chan struct{})
	go func() {
		for {
			if _, err := os.Stat(dir + "/between"); err == nil {
				close(between)
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
		<-goOn
		os.WriteFile(dir+"/go", nil, 0o644)
	}()
	return between, goOn
}
