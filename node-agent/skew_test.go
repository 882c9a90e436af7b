package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netns"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
	"github.com/ambit-mesh/ambit/plugin/redirect"
)

// The version-skew test: a real upgrade from an agent built from an older
// commit to this tree's, and the rollback, with traffic between two
// enrolled dual-stack pods throughout. The other hand-over tests run the
// same binary twice, which cannot show what changed between versions
// (session 17's link-local refusal, for one).
//
// It needs an older agent binary: AMBIT_SKEW_OLD_AGENT names it (for
// session 16's final, `git worktree add /tmp/old 2d1ea35 && cd /tmp/old
// && go build -o /tmp/ambit-agent-s16 ./node-agent`). It is a benchmark
// run by hand, as the node-death measurements are (make test never runs
// it): building an old commit needs the git history, which a source
// tarball lacks, and two minutes per engine is too long for make test.
//
//	AMBIT_SKEW_OLD_AGENT=/tmp/ambit-agent-s16 go test ./node-agent \
//	  -run '^$' -bench UpgradeAcrossVersions -benchtime 1x -v
//
// (AMBIT_SKEW_RULE_CHECK sets both agents' ruleCheckInterval.) What this
// tree's agent must do at the hand-over is held by
// TestRulesVerifiedWhenTheOtherAgentGoes, which make test runs.

// skewPod is a pod netns on the node's bridge, with an IPv4 and an IPv6
// address (the ADD's IPs, as a dual-stack cluster gives them).
type skewPod struct {
	name, uid, ns string
	v4, v6        string
}

func (p *skewPod) request(op cniproto.Op) *cniproto.Request {
	// Version 2: what both agents serve (version 3 only adds the
	// network's name, which an agent of before session 18 refuses).
	return &cniproto.Request{Version: 2, Op: op,
		Pod: cniproto.Pod{Namespace: "apps", Name: p.name, UID: p.uid, ContainerID: "cid-" + p.uid,
			Netns: "/var/run/netns/" + p.ns, IPs: []netip.Prefix{
				netip.MustParsePrefix(p.v4 + "/24"), netip.MustParsePrefix(p.v6 + "/64")}}}
}

// skewNode is the node's netns with a bridge the pods hang on, and a
// bridge-family counter of what crosses it: TCP to or from the app's
// port is plaintext on the wire, a SYN to 15008 is an HBONE connection.
type skewNode struct {
	ns   string
	pods []*skewPod
}

func newSkewNode(t testing.TB) *skewNode {
	t.Helper()
	n := &skewNode{ns: addNetns(t, "amb-sk-n")}
	sh(t, "ip", "-n", n.ns, "link", "add", "br0", "type", "bridge")
	sh(t, "ip", "-n", n.ns, "link", "set", "br0", "up")
	sh(t, "ip", "-n", n.ns, "addr", "add", "10.74.60.1/24", "dev", "br0")
	sh(t, "ip", "-n", n.ns, "addr", "add", "fd74:60::1/64", "dev", "br0", "nodad")
	rules := `table bridge skew {
	counter plain {
	}
	counter hbone {
	}
	counter hbonesyn {
	}
	chain count {
		type filter hook forward priority 0; policy accept;
		tcp dport 8080 counter name "plain"
		tcp sport 8080 counter name "plain"
		tcp dport 15008 counter name "hbone"
		tcp dport 15008 tcp flags & (syn | ack) == syn counter name "hbonesyn"
	}
}
`
	cmd := exec.Command("ip", "netns", "exec", n.ns, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("bridge counters: %v\n%s", err, out)
	}
	return n
}

