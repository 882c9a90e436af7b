package benchkit

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/maxprocs"
	"github.com/ambit-mesh/ambit/internal/testca"
	"github.com/ambit-mesh/ambit/tunnel"
	"github.com/ambit-mesh/ambit/tunnel/internal/meshtest"
	"github.com/ambit-mesh/ambit/tunnel/internal/podtest"
	"github.com/ambit-mesh/ambit/tunnel/podnet"
)

// Every proxy of a benchmark runs in its own process, as agents and
// relays do for real: in one process they would share the apps'
// GOMAXPROCS and the comparison would be unfair to whoever shares. A test
// binary re-executes itself in a role (MaybeHelper, from TestMain).

const roleEnv = "AMBIT_BENCH_ROLE"

// MaybeHelper runs the helper role named in the environment and exits;
// it returns at once in a normal test run. Call it first in TestMain.
func MaybeHelper() {
	switch os.Getenv(roleEnv) {
	case "":
		return
	case "relay":
		helperRelay()
	case "agent":
		// Sized as the node agent sizes itself: on a node of its own
		// (AGENT_SPECS, one agent for both pods) the whole machine; an
		// agent per pod models two nodes sharing this machine, each
		// with half its CPUs.
		procs := 0
		if os.Getenv("AGENT_SPECS") == "" {
			procs = maxprocs.Default(max(1, runtime.GOMAXPROCS(0)/2))
		}
		maxprocs.Start(context.Background(), procs, nil)
		helperAgent()
	default:
		fmt.Fprintln(os.Stderr, "unknown role", os.Getenv(roleEnv))
		os.Exit(2)
	}
	os.Exit(0)
}

func die(err error) {
	fmt.Fprintln(os.Stderr, "bench helper:", err)
	os.Exit(2)
}

// helperRelay: for each port p of PORTS listen on LISTEN_BASE+p and
// forward to TARGET_IP:TARGET_BASE+p (process inside the pod netns).
func helperRelay() {
	var base, tbase int
	fmt.Sscan(os.Getenv("LISTEN_BASE"), &base)
	fmt.Sscan(os.Getenv("TARGET_BASE"), &tbase)
	target := os.Getenv("TARGET_IP")
	for _, f := range strings.Fields(os.Getenv("PORTS")) {
		var p int
		fmt.Sscan(f, &p)
		ln, err := net.Listen("tcp", fmt.Sprintf(":%d", base+p))
		if err != nil {
			die(err)
		}
		up := net.JoinHostPort(target, fmt.Sprint(tbase+p))
		relay(ln, func() (net.Conn, error) { return net.Dial("tcp", up) })
	}
	fmt.Println("ready")
	io.Copy(io.Discard, os.Stdin)
}

// agentSpec is what a helper agent is given.
type agentSpec struct {
	NetnsPath string
	Self      tunnel.Workload
	Peers     []tunnel.Workload
	CertPEM   string
	KeyPEM    string
	RootPEM   string
	TD        string
}

// pemCerts hands each workload its own certificate (one agent may serve
// several pods, as a node agent does).
type pemCerts struct {
	certs map[string]*tls.Certificate // by identity
	roots *x509.CertPool
	td    string
}

func (p *pemCerts) Certificate(_ context.Context, id string) (*tls.Certificate, error) {
	if c, ok := p.certs[id]; ok {
		return c, nil
	}
	return nil, fmt.Errorf("no certificate for %s", id)
}
func (p *pemCerts) Roots() *x509.CertPool { return p.roots }
func (p *pemCerts) TrustDomain() string   { return p.td }

type staticDir map[netip.Addr]tunnel.Workload

func (d staticDir) WorkloadByIP(ip netip.Addr) (tunnel.Workload, bool) {
	w, ok := d[ip.Unmap()]
	return w, ok
}
func (d staticDir) ServiceEndpoints(netip.AddrPort) ([]netip.AddrPort, bool) { return nil, false }

