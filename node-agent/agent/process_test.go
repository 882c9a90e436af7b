package agent

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	httppprof "net/http/pprof"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sys/unix"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/inventory"
	"github.com/ambit-mesh/ambit/node-agent/keeper"
	"github.com/ambit-mesh/ambit/plugin/redirect"
)

// The test binary doubles as an agent process (with the echo tunnel) when
// AMBIT_AGENT_HELPER_DIR is set, so restart tests can kill -9 a real
// process and start another.
func TestMain(m *testing.M) {
	if dir := os.Getenv("AMBIT_AGENT_HELPER_DIR"); dir != "" {
		os.Exit(helperMain(dir))
	}
	os.Exit(testenv.Main(m))
}

func helperMain(dir string) int {
	invPath := filepath.Join(dir, "inventory.yaml")
	cfg := testConfig(dir, invPath)
	if err := cfg.Finish(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	src, err := inventory.Load(inventory.Options{Path: invPath, NodeName: cfg.NodeName, EnrollLabel: cfg.EnrollLabel})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	if v := os.Getenv("AMBIT_AGENT_HELPER_RULECHECK"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			fmt.Fprintln(os.Stderr, "AMBIT_AGENT_HELPER_RULECHECK:", err)
			return 2
		}
		cfg.RuleCheckInterval.Duration = d
	}
	reg := prometheus.NewRegistry()
	o := Options{Config: cfg, View: src, Status: src, Tunnel: &echoTunnel{}, Logger: quietLogger(), Registerer: reg}
	if os.Getenv("AMBIT_AGENT_HELPER_FULLCHECK") != "" {
		b, err := redirect.ParseBackend(cfg.RedirectBackend)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
		o.Rules = fullCheck{Rules{Backend: b}}
	}
	if path := os.Getenv("AMBIT_AGENT_HELPER_KEEPER"); path != "" {
		k, err := keeper.Dial(path)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
		o.Keeper = k
	}
	a, err := New(o)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	// /metrics and /debug/pprof/ on a socket in dir, for benchmarks that
	// watch the process (nothing calls it unless a benchmark does).
	if l, err := net.Listen("unix", filepath.Join(dir, debugSocket)); err == nil {
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		mux.HandleFunc("/debug/pprof/profile", httppprof.Profile)
		go http.Serve(l, mux)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	var prof *os.File
	if p := os.Getenv("AMBIT_AGENT_HELPER_CPUPROFILE"); p != "" {
		if f, err := os.Create(p); err == nil {
			prof = f
			pprof.StartCPUProfile(f)
		}
	}
	go func() {
		<-a.Ready()
		if prof != nil {
			pprof.StopCPUProfile()
			prof.Close()
		}
		fmt.Println("ready")
	}()
	if err := a.Run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// fullCheck is Rules with every periodic check done in full
// (redirect.Verify), as the agent did before redirect.Recheck: the
// baseline of BenchmarkAgentIdleCPU.
type fullCheck struct{ Rules }

func (f fullCheck) Recheck(ctx context.Context, netns *os.File, spec redirect.Spec, _ *redirect.Checked) error {
	return f.Verify(ctx, netns, spec)
}

// agentProc is an agent running as its own process.
type agentProc struct {
	cmd   *exec.Cmd
	ready time.Duration // from start to ready
}

func startProc(t testing.TB, dir string) *agentProc {
	t.Helper()
	return startProcEnv(t, dir)
}

// startProcEnv is startProc with extra environment (KEY=value), e.g.
// AMBIT_AGENT_HELPER_RULECHECK=5s.
// containerLike, among startProcEnv's env, runs the agent process the
// way a container runtime would as far as the agent can tell: /proc/sys
// read-only.
const containerLike = "AMBIT_AGENT_HELPER_CONTAINER=1"

func startProcEnv(t testing.TB, dir string, env ...string) *agentProc {
	t.Helper()
	os.Remove(filepath.Join(dir, debugSocket)) // left by a killed agent
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	if slices.Contains(env, containerLike) {
		// /proc/sys read-only, as container runtimes mount it for an
		// unprivileged container like the agent's.
		cmd = exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c",
			`mount -o bind,ro /proc/sys /proc/sys && exec "$0" -test.run='^$'`, os.Args[0])
	}
	cmd.Env = append(append(os.Environ(), "AMBIT_AGENT_HELPER_DIR="+dir), env...)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &agentProc{cmd: cmd}
	t.Cleanup(func() { p.kill() })
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(out).ReadString('\n')
		line <- s
	}()
	select {
	case s := <-line:
		if strings.TrimSpace(s) != "ready" {
			t.Fatalf("agent process said %q", s)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("agent process not ready within 60s")
	}
	p.ready = time.Since(start)
	return p
}

func (p *agentProc) kill() {
	if p.cmd.ProcessState == nil {
		p.cmd.Process.Kill()
		p.cmd.Wait()
	}
}

// cpuSeconds is the process's user+system CPU time so far, every thread
// (exited ones too). It reads the kernel's CPU-time clock of the process
// (clock_getcpuclockid(3): MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)),
// exact to the nanosecond; /proc/<pid>/stat counts 10 ms ticks, too coarse
// for a mostly idle agent, and is the fallback.
func (p *agentProc) cpuSeconds(t testing.TB) float64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(int32(^p.cmd.Process.Pid<<3|2), &ts); err == nil {
		return float64(ts.Nano()) / 1e9
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	// Fields after the parenthesised command: state is field 3, utime 14, stime 15.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	ut, _ := strconv.Atoi(f[11])
	st, _ := strconv.Atoi(f[12])
	return float64(ut+st) / 100 // USER_HZ
}

func (p *agentProc) rssKB(t testing.TB) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
			v, _ := strconv.Atoi(f[1])
			return v
		}
	}
	t.Fatal("no VmRSS")
	return 0
}