func (n *skewNode) addPod(t testing.TB, name string, host int) *skewPod {
	t.Helper()
	p := &skewPod{name: name, uid: "uid-" + name + "-" + rnd(), ns: addNetns(t, "amb-sk-p"),
		v4: fmt.Sprintf("10.74.60.%d", host), v6: fmt.Sprintf("fd74:60::%d", host)}
	a, b := "ska"+rnd(), "skb"+rnd()
	sh(t, "ip", "link", "add", a, "netns", p.ns, "type", "veth", "peer", "name", b, "netns", n.ns)
	sh(t, "ip", "-n", n.ns, "link", "set", b, "master", "br0", "up")
	sh(t, "ip", "-n", p.ns, "link", "set", a, "name", "eth0")
	sh(t, "ip", "-n", p.ns, "addr", "add", p.v4+"/24", "dev", "eth0")
	sh(t, "ip", "-n", p.ns, "addr", "add", p.v6+"/64", "dev", "eth0", "nodad")
	sh(t, "ip", "-n", p.ns, "link", "set", "eth0", "up")
	n.pods = append(n.pods, p)
	return p
}

// counter reads one of the bridge's counters (packets).
func (n *skewNode) counter(t testing.TB, name string) int {
	t.Helper()
	out := sh(t, "ip", "netns", "exec", n.ns, "nft", "list", "counter", "bridge", "skew", name)
	m := regexp.MustCompile(`packets (\d+)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("counter %s: %s", name, out)
	}
	v, _ := strconv.Atoi(m[1])
	return v
}

// skewAgent is one agent process with its own config (its own health
// port, so its metrics are its own) on the shared state dir; its log is
// kept for the error-level count.
type skewAgent struct {
	name, bin, cfg, file, health string
	cmd                          *exec.Cmd
	log                          *testenv.Buffer
	exited                       chan struct{}
}

func startSkewAgent(t testing.TB, nodeNS, dir, base, name, bin string, port int) *skewAgent {
	t.Helper()
	a := &skewAgent{name: name, bin: bin, file: filepath.Join(dir, name+".instance"),
		health: "127.0.0.1:" + strconv.Itoa(port), log: &testenv.Buffer{}, exited: make(chan struct{})}
	a.cfg = filepath.Join(dir, name+".yaml")
	if err := os.WriteFile(a.cfg, []byte(strings.Replace(base, "healthAddr: X", "healthAddr: "+a.health, 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	a.cmd = exec.Command("nsenter", "--net=/var/run/netns/"+nodeNS, bin, "run", "-config", a.cfg, "--instance-file", a.file)
	a.cmd.Stderr = a.log
	if err := a.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if a.running() {
			a.cmd.Process.Kill()
			<-a.exited
		}
	})
	go func() { a.cmd.Wait(); close(a.exited) }()
	eventually(t, 60*time.Second, name+" agent ready", func() bool {
		return exec.Command("nsenter", "--net=/var/run/netns/"+nodeNS, bin, "probe", "-config", a.cfg, "--instance-file", a.file).Run() == nil
	})
	return a
}

func (a *skewAgent) running() bool {
	select {
	case <-a.exited:
		return false
	default:
		return true
	}
}

// metric sums the samples of name on the agent's own /metrics.
func (a *skewAgent) metric(t testing.TB, nodeNS, name string) int {
	t.Helper()
	var body string
	inNamedNetns(t, nodeNS, func() error {
		c, err := net.DialTimeout("tcp", a.health, 2*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		c.Write([]byte("GET /metrics HTTP/1.0\r\n\r\n"))
		b, _ := io.ReadAll(c)
		body = string(b)
		return nil
	})
	sum := 0
	for _, l := range strings.Split(body, "\n") {
		if strings.HasPrefix(l, name+" ") || strings.HasPrefix(l, name+"{") {
			f := strings.Fields(l)
			v, _ := strconv.ParseFloat(f[len(f)-1], 64)
			sum += int(v)
		}
	}
	return sum
}

// logLines are the agent's log lines at level (text format: "level=ERROR");
// with AMBIT_SKEW_LOGS set, the whole log is also written there.
func (a *skewAgent) logLines(t testing.TB, level string) []string {
	if d := os.Getenv("AMBIT_SKEW_LOGS"); d != "" {
		os.WriteFile(filepath.Join(d, t.Name()[strings.LastIndex(t.Name(), "/")+1:]+"-"+a.name+".log"), []byte(a.log.String()), 0o644)
	}
	var out []string
	for _, l := range strings.Split(a.log.String(), "\n") {
		if strings.Contains(l, "level="+level) {
			out = append(out, l)
		}
	}
	return out
}

// skewTally counts the client's connections of one phase.
type skewTally struct {
	ok, refused, reset, timeout, other atomic.Int64
	mu                                 sync.Mutex
	samples                            []string
}

func (s *skewTally) record(err error) {
	switch {
	case err == nil:
		s.ok.Add(1)
		return
	case errors.Is(err, syscall.ECONNREFUSED):
		s.refused.Add(1)
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		s.reset.Add(1)
	case errors.Is(err, os.ErrDeadlineExceeded):
		s.timeout.Add(1)
	default:
		s.other.Add(1)
	}
	s.mu.Lock()
	if len(s.samples) < 5 {
		s.samples = append(s.samples, err.Error())
	}
	s.mu.Unlock()
}

func (s *skewTally) failed() int64 {
	return s.refused.Load() + s.reset.Load() + s.timeout.Load() + s.other.Load()
}

func (s *skewTally) String() string {
	return fmt.Sprintf("ok %d, failed %d (refused %d, reset %d, timeout %d, other %d) %q",
		s.ok.Load(), s.failed(), s.refused.Load(), s.reset.Load(), s.timeout.Load(), s.other.Load(), s.samples)
}

// exchange is one short connection: the server's greeting, a line echoed.
func exchange(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 3*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	r := bufio.NewReader(c)
	if line, err := r.ReadString('\n'); err != nil || line != "hello\n" {
		return fmt.Errorf("greeting %q: %w", line, err)
	}
	if _, err := c.Write([]byte("ping\n")); err != nil {
		return err
	}
	if line, err := r.ReadString('\n'); err != nil || line != "ping\n" {
		return fmt.Errorf("echo %q: %w", line, err)
	}
	return nil
}

// skewTraffic runs from pod a to pod b: short connections back to back,
// alternating IPv4 and IPv6, and one long connection echoing a line every
// 100 ms. A long connection that ends is counted and opened again: the
// drain's end closes it by design (docs/upgrade.md), anything before is a
// failure.
type skewTraffic struct {
	mu        sync.Mutex
	short     *skewTally
	longEnds  []string
	longOK    atomic.Int64
	stop      chan struct{}
	wg        sync.WaitGroup
	phaseName string
}

func startSkewTraffic(t testing.TB, a, b *skewPod) *skewTraffic {
	tr := &skewTraffic{short: &skewTally{}, stop: make(chan struct{})}
	targets := []string{net.JoinHostPort(b.v4, "8080"), net.JoinHostPort(b.v6, "8080")}
	tr.wg.Add(2)
	go func() {
		defer tr.wg.Done()
		inNamedNetnsNoWait(a.ns, func() {
			for i := 0; ; i++ {
				select {
				case <-tr.stop:
					return
				default:
				}
				err := exchange(targets[i%2])
				tr.mu.Lock()
				tr.short.record(err)
				tr.mu.Unlock()
				time.Sleep(5 * time.Millisecond)
			}
		})
	}()
	go func() {
		defer tr.wg.Done()
		inNamedNetnsNoWait(a.ns, func() {
			for {
				select {
				case <-tr.stop:
					return
				default:
				}
				c, err := net.DialTimeout("tcp", targets[0], 3*time.Second)
				if err != nil {
					tr.mu.Lock()
					tr.longEnds = append(tr.longEnds, tr.phaseName+": dial: "+err.Error())
					tr.mu.Unlock()
					time.Sleep(100 * time.Millisecond)
					continue
				}
				opened := time.Now()
				r := bufio.NewReader(c)
				c.SetDeadline(time.Now().Add(5 * time.Second))
				_, err = r.ReadString('\n')
				for err == nil {
					select {
					case <-tr.stop:
						c.Close()
						return
					case <-time.After(100 * time.Millisecond):
					}
					c.SetDeadline(time.Now().Add(5 * time.Second))
					if _, err = c.Write([]byte("long\n")); err == nil {
						var line string
						if line, err = r.ReadString('\n'); err == nil && line != "long\n" {
							err = fmt.Errorf("echo %q", line)
						}
					}
					if err == nil {
						tr.longOK.Add(1)
					}
				}
				c.Close()
				tr.mu.Lock()
				tr.longEnds = append(tr.longEnds, fmt.Sprintf("%s: ended after %s: %v", tr.phaseName, time.Since(opened).Round(100*time.Millisecond), err))
				tr.mu.Unlock()
			}
		})
	}()
	return tr
}

// phase starts a new tally and returns the one that ended.
func (tr *skewTraffic) phase(name string) *skewTally {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	done := tr.short
	tr.short = &skewTally{}
	tr.phaseName = name
	return done
}

func (tr *skewTraffic) end() {
	close(tr.stop)
	tr.wg.Wait()
}

// inNamedNetnsNoWait runs fn on a locked thread in the named netns; the
// thread is never unlocked, so it dies with the goroutine.
func inNamedNetnsNoWait(name string, fn func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtimeLockAndEnter(name)
		fn()
	}()
	<-done
}

// runtimeLockAndEnter locks the goroutine to its thread and moves the
// thread into the named netns (or panics: a test goroutine in the wrong
// netns would measure the wrong pod).
func runtimeLockAndEnter(name string) {
	runtime.LockOSThread()
	h, err := netns.GetFromName(name)
	if err != nil {
		panic(err)
	}
	defer h.Close()
	if err := netns.Set(h); err != nil {
		panic(err)
	}
}

// podRules is what the pod's rule engines hold, for the report and the
// leftover check.
func podRules(t testing.TB, p *skewPod) string {
	t.Helper()
	var b strings.Builder
	for _, argv := range [][]string{{"nft", "list", "ruleset"}, {"iptables-legacy-save"}, {"ip6tables-legacy-save"}} {
		out, _ := exec.Command("ip", append([]string{"netns", "exec", p.ns}, argv...)...).CombinedOutput()
		fmt.Fprintf(&b, "## %s\n%s", strings.Join(argv, " "), out)
	}
	return b.String()
}

// chainInventory names the pod's nftables tables and the iptables-legacy
// chains of ours, per family and table ("ip6/filter:AMBIT_OUTPUT").
func chainInventory(p *skewPod) string {
	var found []string
	out, _ := exec.Command("ip", "netns", "exec", p.ns, "nft", "list", "tables").CombinedOutput()
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if l != "" {
			found = append(found, "nft:"+strings.TrimPrefix(l, "table "))
		}
	}
	for fam, save := range map[string]string{"ip": "iptables-legacy-save", "ip6": "ip6tables-legacy-save"} {
		out, _ := exec.Command("ip", "netns", "exec", p.ns, save).CombinedOutput()
		table := ""
		for _, l := range strings.Split(string(out), "\n") {
			switch {
			case strings.HasPrefix(l, "*"):
				table = l[1:]
			case strings.HasPrefix(l, ":AMBIT"):
				found = append(found, fam+"/"+table+":"+strings.Fields(l[1:])[0])
			}
		}
	}
	sort.Strings(found)
	return strings.Join(found, " ")
}

// linkLocal6Of is p's IPv6 link-local address on eth0, with its zone as
// a client on the same link names it.
func linkLocal6Of(t testing.TB, p *skewPod) string {
	t.Helper()
	out := sh(t, "ip", "-n", p.ns, "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link")
	f := strings.Fields(out)
	for i, w := range f {
		if w == "inet6" && i+1 < len(f) {
			return strings.Split(f[i+1], "/")[0]
		}
	}
	t.Fatalf("no IPv6 link-local address in pod %s: %q", p.name, out)
	return ""
}

// linkLocalDial is what an app in a sees connecting to b's link-local
// address: "refused" (session 17's refusal), "timeout" (earlier agents:
// the captured SYN goes nowhere), or anything else.
func linkLocalDial(t testing.TB, a, b *skewPod) string {
	addr := "[" + linkLocal6Of(t, b) + "%eth0]:8080"
	var res string
	inNamedNetnsNoWait(a.ns, func() {
		start := time.Now()
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		switch {
		case err == nil:
			c.SetReadDeadline(time.Now().Add(2 * time.Second))
			line, rerr := bufio.NewReader(c).ReadString('\n')
			c.Close()
			res = fmt.Sprintf("connected (read %q, %v)", line, rerr)
		case errors.Is(err, syscall.ECONNREFUSED):
			res = "refused in " + time.Since(start).Round(time.Millisecond).String()
		case errors.Is(err, os.ErrDeadlineExceeded):
			res = "timeout"
		default:
			res = err.Error()
		}
	})
	return res
}

func verifyNewSpec(p *skewPod) error { return verifyNetns(p.ns) }

func verifyNetns(name string) error {
	h, err := ns.GetNS("/var/run/netns/" + name)
	if err != nil {
		return err
	}
	defer h.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	return redirect.Verify(ctx, h, redirect.DefaultSpec())
}

// BenchmarkUpgradeAcrossVersions: an upgrade from the older agent to this
// tree's and the rollback, in each rule engine, with connections counted
// per phase (ok, failed, plaintext on the wire) and the pods' rules
// checked after each step.
func BenchmarkUpgradeAcrossVersions(b *testing.B) {
	testenv.RequireRoot(b)
	old := os.Getenv("AMBIT_SKEW_OLD_AGENT")
	if old == "" {
		b.Skip("AMBIT_SKEW_OLD_AGENT unset: it names an agent built from an older commit (2d1ea35 for session 16's; the header of skew_test.go says how)")
	}
	if _, err := os.Stat(old); err != nil {
		b.Fatalf("AMBIT_SKEW_OLD_AGENT: %v", err)
	}
	neu := testenv.Binary(b, "ambit-agent")
	for _, engine := range []string{"nftables", "iptables-legacy"} {
		b.Run(engine, func(b *testing.B) {
			// One upgrade and rollback whatever b.N: a measurement of
			// what the apps see, not of speed (-benchtime 1x).
			upgradeAcrossVersions(b, old, neu, engine)
		})
	}
}

func upgradeAcrossVersions(t testing.TB, oldBin, newBin, engine string) {
	node := newSkewNode(t)
	dir, err := os.MkdirTemp("", "amb-sk-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	inv := filepath.Join(dir, "inventory.yaml")
	os.WriteFile(inv, []byte("namespaces:\n  - name: apps\n    labels: {ambit.dev/dataplane-mode: ambient}\n"), 0o600)
	check := os.Getenv("AMBIT_SKEW_RULE_CHECK")
	if check == "" {
		check = "5s"
	}
	base := "nodeName: n1\ninventoryFile: " + inv + "\nstateDir: " + dir + "\nhealthAddr: X\nhostRules: \"on\"\n" +
		"drainTimeout: 5s\nredirectBackend: " + engine + "\nruleCheckInterval: " + check + "\n"
	socket := filepath.Join(dir, "cni.sock")

	a := node.addPod(t, "a", 2)
	b := node.addPod(t, "b", 3)
	testenv.ServeInNetns(t, b.ns, "[::]:8080", "hello", testenv.Echo)

	o1 := startSkewAgent(t, node.ns, dir, base, "old", oldBin, 15021)
	add := func(p *skewPod, by string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		f, err := os.Open("/var/run/netns/" + p.ns)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		resp, err := cniproto.Call(ctx, socket, p.request(cniproto.OpAdd), f)
		if err != nil || resp.Decision != cniproto.Enroll || resp.Error != "" {
			t.Fatalf("ADD %s by the %s agent: %+v %v", p.name, by, resp, err)
		}
	}
	add(a, "old")
	add(b, "old")
	// Pods created during each surge, enrolled by whichever agent is
	// newest, served by both: c in the upgrade's, d in the rollback's.
	c := node.addPod(t, "c", 4)
	d := node.addPod(t, "d", 5)
	late := []*skewPod{}
	lateOK := func(when string) {
		for _, p := range late {
			for _, to := range []string{b.v4, b.v6} {
				var err error
				inNamedNetnsNoWait(p.ns, func() { err = exchange(net.JoinHostPort(to, "8080")) })
				if err != nil {
					t.Errorf("%s: pod %s → b at %s: %v", when, p.name, to, err)
				}
			}
		}
	}
	plain0, hbone0, syn0 := node.counter(t, "plain"), node.counter(t, "hbone"), node.counter(t, "hbonesyn")
	tr := startSkewTraffic(t, a, b)
	report := func(phase string, tally *skewTally) {
		plain, hbone, syn := node.counter(t, "plain"), node.counter(t, "hbone"), node.counter(t, "hbonesyn")
		t.Logf("%s: short connections %s; on the bridge: plaintext packets %d, HBONE packets %d, new HBONE connections %d",
			phase, tally, plain-plain0, hbone-hbone0, syn-syn0)
		syn0 = syn
		if tally.failed() > 0 {
			t.Errorf("%s: %d short connections failed", phase, tally.failed())
		}
		if plain != plain0 {
			t.Errorf("%s: %d plaintext packets between the pods", phase, plain-plain0)
		}
		if tally.ok.Load() > 0 && hbone-hbone0 < int(tally.ok.Load()) {
			t.Errorf("%s: %d connections went through, but only %d HBONE packets crossed the bridge", phase, tally.ok.Load(), hbone-hbone0)
		}
		plain0, hbone0 = plain, hbone
	}
	rules := func(when string) {
		t.Logf("%s: a → b's IPv6 link-local address: %s", when, linkLocalDial(t, a, b))
		lateOK(when)
		for _, p := range append([]*skewPod{a, b}, late...) {
			t.Logf("%s: pod %s rules: %s; Verify against this tree's spec: %v", when, p.name, chainInventory(p), verifyNewSpec(p))
			if os.Getenv("AMBIT_SKEW_DUMP") != "" {
				t.Logf("%s", podRules(t, p))
			}
		}
	}

	tr.phase("old alone")
	time.Sleep(3 * time.Second)
	report("old alone", tr.phase("surge"))
	rules("old alone")

	// Upgrade: the new agent beside the old one, then the old one stops.
	n1 := startSkewAgent(t, node.ns, dir, base, "new", newBin, 15022)
	add(c, "new")
	late = append(late, c)
	time.Sleep(12 * time.Second) // more than two rule checks of each
	t.Logf("surge: new agent's repairs %d", n1.metric(t, node.ns, "ambit_agent_redirect_repairs_total"))
	rules("surge")
	o1.cmd.Process.Signal(syscall.SIGTERM)
	report("surge", tr.phase("old draining"))
	select {
	case <-o1.exited:
	case <-time.After(20 * time.Second):
		t.Fatal("old agent did not exit within 20 s of SIGTERM")
	}
	report("old draining", tr.phase("new alone"))
	// The new agent verifies every pod once it is alone: what the old
	// one's checks took out is back within seconds, not at its next
	// periodic check.
	exited := time.Now()
	eventually(t, 5*time.Second, "every pod's rules as this tree's spec says, the old agent gone", func() bool {
		return verifyNewSpec(a) == nil && verifyNewSpec(b) == nil && verifyNewSpec(c) == nil
	})
	t.Logf("new alone: every pod's rules verified %s after the old agent's exit", time.Since(exited).Round(10*time.Millisecond))
	repairsAtStop := n1.metric(t, node.ns, "ambit_agent_redirect_repairs_total")
	time.Sleep(12 * time.Second)
	report("new alone", tr.phase("rollback surge"))
	repairs := n1.metric(t, node.ns, "ambit_agent_redirect_repairs_total")
	t.Logf("new alone: new agent's repairs %d once its rules were verified alone, %d 12 s later", repairsAtStop, repairs)
	if repairs != repairsAtStop {
		t.Errorf("the new agent alone kept repairing: %d → %d", repairsAtStop, repairs)
	}
	for _, p := range []*skewPod{a, b, c} {
		if err := verifyNewSpec(p); err != nil {
			t.Errorf("new agent alone: pod %s: %v", p.name, err)
		}
	}
	rules("new alone")
	t.Logf("old agent (upgrade): %d warnings", len(o1.logLines(t, "WARN")))
	for _, l := range o1.logLines(t, "ERROR") {
		t.Logf("old agent (upgrade) error: %s", l)
	}

	// Rollback: the old binary, started last, is the newer agent now.
	o2 := startSkewAgent(t, node.ns, dir, base, "old2", oldBin, 15021)
	add(d, "old (rollback)")
	late = append(late, d)
	time.Sleep(12 * time.Second)
	rules("rollback surge")
	n1.cmd.Process.Signal(syscall.SIGTERM)
	report("rollback surge", tr.phase("new draining"))
	select {
	case <-n1.exited:
	case <-time.After(20 * time.Second):
		t.Fatal("new agent did not exit within 20 s of SIGTERM")
	}
	report("new draining", tr.phase("old alone again"))
	time.Sleep(12 * time.Second)
	report("old alone again", tr.phase("end"))
	rules("old alone again")
	tr.end()
	t.Logf("long connection: %d echoes; ends: %q", tr.longOK.Load(), tr.longEnds)
	for _, ag := range []*skewAgent{n1, o2} {
		t.Logf("%s agent: %d warnings", ag.name, len(ag.logLines(t, "WARN")))
		for _, l := range ag.logLines(t, "ERROR") {
			t.Logf("%s agent error: %s", ag.name, l)
		}
	}
	o2.cmd.Process.Signal(syscall.SIGTERM)
	<-o2.exited
}

// TestRulesVerifiedWhenTheOtherAgentGoes: during a surge an older agent's
// checks put its own version's rules back in the pods (one before
// session 17 takes the link-local refusal out, BenchmarkUpgradeAcrossVersions
// shows it; it also does so at once in a pod the newer agent enrolled,
// as it adopts the record). Once the older agent has exited nothing else
// writes the rules, and the remaining agent must verify them then, not
// at its next periodic check (ruleCheckInterval, 1 m by default: here
// 1 h, so only the hand-over can be what repairs). The older agent's
// revert is reproduced with this tree's agents by taking the refusal's
// chain out by hand while both run.
func TestRulesVerifiedWhenTheOtherAgentGoes(t *testing.T) {
	n := newNode(t, "drainTimeout: 1s\nruleCheckInterval: 1h\nredirectBackend: nftables\n")
	old := n.start("old")
	pod := newTestPod(t, "a", "10.74.41", false)
	pod.add(t, n.socket())
	neu := n.start("new")
	if err := verifyNetns(pod.ns); err != nil {
		t.Fatalf("before the revert: %v", err)
	}
	sh(t, "ip", "netns", "exec", pod.ns, "nft", "delete", "chain", "inet", "ambit", "filter-output")
	if verifyNetns(pod.ns) == nil {
		t.Fatal("the revert by hand changed nothing Verify sees: the test proves nothing")
	}
	old.stop(t, 10*time.Second)
	start := time.Now()
	for err := verifyNetns(pod.ns); err != nil; err = verifyNetns(pod.ns) {
		if time.Since(start) > 10*time.Second {
			t.Fatalf("the older agent exited %s ago and the remaining agent has not repaired the pod's rules (its next periodic check is in 1 h): %v",
				time.Since(start).Round(time.Second), err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("the pod's rules repaired %s after the older agent's exit", time.Since(start).Round(10*time.Millisecond))
	neu.stop(t, 10*time.Second)
}
