package main

import (
	"crypto/tls"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/keeper"
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
	agent := startProcess(t, bin, "run", "-config", cfg)
	waitReady(t, health)

	pod := newTestPod(t, "web", "10.78.0", false)
	pod.add(t, filepath.Join(dir, "cni.sock"))
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

	stopBySIGTERM(t, agent)
	// No agent: the handshake completes in the kept listener's queue.
	var c net.Conn
	inNamedNetns(t, pod.ns, func() error { c, err = net.DialTimeout("tcp", "10.78.0.2:15008", 2*time.Second); return nil })
	if err != nil {
		t.Fatalf("HBONE port while the agent is down: %v (refused: the stop released the keeper's copies)", err)
	}
	defer c.Close()
	kept("after the agent stopped")

	startProcess(t, bin, "run", "-config", cfg)
	waitReady(t, health)
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