// helperAgent serves its pods like the node agent: listeners opened in
// each pod's netns through podnet, one tunnel for all of them.
// AGENT_SPEC is one pod (an agent per pod, modelling pods on two nodes);
// AGENT_SPECS a JSON list of them (one agent for pods of one node).
func helperAgent() {
	var specs []agentSpec
	if js := os.Getenv("AGENT_SPECS"); js != "" {
		if err := json.Unmarshal([]byte(js), &specs); err != nil {
			die(err)
		}
	} else {
		var spec agentSpec
		if err := json.Unmarshal([]byte(os.Getenv("AGENT_SPEC")), &spec); err != nil {
			die(err)
		}
		specs = append(specs, spec)
	}
	certs := &pemCerts{certs: map[string]*tls.Certificate{}, roots: x509.NewCertPool(), td: specs[0].TD}
	certs.roots.AppendCertsFromPEM([]byte(specs[0].RootPEM))
	dir := staticDir{}
	for _, spec := range specs {
		cert, err := tls.X509KeyPair([]byte(spec.CertPEM), []byte(spec.KeyPEM))
		if err != nil {
			die(err)
		}
		certs.certs[spec.Self.Identity] = &cert
		for _, w := range append(spec.Peers, spec.Self) {
			for _, ip := range w.IPs {
				dir[ip] = w
			}
		}
	}
	cfg := tunnel.Config{Directory: dir, Certificates: certs,
		Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))}
	// For experiments: AMBIT_BENCH_FRAME overrides the DATA frame size.
	fmt.Sscan(os.Getenv("AMBIT_BENCH_FRAME"), &cfg.HBONE.SendFrameSize)
	fmt.Sscan(os.Getenv("AMBIT_BENCH_READ"), &cfg.HBONE.AppReadSize)
	fmt.Sscan(os.Getenv("AMBIT_BENCH_SOCKREAD"), &cfg.HBONE.SocketReadSize)
	px, err := tunnel.New(cfg)
	if err != nil {
		die(err)
	}
	for _, spec := range specs {
		f, err := os.Open(spec.NetnsPath)
		if err != nil {
			die(err)
		}
		pn, err := podnet.Open(f)
		if err != nil {
			die(err)
		}
		pod, err := meshtest.PodListeners(spec.Self, pn)
		if err != nil {
			die(err)
		}
		if _, err := px.Serve(pod); err != nil {
			die(err)
		}
	}
	// AMBIT_BENCH_EXEC_EVERY (a duration) runs true(1) that often, as
	// the node agent runs iptables or nft for its rule checks: a child's
	// wait is a blocking system call, during which a one-P agent serves
	// nothing until the runtime's sysmon hands the P to another thread
	// (docs/tunnel.md, session 17: how soon depends on sysmon's state).
	if d, err := time.ParseDuration(os.Getenv("AMBIT_BENCH_EXEC_EVERY")); err == nil && d > 0 {
		go func() {
			for range time.Tick(d) {
				_ = exec.Command("true").Run()
			}
		}()
	}
	if p := os.Getenv("AMBIT_BENCH_CPUPROFILE"); p != "" {
		f, err := os.Create(fmt.Sprintf("%s.%s", p, specs[0].Self.Namespace))
		if err == nil {
			pprof.StartCPUProfile(f)
			defer pprof.StopCPUProfile()
		}
	}
	fmt.Println("ready")
	io.Copy(io.Discard, os.Stdin)
}

// Start runs this binary in a role with env, inside netns (ip netns exec)
// when netns is not empty, and waits for its "ready". It dies with the
// test. The returned pid is the helper's own.
func Start(tb testing.TB, netns string, env ...string) int {
	tb.Helper()
	self, _ := os.Executable()
	return StartBin(tb, self, netns, env...)
}

