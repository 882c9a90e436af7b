package agent

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"golang.org/x/sys/unix"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/cluster"
	"github.com/ambit-mesh/ambit/node-agent/inventory"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

// portsView is the inventory with container ports: the inventory has
// none, a Kubernetes pod does (kube.TrimPod keeps the reserved ones).
type portsView struct {
	*inventory.Source
	ports map[string][]cluster.DeclaredPort // "ns/name"
}

func (v portsView) Pod(ctx context.Context, ns, name string) (cluster.Pod, bool, error) {
	p, ok, err := v.Source.Pod(ctx, ns, name)
	p.ReservedPorts = v.ports[ns+"/"+name]
	return p, ok, err
}

func (v portsView) LocalPods() []cluster.Pod {
	ps := v.Source.LocalPods()
	for i := range ps {
		ps[i].ReservedPorts = v.ports[ps[i].Namespace+"/"+ps[i].Name]
	}
	return ps
}

// statusLog records what the agent reports on pods.
type statusLog struct {
	mu     sync.Mutex
	states map[string]string
	events []string // "ns/name reason: message"
}

func (s *statusLog) SetRedirection(_ context.Context, p cluster.Pod, st string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.states == nil {
		s.states = map[string]string{}
	}
	s.states[p.Namespace+"/"+p.Name] = st
	return nil
}

func (s *statusLog) Warn(_ context.Context, p cluster.Pod, reason, msg string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.events = append(s.events, p.Namespace+"/"+p.Name+" "+reason+": "+msg)
	return nil
}

func (s *statusLog) state(key string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.states[key]
}

func (s *statusLog) event(reason string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, e := range s.events {
		if strings.Contains(e, " "+reason+": ") {
			return e
		}
	}
	return ""
}

// withPorts wires portsView and a statusLog into an agent.
func withPorts(ports map[string][]cluster.DeclaredPort, sl *statusLog) func(*Options) {
	return func(o *Options) {
		o.View = portsView{Source: o.View.(*inventory.Source), ports: ports}
		o.Status = sl
	}
}

// A pod that declares a port the agent listens on: before, the ADD
// enrolled it and its app would crash on EADDRINUSE (or, root with
// SO_REUSEPORT, share the port with the agent). Now the ADD fails with
// CodePortConflict and a message naming the pod, the port and the two
// ways out, nothing is left in the netns, and the pod is reported
// (annotation "failed", Event ReservedPortDeclared, metric).
func TestAddRefusesADeclaredReservedPort(t *testing.T) {
	testenv.RequireRoot(t)
	sl := &statusLog{}
	ports := map[string][]cluster.DeclaredPort{"apps/web": {{Container: "proxy", Port: 15008}}}
	h := startAgent(t, "", invAmbient, withPorts(ports, sl))
	pod := newNetns(t, "10.66.0.2/32")
	resp, err := h.call(cniproto.OpAdd, "apps", "web", "cid-ports", pod, "10.66.0.2/32")
	if err != nil {
		t.Fatal(err)
	}
	if resp.Error == "" || resp.Code != cniproto.CodePortConflict || resp.Retryable {
		t.Fatalf("ADD of a pod declaring 15008: %+v, want a non-retryable error with code %d", resp, cniproto.CodePortConflict)
	}
	for _, want := range []string{"apps/web", "containerPort 15008", `"proxy"`, "change the pod's port", "ambit.dev/dataplane-mode=none"} {
		if !strings.Contains(resp.Error, want) {
			t.Errorf("error %q does not say %q", resp.Error, want)
		}
	}
	if out, _ := exec.Command("ip", "netns", "exec", pod.name, "ss", "-Htln").CombinedOutput(); strings.Contains(string(out), "LISTEN") {
		t.Errorf("listeners left in the pod: %s", out)
	}
	if out, _ := exec.Command("ip", "netns", "exec", pod.name, "nft", "list", "ruleset").CombinedOutput(); strings.Contains(string(out), "ambit") {
		t.Errorf("rules left in the pod: %s", out)
	}
	eventually(t, "failed annotation", func() bool { return sl.state("apps/web") == "failed" })
	if e := sl.event(eventReservedPort); !strings.Contains(e, "15008") {
		t.Errorf("no %s event naming the port: %q", eventReservedPort, sl.events)
	}
	// A pod of the same namespace without such a port is enrolled.
	other := newNetns(t, "10.66.0.3/32")
	h.writeInventory(invAmbient + "  - namespace: apps\n    name: api\n")
	if err := h.inv.Reload(); err != nil {
		t.Fatal(err)
	}
	if resp, err := h.call(cniproto.OpAdd, "apps", "api", "cid-api", other, "10.66.0.3/32"); err != nil || resp.Error != "" || resp.Decision != cniproto.Enroll {
		t.Fatalf("ADD of a pod without reserved ports: %+v %v", resp, err)
	}
}

