package agent

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
)

// debugSocket is where a helper agent process serves /metrics and
// /debug/pprof/profile (in its directory).
const debugSocket = "debug.sock"

var (
	idleWindow = flag.Duration("agent.idle-window", time.Minute,
		"BenchmarkAgentIdleCPU: how long each agent is watched (a multiple of the 5s audit interval)")
	idleProfile = flag.String("agent.idle-profile", "",
		"BenchmarkAgentIdleCPU: after the measurements, write a CPU profile of the audited agent over one more window to <this>-pods=N.pprof")
)

// debugGet fetches path from the helper agent in dir.
func debugGet(t testing.TB, dir, path string) []byte {
	t.Helper()
	sock := filepath.Join(dir, debugSocket)
	c := http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}}}
	resp, err := c.Get("http://agent" + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s %v", path, resp.Status, err)
	}
	return b
}

// ruleChecks reads the agent's ambit_agent_rule_check_duration_seconds:
// passes completed and their summed wall time.
func ruleChecks(t testing.TB, dir string) (passes int, wall float64) {
	t.Helper()
	sc := bufio.NewScanner(strings.NewReader(string(debugGet(t, dir, "/metrics"))))
	found := 0
	for sc.Scan() {
		name, v, ok := strings.Cut(sc.Text(), " ")
		if !ok {
			continue
		}
		switch name {
		case "ambit_agent_rule_check_duration_seconds_count":
			passes, _ = strconv.Atoi(v)
			found++
		case "ambit_agent_rule_check_duration_seconds_sum":
			wall, _ = strconv.ParseFloat(v, 64)
			found++
		}
	}
	if found != 2 {
		t.Fatal("agent's /metrics has no ambit_agent_rule_check_duration_seconds")
	}
	return passes, wall
}