// StartBin is Start with another binary: a test binary of this package
// built from another commit, for A/B runs of two builds side by side.
func StartBin(tb testing.TB, self, netns string, env ...string) int {
	tb.Helper()
	var cmd *exec.Cmd
	if netns != "" {
		cmd = exec.Command("ip", "netns", "exec", netns, self)
	} else {
		cmd = exec.Command(self)
	}
	cmd.Env = append(os.Environ(), env...)
	cmd.Stderr = os.Stderr
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		stdin.Close()
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(3 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	buf := make([]byte, 6)
	if _, err := io.ReadFull(stdout, buf); err != nil || string(buf) != "ready\n" {
		tb.Fatalf("helper %v did not start: %q %v", env, buf, err)
	}
	go io.Copy(io.Discard, stdout)
	return cmd.Process.Pid
}

// RelayPairProcs is the relay pair with each relay in its own process
// inside its pod.
func RelayPairProcs(tb testing.TB) Setup { return relayPair(tb, "relay pair", nil) }

// Nft loads rules into netns name (diagnostic setups).
func Nft(tb testing.TB, name, rules string) {
	cmd := exec.Command("ip", "netns", "exec", name, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		tb.Fatalf("nft in %s: %v\n%s", name, err, out)
	}
}

// RelayPairCT is the relay pair with conntrack on in both pods (a rule
// that reads the connection state, as capture rules do).
func RelayPairCT(tb testing.TB) Setup {
	return relayPair(tb, "relay+ct", func(p *Plain) {
		for _, n := range []string{p.A.Name, p.B.Name} {
			Nft(tb, n, `table inet ct_on {
	chain pre { type filter hook prerouting priority -150; policy accept; ct mark 0x999 accept; }
	chain out { type route hook output priority -150; policy accept; ct mark 0x999 accept; }
}`)
		}
	})
}

// relayPair starts a relay in each pod of a fresh plain pair, after
// prepare (if any) has had its way with the pods.
func relayPair(tb testing.TB, name string, prepare func(*Plain)) Setup {
	p := NewPlain(tb)
	if prepare != nil {
		prepare(p)
	}
	ports := fmt.Sprintf("%d %d %d %d", PortSink, PortRR, PortPing, PortIperf)
	pb := Start(tb, p.B.Name, roleEnv+"=relay", "PORTS="+ports, "LISTEN_BASE=27000", "TARGET_IP=127.0.0.1", "TARGET_BASE=0")
	pa := Start(tb, p.A.Name, roleEnv+"=relay", "PORTS="+ports, "LISTEN_BASE=17000", "TARGET_IP="+p.B.IP4.String(), "TARGET_BASE=27000")
	return Setup{Name: name, Dial: func(port uint16) (net.Conn, error) {
		return p.NA.Dial(context.Background(), netip.Addr{}, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), 17000+port))
	}, CPU: func() float64 { return ProcCPU(pa) + ProcCPU(pb) }, Pids: []int{pa, pb}, Iperf: LocalIperf(p.A.Name)}
}

// AmbitProcs is Ambit with one agent process per pod (host netns,
// entering the pod through podnet, as the node agent does).
func AmbitProcs(tb testing.TB) Setup {
	self, _ := os.Executable()
	return AmbitProcsBin(tb, "ambit", self)
}

// AmbitProcsBin is AmbitProcs with agents run from bin (a test binary of
// package tunnel, possibly built from another commit), named name, with
// env added to theirs.
func AmbitProcsBin(tb testing.TB, name, bin string, env ...string) Setup {
	return ambitProcs(tb, name, bin, false, env...)
}

// AmbitOneAgent is Ambit with one agent process serving both pods: what
// a node runs when client and server are on the same node. The HBONE
// hop still goes through TLS and the pods' veths; what it saves is the
// second process, whose wake-ups on this 2-vCPU guest cost more than
// the work they do (docs/tunnel.md).
func AmbitOneAgent(tb testing.TB) Setup {
	self, _ := os.Executable()
	return ambitProcs(tb, "ambit 1 agent", self, true)
}

