package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/keeper"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

// TestSIGTERMAloneKeepsKeeperListeners runs the built binary as the
// DaemonSet does (`ambit-agent run` with keeperSocket, `ambit-agent
// keeper` beside it) and stops the agent with SIGTERM while no other
// agent runs on the node: what the kubelet does to a container that
// failed its liveness probe. The pod's listeners must stay in LISTEN
// (held by the keeper) until the agent is back: a connection made
// meanwhile completes its handshake instead of being refused, and the
// restarted agent's HBONE listener answers it.
func TestSIGTERMAloneKeepsKeeperListeners(t *testing.T) {
	testenv.RequireRoot(t)
	bin := testenv.Binary(t, "ambit-agent")
	health := healthAddr(15941)
	dir, cfg := staticNode(t, "amb-agt-", func(dir string) string {
		return "healthAddr: " + health + "\npolicyDir: " + filepath.Join(dir, "policies") +
			"\ndrainTimeout: 2s\nkeeperSocket: " + filepath.Join(dir, "keeper.sock") + "\n"
	})
	kpath := filepath.Join(dir, "keeper.sock")
	startProcess(t, bin, "keeper", "-socket", kpath)
	waitReady := func() {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for {
			if code, _ := get("http://" + health + "/readyz"); code == 200 {
				return
			}
			if time.Now().After(deadline) {
				t.Fatal("agent not ready within 30s")
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	agent := startProcess(t, bin, "run", "-config", cfg)
	waitReady()

	pod := podNetns(t, "10.78.0.2/24")
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	resp, err := cniproto.Call(ctx, filepath.Join(dir, "cni.sock"), &cniproto.Request{Version: cniproto.Version, Op: cniproto.OpAdd,
		Pod: cniproto.Pod{Namespace: "apps", Name: "web", UID: "u1", ContainerID: "c1", Netns: pod.Name(), IPs: []netip.Prefix{netip.MustParsePrefix("10.78.0.2/24")}}}, pod)
	if err != nil || resp.Decision != cniproto.Enroll {
		t.Fatalf("ADD: %+v %v", resp, err)
	}
	kc, err := keeper.Dial(kpath)
	if err != nil {
		t.Fatal(err)
	}
	kept := func(when string) {
		t.Helper()
		if e, fds, err := kc.Count(); err != nil || e != 1 || fds != 3 {
			t.Fatalf("%s the keeper holds %d entries, %d sockets (%v); want the pod's 3 listeners", when, e, fds, err)
		}
	}
	kept("after the ADD")

	agent.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- agent.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("agent exit: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("agent did not stop within 20s of SIGTERM")
	}
	// No agent: the handshake completes in the kept listener's queue.
	var c net.Conn
	inPod(t, pod, func() { c, err = net.DialTimeout("tcp", "10.78.0.2:15008", 2*time.Second) })
	if err != nil {
		t.Fatalf("HBONE port while the agent is down: %v (refused: the stop released the keeper's copies)", err)
	}
	defer c.Close()
	kept("after the agent stopped")

	startProcess(t, bin, "run", "-config", cfg)
	waitReady()
	kept("after the restart")
	// The restarted agent's listener took the queue over: its TLS server
	// answers the ClientHello (completing, or refusing a client without
	// a mesh certificate with an alert), where a reset or nothing would
	// mean the connection was lost or left where nobody accepts.
	c.SetDeadline(time.Now().Add(10 * time.Second))
	herr := tls.Client(c, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}}).Handshake()
	var alert tls.AlertError
	if herr != nil && !errors.As(herr, &alert) && !strings.Contains(herr.Error(), "remote error") {
		t.Fatalf("TLS to HBONE on the connection made while the agent was down: %v", herr)
	}
	t.Logf("connection made while no agent ran, answered by the restarted one (TLS: %v)", herr)
}

// podNetns makes a named netns with addr on its loopback (a pod, as far
// as the agent can tell) and returns it open.
func podNetns(t *testing.T, addr string) *os.File {
	t.Helper()
	name := fmt.Sprintf("amb-agt-keep%d", time.Now().UnixNano()%1e9)
	func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		orig, _ := netns.Get()
		defer orig.Close()
		h, err := netns.NewNamed(name)
		if err != nil {
			t.Fatal(err)
		}
		defer netns.Set(orig)
		h.Close()
		lo, _ := netlink.LinkByName("lo")
		netlink.LinkSetUp(lo)
		a, _ := netlink.ParseAddr(addr)
		netlink.AddrAdd(lo, a)
	}()
	t.Cleanup(func() { netns.DeleteNamed(name) })
	f, err := os.Open("/var/run/netns/" + name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// inPod runs fn on a thread in pod's netns.
func inPod(t *testing.T, pod *os.File, fn func()) {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // the thread dies with the goroutine, netns and all
		if err := netns.Set(netns.NsHandle(pod.Fd())); err != nil {
			errc <- err
			return
		}
		fn()
		errc <- nil
	}()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}