func loadavg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// BenchmarkAgentIdleCPU reports what an agent with 0, 100 and 1,000
// enrolled pods and no traffic costs in CPU, and what one pass of the
// periodic rule check (ruleCheckInterval) costs.
//
// The agent is its own process (the test echo tunnel, the inventory
// source: no API watch, no certificates, no HBONE connections to keep
// alive). Its pods are enrolled like the plugin does (ADD, then the rules
// installed), then it is restarted three times on them: with the check
// off, every 5 s, and every 5 s doing each check in full (redirect.Verify,
// what the agent did before redirect.Recheck: the baseline, same run).
// Each run is watched for -agent.idle-window after its first pass (the
// one after re-adoption, which runs in all three), CPU read from the
// kernel's CPU clock of the process. A pass costs the difference to the
// run without checks divided by the passes completed (from the agent's
// /metrics): a window a multiple of the interval holds whole passes (the
// one cut at each end make one).
func BenchmarkAgentIdleCPU(b *testing.B) {
	testenv.RequireRoot(b)
	const every = 5 * time.Second
	type row struct {
		pods              int
		idleMin, checkMin float64 // CPU-ms per minute
		pass, passWall    float64 // CPU-ms, wall-ms per pass
		full              float64 // CPU-ms per full pass (baseline)
		podUs, fullPodUs  float64 // CPU-µs per pod
		passes, fullN     int
		corePct           float64
		load              string
	}
	var rows []row
	for _, n := range []int{0, 100, 1000} {
		b.Run(fmt.Sprintf("pods=%d", n), func(b *testing.B) {
			for range b.N {
				dir, h := procDir(b)
				p := startProcEnv(b, dir, "AMBIT_AGENT_HELPER_RULECHECK=0s")
				for i := range n {
					ip := fmt.Sprintf("10.73.%d.%d", i/250, i%250+2)
					pod := newNetns(b, ip+"/16")
					enrollLikePlugin(b, h, fmt.Sprintf("web-%d", i), pod, ip+"/16")
				}
				// watch restarts the agent with env and returns its CPU
				// seconds, wall seconds and completed passes (count,
				// summed wall seconds) over the window.
				watch := func(env ...string) (cpu, wall float64, passes int, passWall float64) {
					p.kill()
					p = startProcEnv(b, dir, env...)
					// The pass over the re-adopted pods, then a moment
					// for what it left (garbage) to settle.
					eventually(b, "the pass after re-adoption", func() bool {
						k, _ := ruleChecks(b, dir)
						return k >= 1
					})
					time.Sleep(2 * time.Second)
					k0, w0 := ruleChecks(b, dir)
					c0, t0 := p.cpuSeconds(b), time.Now()
					time.Sleep(*idleWindow)
					c1, t1 := p.cpuSeconds(b), time.Now()
					k1, w1 := ruleChecks(b, dir)
					return c1 - c0, t1.Sub(t0).Seconds(), k1 - k0, w1 - w0
				}
				load := loadavg()
				check := "AMBIT_AGENT_HELPER_RULECHECK=" + every.String()
				offCPU, offWall, _, _ := watch("AMBIT_AGENT_HELPER_RULECHECK=0s")
				fullCPU, fullWall, fullN, _ := watch(check, "AMBIT_AGENT_HELPER_FULLCHECK=1")
				onCPU, onWall, passes, passWall := watch(check)
				if *idleProfile != "" {
					prof := debugGet(b, dir, fmt.Sprintf("/debug/pprof/profile?seconds=%d", int(idleWindow.Seconds())))
					if err := os.WriteFile(fmt.Sprintf("%s-pods=%d.pprof", *idleProfile, n), prof, 0o644); err != nil {
						b.Fatal(err)
					}
				}
				p.kill()
				r := row{pods: n, passes: passes, fullN: fullN, load: load + " → " + loadavg()}
				idleRate := offCPU / offWall // CPU-s per s
				r.idleMin = idleRate * 60e3
				r.checkMin = onCPU / onWall * 60e3
				if passes > 0 {
					r.pass = (onCPU - idleRate*onWall) / float64(passes) * 1e3
					r.passWall = passWall / float64(passes) * 1e3
				}
				if fullN > 0 {
					r.full = (fullCPU - idleRate*fullWall) / float64(fullN) * 1e3
				}
				if n > 0 {
					r.podUs = r.pass * 1e3 / float64(n)
					r.fullPodUs = r.full * 1e3 / float64(n)
				}
				// At the default ruleCheckInterval (1 m): idle plus one
				// pass a minute, in percent of one core.
				r.corePct = (r.idleMin + r.pass) / 60e3 * 100
				b.ReportMetric(r.idleMin, "cpu-ms/min-idle")
				b.ReportMetric(r.checkMin, "cpu-ms/min-check-5s")
				b.ReportMetric(r.pass, "cpu-ms/pass")
				b.ReportMetric(r.full, "cpu-ms/full-pass")
				b.ReportMetric(r.passWall, "wall-ms/pass")
				b.ReportMetric(float64(passes), "passes")
				if n > 0 {
					b.ReportMetric(r.podUs, "cpu-µs/pod-check")
					b.ReportMetric(r.pass/r.full, "pass/full-pass")
				}
				b.ReportMetric(r.corePct, "%core-at-1m")
				rows = append(rows, r)
			}
		})
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "\nidle agent CPU (window %s; check every %s for the per-pass cost; full = every pod checked with redirect.Verify, same run)\n", *idleWindow, every)
	fmt.Fprintf(&sb, "%6s %12s %16s %12s %12s %12s %12s %12s %11s  %s\n", "pods", "idle ms/min", "check-5s ms/min", "pass CPU ms", "pass wall ms", "µs/pod", "full µs/pod", "passes/full", "%core @1m", "load avg (start → end)")
	for _, r := range rows {
		fmt.Fprintf(&sb, "%6d %12.1f %16.1f %12.1f %12.1f %12.1f %12.1f %12s %11.3f  %s\n", r.pods, r.idleMin, r.checkMin, r.pass, r.passWall, r.podUs, r.fullPodUs, fmt.Sprintf("%d/%d", r.passes, r.fullN), r.corePct, r.load)
	}
	fmt.Print(sb.String())
}
