package agent

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/cluster"
	"github.com/ambit-mesh/ambit/node-agent/config"
	"github.com/ambit-mesh/ambit/node-agent/instance"
	"github.com/ambit-mesh/ambit/node-agent/keeper"
	"github.com/ambit-mesh/ambit/tunnel"
)

// registered runs the agent options' Beside on a fresh entry of dir's
// instance registry, as `ambit-agent run` does, and returns the entry.
func registered(t *testing.T, dir string) (*instance.Self, func(*Options)) {
	t.Helper()
	self, err := instance.Register(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { self.Close() })
	return self, func(o *Options) { o.Beside = ServingBeside(self) }
}

// withKeeper has the agent put its pods' listeners to the keeper at path.
func withKeeper(t *testing.T, path string) func(*Options) {
	t.Helper()
	k, err := keeper.Dial(path)
	if err != nil {
		t.Fatal(err)
	}
	return func(o *Options) { o.Keeper = k }
}

// keeperNode is a node whose agent keeps its pods' listeners in a
// keeper: a state dir, the keeper (kpath), and the agent's entry in the
// instance registry (self, and the option that runs Beside on it).
func keeperNode(t *testing.T) (dir, kpath string, self *instance.Self, inRegistry func(*Options)) {
	t.Helper()
	dir = agentDir(t)
	kpath, _ = startKeeper(t, dir)
	self, inRegistry = registered(t, dir)
	return dir, kpath, self, inRegistry
}

// restartAgent is the agent container restarted on a keeperNode: same
// state dir, same keeper, a new registry entry.
func restartAgent(t *testing.T, dir, kpath string) *harness {
	t.Helper()
	_, inRegistry := registered(t, dir)
	return startAgent(t, dir, invAmbient, withKeeper(t, kpath), inRegistry)
}

// surgeNode is a node in a surge upgrade: a state dir with a keeper of
// its own for the old agent and for the new one (each agent pod has its
// own emptyDir), and the old agent's entry in the instance registry.
func surgeNode(t *testing.T) (dir, oldKeeper, newKeeper string, oldReg func(*Options)) {
	t.Helper()
	dir = agentDir(t)
	oldKeeper, _ = startKeeper(t, filepath.Join(dir, "old"))
	newKeeper, _ = startKeeper(t, filepath.Join(dir, "new"))
	_, oldReg = registered(t, dir)
	return dir, oldKeeper, newKeeper, oldReg
}

// startReadyAgent starts the newer agent of a surge on dir with its
// keeper and marks it ready in the registry, as `ambit-agent run` does
// once ready.
func startReadyAgent(t *testing.T, dir, keeperPath string, opts ...func(*Options)) *harness {
	t.Helper()
	self, reg := registered(t, dir)
	h := startAgent(t, dir, invAmbient, append([]func(*Options){withKeeper(t, keeperPath), reg}, opts...)...)
	if err := self.SetReady(); err != nil {
		t.Fatal(err)
	}
	return h
}

// queued is a connection made while no agent accepts, with what its
// client sent, and the line the next agent's listener must answer.
type queued struct {
	c    net.Conn
	addr string
	want string
	at   time.Time
}