func procDir(t testing.TB) (string, *harness) {
	dir, err := os.MkdirTemp("", "amb-agt-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.WriteFile(filepath.Join(dir, "inventory.yaml"), []byte(invAmbient), 0o600); err != nil {
		t.Fatal(err)
	}
	// A client-side harness (no agent) for calls.
	return dir, &harness{t: t, dir: dir, sock: filepath.Join(dir, "cni.sock")}
}

func TestKill9Recovery(t *testing.T) {
	testenv.RequireRoot(t)
	dir, h := procDir(t)
	p := startProc(t, dir)
	const n = 50
	pods := enrollPods(t, h, n, "10.70.0")
	if c, line, err := dialFrom(t, pods[0], "127.0.0.1:15001"); err != nil || line != "captured:15001" {
		t.Fatalf("before kill: %q %v", line, err)
	} else {
		c.Close()
	}
	p.cmd.Process.Signal(syscall.SIGKILL)
	p.cmd.Wait()
	// Agent gone: every enrolled pod's capture is refused, never plaintext.
	for i, pod := range pods {
		if _, _, err := dialFrom(t, pod, "127.0.0.1:15001"); err == nil {
			t.Fatalf("pod %d still has a listener after kill -9", i)
		}
	}
	startProc(t, dir)
	for i, pod := range pods {
		c, line, err := dialFrom(t, pod, "127.0.0.1:15001")
		if err != nil || line != "captured:15001" {
			t.Fatalf("pod %d not re-adopted after kill -9: %q %v", i, line, err)
		}
		c.Close()
	}
}