// AmbitOneAgentBin is AmbitOneAgent run from bin, named name, with env
// added to the agent's (A/B runs).
func AmbitOneAgentBin(tb testing.TB, name, bin string, env ...string) Setup {
	return ambitProcs(tb, name, bin, true, env...)
}

func ambitProcs(tb testing.TB, name, bin string, oneAgent bool, env ...string) Setup {
	// AMBIT_BENCH_AGENT_ENV (space-separated) goes to every Ambit agent
	// of the run and to nothing else (not the relays, not the apps): to
	// measure a process setting of the agent, such as a GODEBUG, in the
	// full table (docs/tunnel.md, session 17).
	env = append(strings.Fields(os.Getenv("AMBIT_BENCH_AGENT_ENV")), env...)
	a, b := podtest.Pair(tb)
	for _, p := range []*podtest.Pod{a, b} {
		podtest.Redirect(tb, p)
		for _, e := range env {
			if e == "AMBIT_BENCH_NOTRACK=1" {
				Nft(tb, p.Name, `table inet ambit_notrack {
	chain pre { type filter hook prerouting priority raw; policy accept; tcp dport 15008 notrack; tcp sport 15008 notrack; }
	chain out { type filter hook output priority raw; policy accept; tcp dport 15008 notrack; tcp sport 15008 notrack; }
}`)
			}
		}
	}
	ca, err := testca.New("cluster.local")
	if err != nil {
		tb.Fatal(err)
	}
	wa := tunnel.Workload{Namespace: "a", Name: "client-pod", ServiceAccount: "client", IPs: []netip.Addr{a.IP4, a.IP6}, Identity: ca.ID("a", "client"), Meshed: true}
	wb := tunnel.Workload{Namespace: "b", Name: "server-pod", ServiceAccount: "server", IPs: []netip.Addr{b.IP4, b.IP6}, Identity: ca.ID("b", "server"), Meshed: true}
	var specs []agentSpec
	for _, x := range []struct {
		pod        *podtest.Pod
		self, peer tunnel.Workload
	}{{a, wa, wb}, {b, wb, wa}} {
		c, err := ca.Issue(x.self.Identity, testca.IssueOptions{})
		if err != nil {
			tb.Fatal(err)
		}
		key, _ := x509.MarshalPKCS8PrivateKey(c.PrivateKey)
		specs = append(specs, agentSpec{NetnsPath: x.pod.Path, Self: x.self, Peers: []tunnel.Workload{x.peer}, TD: ca.TrustDomain,
			CertPEM: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Certificate[0]})),
			KeyPEM:  string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: key})),
			RootPEM: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Cert.Raw})),
		})
	}
	var pids []int
	if oneAgent {
		js, _ := json.Marshal(specs)
		pids = append(pids, StartBin(tb, bin, "", append([]string{roleEnv + "=agent", "AGENT_SPECS=" + string(js)}, env...)...))
	} else {
		for _, spec := range specs {
			js, _ := json.Marshal(spec)
			pids = append(pids, StartBin(tb, bin, "", append([]string{roleEnv + "=agent", "AGENT_SPEC=" + string(js)}, env...)...))
		}
	}
	nb := open(tb, b)
	ServeApps(func(port uint16) net.Listener { return listen(tb, nb, port) })
	ServeIperf(tb, b.Name)
	client := open(tb, a)
	return Setup{Name: name, Dial: func(port uint16) (net.Conn, error) {
		return client.Dial(context.Background(), netip.Addr{}, netip.AddrPortFrom(b.IP4, port))
	}, CPU: func() float64 {
		var t float64
		for _, p := range pids {
			t += ProcCPU(p)
		}
		return t
	}, Pids: pids, Iperf: &IperfTarget{Netns: a.Name, Addr: netip.AddrPortFrom(b.IP4, PortIperf)}}
}

var _ = filepath.Join