// dialQueued connects from n to addr and sends a line: the handshake must
// complete (a listener exists) even if nothing accepts yet.
func dialQueued(t *testing.T, n *testNetns, addr, want string) queued {
	t.Helper()
	var c net.Conn
	var err error
	inNetns(t, n, func() error {
		if c, err = net.DialTimeout("tcp", addr, 2*time.Second); err == nil {
			_, err = c.Write([]byte("hello\n"))
		}
		return nil
	})
	if err != nil {
		t.Fatalf("%s: %v (refused: nothing listens while no agent runs)", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return queued{c, addr, want, time.Now()}
}

func (q queued) served(t *testing.T) {
	t.Helper()
	q.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(q.c)
	line, err := r.ReadString('\n')
	if err != nil || strings.TrimSpace(line) != q.want {
		t.Fatalf("%s, made while no agent ran: %q %v, want %q (reset, or left in a queue nobody takes?)", q.addr, line, err, q.want)
	}
	// What it sent while it waited reached the agent that took it.
	if echo, err := r.ReadString('\n'); err != nil || echo != "hello\n" {
		t.Fatalf("%s: echo of what was sent while queued: %q %v", q.addr, echo, err)
	}
	q.c.Close()
}

// TestStopWithoutSuccessorKeepsListeners: the kubelet restarting the
// agent container (a failed liveness probe) stops it with SIGTERM, and no
// other agent runs on the node. The keeper must go on holding the pods'
// listeners, as after kill -9: connections made while the agent drains
// and while no agent runs complete their handshake and wait, and the
// restarted agent serves them. Before, the stop released the keeper's
// copies as for a hand-over, and every one of these was refused.
func TestStopWithoutSuccessorKeepsListeners(t *testing.T) {
	testenv.RequireRoot(t)
	dir, kpath, self, inRegistry := keeperNode(t)
	h := startAgent(t, dir, invAmbient, withKeeper(t, kpath), inRegistry)
	const n = 4
	pods := enrollPods(t, h, n, "10.75.0")
	// Another node's agent and clients reach pod 0 over a link: HBONE on
	// 15008, plaintext to an app port (captured to 15006).
	peer := newNetns(t)
	link(t, peer, pods[0], "10.98.0.1/24", "10.98.0.2/24")
	run(t, "ip", "-n", peer.name, "route", "add", "10.75.0.0/24", "via", "10.98.0.2")
	if c, line, err := dialFrom(t, peer, "10.75.0.2:8080"); err != nil || line != "captured:15006" {
		t.Fatalf("inbound before the stop: %q %v", line, err)
	} else {
		c.Close()
	}
	kc, err := keeper.Dial(kpath)
	if err != nil {
		t.Fatal(err)
	}
	if e, fds, err := kc.Count(); err != nil || e != n || fds != 3*n {
		t.Fatalf("keeper holds %d entries, %d sockets (%v); want %d, %d", e, fds, err, n, 3*n)
	}

	// An established connection keeps the agent draining after the stop.
	held, line, err := dialFrom(t, pods[1], "127.0.0.1:15001")
	if err != nil || line != "captured:15001" {
		t.Fatalf("before the stop: %q %v", line, err)
	}
	stopped := make(chan struct{})
	go func() { h.stop(); close(stopped) }() // SIGTERM's path: Run's context ends
	eventually(t, "the agent to let go of its pods", func() bool { return testutil.ToFloat64(h.a.m.enrolled) == 0 })
	var waiting []queued
	select {
	case <-stopped:
		t.Fatal("the agent stopped before its drain: nothing held it")
	default:
		waiting = append(waiting, dialQueued(t, pods[2], "127.0.0.1:15001", "captured:15001"))
	}
	held.Close()
	<-stopped
	self.Close() // the process is gone

	// No agent: every port of every enrolled pod still completes the
	// handshake.
	for _, pod := range pods {
		waiting = append(waiting, dialQueued(t, pod, "127.0.0.1:15001", "captured:15001"))
	}
	waiting = append(waiting, dialQueued(t, peer, "10.75.0.2:15008", "captured:15008"))
	waiting = append(waiting, dialQueued(t, peer, "10.75.0.2:8080", "captured:15006"))
	if e, fds, err := kc.Count(); err != nil || e != n || fds != 3*n {
		t.Fatalf("after the stop the keeper holds %d entries, %d sockets (%v); want %d, %d", e, fds, err, n, 3*n)
	}

	// The restarted container: same state directory, same keeper. Its
	// listeners replace the kept ones, whose queues move to them.
	restartAgent(t, dir, kpath)
	for _, q := range waiting {
		q.served(t)
	}
	t.Logf("%d connections made during the stop and the outage, none refused; the first waited %v", len(waiting), time.Since(waiting[0].at).Round(time.Millisecond))
	for i, pod := range pods {
		c, line, err := dialFrom(t, pod, "127.0.0.1:15001")
		if err != nil || line != "captured:15001" {
			t.Fatalf("pod %d after the restart: %q %v", i, line, err)
		}
		c.Close()
	}
	if e, fds, err := kc.Count(); err != nil || e != n || fds != 3*n {
		t.Fatalf("the restarted agent's keeper holds %d entries, %d sockets (%v); want %d, %d", e, fds, err, n, 3*n)
	}
}

// TestHandOverReleasesKeeper: the stop that ends a surge upgrade, with
// the newer agent ready beside the old one. The old agent's keeper must
// let the listeners go, so that their queue and every later connection
// go to the newer agent at once; kept, they would stay in the pods'
// SO_REUSEPORT groups and take a share of new connections that nobody
// accepts (until the old pod's keeper stops, which in a cluster it does
// at the same time; a keeper left running, as here, is the case where it
// matters: the old container alone restarting at the end of a surge).
func TestHandOverReleasesKeeper(t *testing.T) {
	testenv.RequireRoot(t)
	dir, oldKeeper, newKeeper, oldReg := surgeNode(t)
	old := startAgent(t, dir, invAmbient, withKeeper(t, oldKeeper), oldReg)
	const n = 3
	pods := enrollPods(t, old, n, "10.76.0")

	// Dial all along, as TestHandOver does.
	stopDialling := dialAllAlong(t, pods[0])
	neu := startReadyAgent(t, dir, newKeeper)
	if neu.tun.Live() != n {
		t.Fatalf("new agent serves %d pods, want %d", neu.tun.Live(), n)
	}
	old.stop()
	time.Sleep(100 * time.Millisecond) // keep dialling after the old one left
	refused, ok := stopDialling()
	if refused != 0 || ok == 0 {
		t.Fatalf("hand-over: %d connections refused or unanswered, %d served", refused, ok)
	}
	// Every new connection goes to the newer agent: none waits in a
	// kept socket's queue (with two sockets in the group, about half
	// would).
	for i := range 16 {
		c, line, err := dialFrom(t, pods[i%n], "127.0.0.1:15001")
		if err != nil || line != "captured:15001" {
			t.Fatalf("connection %d after the hand-over: %q %v (left in the old keeper's socket?)", i, line, err)
		}
		c.Close()
	}
	oc, err := keeper.Dial(oldKeeper)
	if err != nil {
		t.Fatal(err)
	}
	if e, fds, err := oc.Count(); err != nil || e != 0 || fds != 0 {
		t.Fatalf("the old agent's keeper still holds %d entries, %d sockets (%v) after the hand-over", e, fds, err)
	}
	t.Logf("hand-over with keepers: %d connections during the switch, none refused", ok)
}

// TestServingBeside: which agents of the registry take the kept
// listeners' queue over when this one stops.
func TestServingBeside(t *testing.T) {
	dir := t.TempDir()
	reg := func() *instance.Self {
		s, err := instance.Register(dir)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		time.Sleep(time.Microsecond) // names order by start time (ns)
		return s
	}
	older := reg()
	self := reg()
	beside := ServingBeside(self)
	// An older agent that is not ready (still starting, never was).
	if beside() {
		t.Fatal("an older agent that is not ready serves beside")
	}
	older.SetReady()
	if !beside() {
		t.Fatal("a ready older agent (a rollback deleting this surge agent) does not count")
	}
	older.Stopping()
	if beside() {
		t.Fatal("a stopping older agent counts (its listeners are closing)")
	}
	newer := reg()
	if beside() {
		t.Fatal("a newer agent still starting counts (its listeners are not in every pod yet)")
	}
	newer.SetReady()
	if !beside() {
		t.Fatal("a ready newer agent (the end of a surge upgrade) does not count")
	}
	newer.Stopping()
	if beside() {
		t.Fatal("a stopping newer agent counts")
	}
	// A newer agent that died ready (kill -9: its entry and ready marker
	// stay, its lock is gone).
	dead := filepath.Join(dir, instance.Dir, "99999999999999999999-dead")
	if err := os.WriteFile(dead, []byte("pid 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dead+".ready", nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if beside() {
		t.Fatal("a dead newer agent counts")
	}
}

// withRealTunnel serves the agent's pods with the real tunnel (mTLS
// HBONE between them), as TestMeshThroughRealTunnel does.
func withRealTunnel(t *testing.T) func(*Options) {
	return func(o *Options) { serveByRealTunnel(t, o, prometheus.NewRegistry()) }
}

// meshedPair enrolls a client and a server pod (app on 10.91.x.3:8080
// answering "plain" and echoing) in h's agent with the real tunnel.
func meshedPair(t *testing.T, h *harness, x int) (client *testNetns, server string) {
	t.Helper()
	pol := h.a.Policy()
	h.inv.SetMeshed(func(p cluster.Pod, ns *cluster.Namespace) bool { return pol.Decide(p, ns).Enroll })
	cip, sip := fmt.Sprintf("10.91.%d.2", x), fmt.Sprintf("10.91.%d.3", x)
	client, srv := newPair(t, cip, sip)
	enrollLikePlugin(t, h, "client", client, cip+"/24")
	enrollLikePlugin(t, h, "server", srv, sip+"/24")
	return client, sip + ":8080"
}

// servedWithin dials addr from n through the mesh and reports whether the
// app answered, and echoed a line, within d.
func servedWithin(t *testing.T, n *testNetns, addr string, d time.Duration) error {
	t.Helper()
	var c net.Conn
	var err error
	inNetns(t, n, func() error { c, err = net.DialTimeout("tcp", addr, d); return nil })
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(d))
	r := bufio.NewReader(c)
	if line, err := r.ReadString('\n'); err != nil || line != "plain\n" {
		return fmt.Errorf("first line %q: %v", line, err)
	}
	fmt.Fprintf(c, "ping\n")
	if line, err := r.ReadString('\n'); err != nil || line != "ping\n" {
		return fmt.Errorf("echo %q: %v", line, err)
	}
	return nil
}

// TestStopWithoutSuccessorServesWhileDraining: SIGTERM with no other
// agent on the node (a liveness restart) and a connection keeping the
// drain going. New connections made during the drain are served by the
// stopping agent at once, through the real tunnel; the listeners close
// once no connection is left, the keeper keeps them for the restart, and
// a stop with nothing open does not wait. Before, the listeners closed at
// the start of the drain: a connection made then waited in the keeper's
// queue for the whole drain (drainTimeout) and the restart.
func TestStopWithoutSuccessorServesWhileDraining(t *testing.T) {
	testenv.RequireRoot(t)
	dir, kpath, self, inRegistry := keeperNode(t)
	const drain = 30 * time.Second
	h := startAgent(t, dir, invAmbient, withKeeper(t, kpath), inRegistry, withRealTunnel(t), func(o *Options) {
		o.Config.DrainTimeout = config.Duration{Duration: drain}
	})
	client, server := meshedPair(t, h, 0)
	if err := servedWithin(t, client, server, 5*time.Second); err != nil {
		t.Fatalf("before the stop: %v", err)
	}
	// A long-lived connection (a client's keep-alive pool) keeps the
	// drain going.
	var held net.Conn
	var err error
	inNetns(t, client, func() error { held, err = net.DialTimeout("tcp", server, 2*time.Second); return nil })
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	held.SetReadDeadline(time.Now().Add(5 * time.Second))
	if line, err := bufio.NewReader(held).ReadString('\n'); err != nil || line != "plain\n" {
		t.Fatalf("held connection: %q %v", line, err)
	}

	start := time.Now()
	stopped := make(chan struct{})
	go func() { h.stop(); close(stopped) }() // SIGTERM's path: Run's context ends
	eventually(t, "the agent to stop", h.a.stopping.Load)
	// Past the point where the listeners used to close (the loops and the
	// plugin server end within milliseconds).
	time.Sleep(200 * time.Millisecond)
	for i := range 5 {
		if err := servedWithin(t, client, server, time.Second); err != nil {
			t.Fatalf("connection %d made %v into the drain: not served within 1 s: %v (waiting in the kept queue for the drain and the restart?)", i, time.Since(start).Round(time.Millisecond), err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	select {
	case <-stopped:
		t.Fatal("the agent stopped while a connection was open")
	default:
	}
	held.Close()
	select {
	case <-stopped:
	case <-time.After(drain / 2):
		t.Fatalf("the stop went on %v after the last connection closed", drain/2)
	}
	self.Close()
	t.Logf("served through the drain; the stop ended %v after SIGTERM, once the held connection closed", time.Since(start).Round(time.Millisecond))

	// The keeper kept the listeners: a connection made now is queued
	// and served by the restarted agent.
	q := dialQueued(t, client, "127.0.0.1:15001", "captured:15001")
	restartAgent(t, dir, kpath)
	q.served(t)
}

// A stop with no agent beside and no connection open ends at once: the
// agent serves on only while there is something to drain, so the restart
// is not held up by it.
func TestStopWithoutSuccessorIdleEndsAtOnce(t *testing.T) {
	testenv.RequireRoot(t)
	const drain = 30 * time.Second
	h := startAgent(t, "", invAmbient, withRealTunnel(t), func(o *Options) {
		o.Config.DrainTimeout = config.Duration{Duration: drain}
	})
	client, server := meshedPair(t, h, 1)
	if err := servedWithin(t, client, server, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	stopped := make(chan struct{})
	go func() { h.stop(); close(stopped) }()
	select {
	case <-stopped:
		t.Logf("idle stop: %v", time.Since(start).Round(time.Millisecond))
	case <-time.After(drain - drainTail(drain) - 10*time.Second):
		t.Fatal("an idle agent served on instead of stopping")
	}
}

// countingTunnel is the echo tunnel whose pods say how many connections
// they hold, as *tunnel.Serving does, so the agent serves on through a
// stop with nobody beside.
type countingTunnel struct{ echoTunnel }

type countingServing struct{ *echoServing }

func (c *countingTunnel) Serve(p tunnel.Pod) (Serving, error) {
	s, err := c.echoTunnel.Serve(p)
	if err != nil {
		return nil, err
	}
	return countingServing{s.(*echoServing)}, nil
}

func (s countingServing) Connections() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

func withCountingTunnel(o *Options) { o.Tunnel = &countingTunnel{} }

// TestServeOnEndsWhenNewerAgentReady: an agent stops with no agent
// beside it and serves on while a connection is open (a pod of the node
// holds one), and a newer agent becomes ready meanwhile. That is what
// `kubectl delete pod` of the agent does with maxSurge 1 (the DaemonSet
// controller creates the new pod at once, beside the one terminating),
// and the controller deleting an old pod that turned unready during a
// surge. From then on the stop is a hand-over: the old agent must stop
// accepting and have its keeper let go, so every new connection goes to
// the newer agent. Before, it served on to the end of its limit
// (drainTimeout - 5 s), taking about half of the new connections, and
// cut those still open when its drain ended, though an agent was there
// to serve them for good.
func TestServeOnEndsWhenNewerAgentReady(t *testing.T) {
	testenv.RequireRoot(t)
	dir, oldKeeper, newKeeper, oldReg := surgeNode(t)
	const drain = 20 * time.Second
	old := startAgent(t, dir, invAmbient, withKeeper(t, oldKeeper), oldReg, withCountingTunnel, func(o *Options) {
		o.Config.DrainTimeout = config.Duration{Duration: drain}
	})
	const n = 2
	pods := enrollPods(t, old, n, "10.77.0")
	held, line, err := dialFrom(t, pods[0], "127.0.0.1:15001")
	if err != nil || line != "captured:15001" {
		t.Fatalf("before the stop: %q %v", line, err)
	}
	defer held.Close()

	start := time.Now()
	stopped := make(chan struct{})
	go func() { old.stop(); close(stopped) }() // SIGTERM, nobody beside
	eventually(t, "the old agent to stop", old.a.stopping.Load)
	time.Sleep(200 * time.Millisecond) // serving on

	neu := startReadyAgent(t, dir, newKeeper, withCountingTunnel)
	readyAt := time.Now()
	if got := testutil.ToFloat64(neu.a.m.enrolled); got != n {
		t.Fatalf("newer agent serves %v pods, want %d", got, n)
	}
	oc, err := keeper.Dial(oldKeeper)
	if err != nil {
		t.Fatal(err)
	}
	// Give the old agent time to notice (it is not what fails).
	letGo := func() bool {
		e, fds, err := oc.Count()
		return err == nil && e == 0 && fds == 0 && testutil.ToFloat64(old.a.m.enrolled) == 0
	}
	for deadline := time.Now().Add(3 * time.Second); !letGo() && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
	}
	noticed := time.Since(readyAt)
	time.Sleep(100 * time.Millisecond) // its listeners close right after

	var conns []net.Conn
	for i := range 12 {
		c, line, err := dialFrom(t, pods[i%n], "127.0.0.1:15001")
		if err != nil || line != "captured:15001" {
			t.Fatalf("connection %d, made after the newer agent was ready: %q %v (left in the old keeper's socket?)", i, line, err)
		}
		defer c.Close()
		conns = append(conns, c)
	}
	held.Close()
	select {
	case <-stopped:
	case <-time.After(drain + 10*time.Second):
		t.Fatal("the old agent did not stop")
	}
	stoppedAfter := time.Since(start)
	var cut []string
	for i, c := range conns {
		r := make([]byte, 5)
		c.SetDeadline(time.Now().Add(2 * time.Second))
		_, err := c.Write([]byte("ping\n"))
		if err == nil {
			_, err = io.ReadFull(c, r)
		}
		if err != nil || string(r) != "ping\n" {
			cut = append(cut, fmt.Sprintf("%d (%q %v)", i, r, err))
		}
		c.Close()
	}
	if len(cut) > 0 {
		t.Fatalf("%d of %d connections made after the newer agent was ready cut by the old agent's stop (%v after SIGTERM): %v", len(cut), len(conns), stoppedAfter.Round(time.Millisecond), cut)
	}
	if !letGo() {
		t.Fatal("the old agent's keeper still holds the pods' listeners")
	}
	t.Logf("the old agent let go %v after the newer one was ready; its stop ended %v after SIGTERM", noticed.Round(time.Millisecond), stoppedAfter.Round(time.Millisecond))
}