// A running pod enrolled live (its namespace labelled) whose app
// already listens on 15008, root with SO_REUSEPORT: the agent used to
// join the app's group (the kernel then split the HBONE connections
// between them) and report the pod enrolled. Now the enrollment fails,
// naming the port and the process, and the app keeps its port alone.
func TestLiveEnrollmentBesideAnAppOnAReservedPort(t *testing.T) {
	testenv.RequireRoot(t)
	sl := &statusLog{}
	h := startAgent(t, "", invPlain, withPorts(nil, sl))
	pod, _ := newPair(t, "10.67.0.2", "10.67.0.1")
	if resp, err := h.call(cniproto.OpAdd, "apps", "web", "cid-live-port", pod, "10.67.0.2/24"); err != nil || resp.Decision != cniproto.Skip {
		t.Fatalf("ADD in a plain namespace: %+v %v", resp, err)
	}
	var app net.Listener
	inNetns(t, pod, func() (err error) {
		lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
			var serr error
			rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1) })
			return serr
		}}
		app, err = lc.Listen(context.Background(), "tcp", ":15008")
		return err
	})
	defer app.Close()
	h.writeInventory(invAmbient)
	if err := h.inv.Reload(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "failed annotation", func() bool { return sl.state("apps/web") == "failed" })
	e := sl.event(eventPortInUse)
	for _, want := range []string{"port 15008", "agent.test", "ambit.dev/dataplane-mode=none"} {
		if !strings.Contains(e, want) {
			t.Errorf("event %q does not say %q (events %q)", e, want, sl.events)
		}
	}
	if p := h.podNow("apps/web"); p != nil && p.enrolled() {
		t.Fatal("the pod is served beside its app's listener")
	}
	out, _ := exec.Command("ip", "netns", "exec", pod.name, "ss", "-Htln", "sport = :15008").CombinedOutput()
	if strings.Count(string(out), "LISTEN") != 1 {
		t.Errorf("listeners on 15008 in the pod: %q, want the app's alone", out)
	}
	// Nothing redirected: the pod's traffic is as before (plaintext).
	c, line, err := dialFrom(t, pod, "10.67.0.1:8080")
	if err != nil || line != "plain" {
		t.Fatalf("after the refused enrollment: %q %v, want plain", line, err)
	}
	c.Close()
}

// What the runtime sees (libcni running bridge, host-local, portmap and
// the real ambit-cni): the ADD fails with the CNI error code 104 and the
// agent's message, which the kubelet shows in the pod's
// FailedCreatePodSandBox event.
func TestDeclaredReservedPortThroughRealChain(t *testing.T) {
	testenv.RequireRoot(t)
	cni := testenv.Binary(t, "ambit-cni")
	set := testenv.PluginSets(t)[0]
	sl := &statusLog{}
	h := startAgent(t, "", invAmbient, withPorts(map[string][]cluster.DeclaredPort{"apps/web": {{Container: "app", Port: 15006}}}, sl))
	node := labNode(t, h, set, cni, netip.MustParsePrefix("10.81.0.0/24"))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err := node.AddPod(ctx, "apps", "web")
	var ce *types.Error
	if !errors.As(err, &ce) {
		t.Fatalf("ADD of a pod declaring 15006: %v (%T), want a CNI error", err, err)
	}
	if ce.Code != cniproto.CodePortConflict || !strings.Contains(ce.Msg, "apps/web declares containerPort 15006") || !strings.Contains(ce.Msg, "dataplane-mode=none") {
		t.Fatalf("CNI error %d %q", ce.Code, ce.Msg)
	}
	t.Logf("the runtime sees: code %d: %s", ce.Code, ce.Msg)
	if h.tun.Live() != 0 {
		t.Fatalf("agent serves %d pods", h.tun.Live())
	}
}

// A rollback to an agent older than ListenerUID: that agent makes its
// listeners as root (Go's default MPTCP listener, SO_REUSEPORT, the
// agent's mark), and the kernel lets it join only a group of the same
// owner. So by default (exclusiveListeners off) the agent's listeners
// are root's and the older agent joins them; with exclusiveListeners on
// they are ListenerUID's and it cannot (what docs/upgrade.md warns of).
// Before the switch existed every agent made ListenerUID listeners and
// the older agent's listen failed here.
func TestOlderAgentJoinsTheListenersUnlessExclusive(t *testing.T) {
	testenv.RequireRoot(t)
	for _, tc := range []struct {
		exclusive bool
		wantJoin  bool
	}{{false, true}, {true, false}} {
		h := startAgent(t, "", invAmbient, func(o *Options) { o.Config.ExclusiveListeners = tc.exclusive })
		pod := newNetns(t, "10.68.0.2/32")
		resp, err := h.call(cniproto.OpAdd, "apps", "web", "cid-rollback", pod, "10.68.0.2/32")
		if err != nil || resp.Error != "" || resp.Decision != cniproto.Enroll {
			t.Fatalf("exclusive=%v: ADD: %+v %v", tc.exclusive, resp, err)
		}
		var joined []int
		for _, port := range []int{15001, 15006, 15008} {
			var ln net.Listener
			var lerr error
			inNetns(t, pod, func() error {
				lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
					var serr error
					rc.Control(func(fd uintptr) {
						for _, o := range [][3]int{
							{unix.SOL_SOCKET, unix.SO_REUSEPORT, 1},
							{unix.SOL_SOCKET, unix.SO_MARK, 0x539},
							{unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0},
						} {
							if serr == nil {
								serr = unix.SetsockoptInt(int(fd), o[0], o[1], o[2])
							}
						}
					})
					return serr
				}}
				ln, lerr = lc.Listen(context.Background(), "tcp6", "[::]:"+strconv.Itoa(port))
				return nil
			})
			if lerr == nil {
				joined = append(joined, port)
				ln.Close()
			} else if !errors.Is(lerr, unix.EADDRINUSE) {
				t.Errorf("exclusive=%v: older agent's listen on %d: %v", tc.exclusive, port, lerr)
			}
		}
		if tc.wantJoin && len(joined) != 3 {
			t.Errorf("exclusiveListeners off: an older agent (root) joined only %v of 15001, 15006, 15008; a rollback would leave the pod without listeners", joined)
		}
		if !tc.wantJoin && len(joined) != 0 {
			t.Errorf("exclusiveListeners on: a root socket joined the agent's listeners on %v", joined)
		}
	}
}