// TestKill9WithKeeper: with the keeper holding copies of the pods'
// listeners, a kill -9 of the agent refuses nothing: a connection made
// while no agent runs completes its handshake, waits in the kept
// listener's queue, and is served by the restarted agent (its queue moved
// to the new listener when the keeper let the old one go). What the dead
// agent left for pods that are gone is closed once the new one is ready.
func TestKill9WithKeeper(t *testing.T) {
	testenv.RequireRoot(t)
	dir, h := procDir(t)
	kpath, _ := startKeeper(t, dir)
	env := []string{"AMBIT_AGENT_HELPER_KEEPER=" + kpath, containerLike}
	p := startProcEnv(t, dir, env...)
	const n = 5
	pods := enrollPods(t, h, n, "10.74.0")
	// Another node's agent reaches pod 0's 15008 over a link, as in a
	// cluster (the others are dialled on loopback).
	peer := newNetns(t)
	link(t, peer, pods[0], "10.99.0.1/24", "10.99.0.2/24")
	run(t, "ip", "-n", peer.name, "route", "add", "10.74.0.0/24", "via", "10.99.0.2")
	// A pod deleted while the agent is down: its kept listeners must not
	// outlive the next agent's start.
	gone := newNetns(t, "10.74.1.2/24")
	enrollLikePlugin(t, h, "gone", gone, "10.74.1.2/24")
	kc, err := keeper.Dial(kpath)
	if err != nil {
		t.Fatal(err)
	}
	if e, fds, err := kc.Count(); err != nil || e != n+1 || fds != 3*(n+1) {
		t.Fatalf("keeper holds %d entries, %d sockets (%v); want %d, %d", e, fds, err, n+1, 3*(n+1))
	}

	p.cmd.Process.Signal(syscall.SIGKILL)
	p.cmd.Wait()
	// The runtime removes "gone"'s netns meanwhile (the kept sockets
	// still hold it: only the prune can free it).
	gone.file.Close()
	if out, err := exec.Command("ip", "netns", "delete", gone.name).CombinedOutput(); err != nil {
		t.Fatalf("deleting the netns: %v %s", err, out)
	}
	// No agent: the handshake completes anyway, and the connection waits
	// with what the client sent (a TLS ClientHello, say) in its queue.
	// When the restarted agent's listeners replace the kept ones, the
	// queue moves to them: tcp_migrate_req, which the agent sets in every
	// pod even though its /proc/sys is read-only (containerLike).
	type waiter struct {
		c    net.Conn
		want string
	}
	var waiting []waiter
	dial := func(in *testNetns, addr, want string) {
		inNetns(t, in, func() error {
			var c net.Conn
			c, err = net.DialTimeout("tcp", addr, 2*time.Second)
			if err == nil {
				_, err = c.Write([]byte("hello\n"))
				waiting = append(waiting, waiter{c, want})
				t.Cleanup(func() { c.Close() })
			}
			return nil
		})
		if err != nil {
			t.Fatalf("%s: connection refused while the agent was down: %v", addr, err)
		}
	}
	for _, pod := range pods {
		dial(pod, "127.0.0.1:15001", "captured:15001")
	}
	dial(peer, "10.74.0.2:15008", "captured:15008")
	startProcEnv(t, dir, env...)
	for i, w := range waiting {
		w.c.SetReadDeadline(time.Now().Add(5 * time.Second))
		line, err := bufio.NewReader(w.c).ReadString('\n')
		if err != nil || strings.TrimSpace(line) != w.want {
			t.Fatalf("connection %d made during the outage: %q %v, want %q (reset instead of handed to the new listener?)", i, line, err, w.want)
		}
	}
	for i, pod := range pods {
		c, line, err := dialFrom(t, pod, "127.0.0.1:15001")
		if err != nil || line != "captured:15001" {
			t.Fatalf("pod %d after the restart: %q %v", i, line, err)
		}
		c.Close()
	}
	// The deleted pod's sockets went with the prune.
	eventually(t, "the deleted pod's kept sockets closed", func() bool {
		e, fds, err := kc.Count()
		return err == nil && e == n && fds == 3*n
	})
}

// BenchmarkAgentRSS reports the agent process's resident memory with 0,
// 100 and 1,000 enrolled pods (netns made by the bench; the tunnel is the
// test echo tunnel, three accept loops per pod like the real one).
func BenchmarkAgentRSS(b *testing.B) {
	testenv.RequireRoot(b)
	var base int
	for _, n := range []int{0, 100, 1000} {
		b.Run(fmt.Sprintf("pods=%d", n), func(b *testing.B) {
			for range b.N {
				dir, h := procDir(b)
				p := startProc(b, dir)
				for i := range n {
					ip := fmt.Sprintf("10.71.%d.%d", i/250, i%250+2)
					pod := newNetns(b, ip+"/16")
					resp, err := h.call("add", "apps", fmt.Sprintf("web-%d", i), fmt.Sprintf("cid-%d", i), pod, ip+"/16")
					if err != nil || resp.Error != "" {
						b.Fatalf("ADD %d: %+v %v", i, resp, err)
					}
				}
				rss := p.rssKB(b)
				if n == 0 {
					base = rss
				}
				b.ReportMetric(float64(rss)/1024, "MB-rss")
				if n > 0 && base > 0 {
					b.ReportMetric(float64(rss-base)/float64(n), "KB/pod")
				}
				p.kill()
			}
		})
	}
}

// BenchmarkReadopt reports how long a restarted agent (after kill -9)
// takes from exec to ready with 1,000 enrolled pods to re-adopt.
func BenchmarkReadopt(b *testing.B) {
	testenv.RequireRoot(b)
	const n = 1000
	dir, h := procDir(b)
	p := startProc(b, dir)
	empty, emptyCPU := p.ready, p.cpuSeconds(b)
	for i := range n {
		ip := fmt.Sprintf("10.72.%d.%d", i/250, i%250+2)
		pod := newNetns(b, ip+"/16")
		enrollLikePlugin(b, h, fmt.Sprintf("web-%d", i), pod, ip+"/16")
	}
	b.ResetTimer()
	for range b.N {
		p.cmd.Process.Signal(syscall.SIGKILL)
		p.cmd.Wait()
		p = startProc(b, dir)
	}
	b.StopTimer()
	// Wall time depends on what else the machine runs; CPU time does not.
	b.ReportMetric(p.cpuSeconds(b), "cpu-s-to-ready/1000-pods")
	b.ReportMetric(p.ready.Seconds(), "s-to-ready/1000-pods")
	b.ReportMetric(empty.Seconds(), "s-to-ready/0-pods")
	b.ReportMetric(emptyCPU, "cpu-s-to-ready/0-pods")
}
