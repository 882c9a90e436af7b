package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/plugin/redirect"
	"golang.org/x/sys/unix"
)

// BenchmarkChainAdd measures ADD of the real chain (bridge + host-local +
// portmap) with and without ambit-cni appended, benchPods pods each,
// interleaved so both see the same machine load; the responder decides
// instantly and installs the rules as the agent does, so the difference is
// the plugin's cost (exec, config, agent round trip) plus the rules, and
// "added-without-agent" takes the responder's time out.
//
// Reported per chain: wall-clock p50/p99, the added p50/p99 and the p99
// ratio, and the CPU time (user+sys) the chain's processes used per ADD,
// from RUSAGE_CHILDREN. Wall time on a shared machine is mostly waiting
// for a CPU; CPU time is what the plugin really costs a node.
func BenchmarkChainAdd(b *testing.B) {
	testenv.RequireRoot(b)
	const benchPods = 200
	set := testenv.PluginSets(b)[1]
	agent := newResponder(b, "mesh")
	plain := newNode(b, set, nodeOpts{})
	mesh := newNode(b, set, nodeOpts{backend: redirect.Nftables, withAmbit: true, socket: agent.socket})
	// One sandbox netns per chain, reused: ADD, DEL, new container ID.
	// Creating and destroying hundreds of namespaces would measure the
	// kernel's netns teardown instead of the plugins.
	plainPod, meshPod := plain.newPod("mesh"), mesh.newPod("mesh")
	var without, with, withOwn, cpuWithout, cpuWith []time.Duration
	for i := 0; i < b.N; i++ {
		for j := 0; j < benchPods; j++ {
			w, c := timeAdd(b, plain, plainPod)
			without, cpuWithout = append(without, w), append(cpuWithout, c)
			agent.takeAddTime()
			w, c = timeAdd(b, mesh, meshPod)
			with, cpuWith = append(with, w), append(cpuWith, c)
			withOwn = append(withOwn, w-agent.takeAddTime())
		}
	}
	q := func(d []time.Duration, q float64) float64 {
		s := slices.Clone(d)
		slices.Sort(s)
		return float64(s[int(q*float64(len(s)-1))]) / 1e6
	}
	b.ReportMetric(q(without, .5), "p50-ms-without")
	b.ReportMetric(q(without, .99), "p99-ms-without")
	b.ReportMetric(q(with, .5), "p50-ms-with")
	b.ReportMetric(q(with, .99), "p99-ms-with")
	b.ReportMetric(q(with, .5)-q(without, .5), "p50-ms-added")
	b.ReportMetric(q(with, .99)-q(without, .99), "p99-ms-added")
	b.ReportMetric(q(with, .99)/q(without, .99), "p99-ratio")
	// The measure: the agent's work (deciding, installing the
	// rules) excluded, per ADD.
	b.ReportMetric(q(withOwn, .5)-q(without, .5), "p50-ms-added-without-agent")
	b.ReportMetric(q(withOwn, .99)-q(without, .99), "p99-ms-added-without-agent")
	b.ReportMetric(q(cpuWithout, .5), "cpu-p50-ms-without")
	b.ReportMetric(q(cpuWith, .5), "cpu-p50-ms-with")
	b.ReportMetric(q(cpuWith, .99)-q(cpuWithout, .99), "cpu-p99-ms-added")
}

func childCPU() time.Duration {
	var ru unix.Rusage
	unix.Getrusage(unix.RUSAGE_CHILDREN, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// timeAdd runs one chain ADD in p's netns under a fresh container ID and
// returns its wall and CPU time, then DELs it.
func timeAdd(b *testing.B, n *node, p *pod) (wall, cpu time.Duration) {
	p.rt.ContainerID = "ctr-" + randHex(8)
	cpu0, start := childCPU(), time.Now()
	if err := n.add(p); err != nil {
		b.Fatal(err)
	}
	wall, cpu = time.Since(start), childCPU()-cpu0
	if err := n.del(p); err != nil {
		b.Fatalf("DEL: %v", err)
	}
	return wall, cpu
}

// BenchmarkPluginExec isolates ambit-cni from the chain: one exec of the
// plugin alone per sample (re-ADD of an enrolled pod: the agent round trip,
// with the responder installing the full nftables + routes as the agent
// does, its time reported apart; and a pod the agent skips), against
// two baselines measured in the same run, interleaved:
//   - floor: an empty static Go program (func main(){}), built here with
//     the plugin's flags. No Go CNI plugin can cost less than this; on a VM
//     where a page fault costs tens of µs, its ~150 faults are most of it.
//   - portmap: the reference plugin passing prevResult through (a Go CNI
//     plugin doing nothing).
//
// Per series: wall p50/p99, CPU (user+sys) p50, and minor page faults p50
// (getrusage of the child; deterministic where time is noisy). The
// "over-floor" metrics are what ambit-cni itself costs beyond starting any
// Go process: the part this repository can still shrink.
func BenchmarkPluginExec(b *testing.B) {
	testenv.RequireRoot(b)
	const samples = 200
	set := testenv.PluginSets(b)[1]
	agent := newResponder(b, "mesh")
	n := newNode(b, set, nodeOpts{backend: redirect.Nftables, withAmbit: true, socket: agent.socket})
	p := n.newPod("mesh")
	if err := n.add(p); err != nil {
		b.Fatal(err)
	}
	floorBin := emptyGoBinary(b)
	enrolled := n.directConf(p, nil)
	portmap := n.directConf(p, func(m map[string]any) {
		m["type"] = "portmap"
		m["capabilities"] = map[string]bool{"portMappings": true}
	})
	env := p.env("")
	skipEnv := append(append([]string{}, env...), "CNI_ARGS=K8S_POD_NAMESPACE=plain;K8S_POD_NAME=x")
	pmBin := set.Dir + "/portmap"
	type series struct {
		name      string
		wall, cpu []time.Duration
		faults    []int64
		// agent is the responder's time per exec: the agent's work
		// (deciding; installing the rules when enrolled), which the
		// issue's goal excludes.
		agent []time.Duration
	}
	all := []*series{{name: "floor"}, {name: "portmap"}, {name: "enrolled"}, {name: "skipped"}}
	for i := 0; i < b.N*samples; i++ {
		for _, s := range all {
			bin, conf, e := n.bin, enrolled, env
			switch s.name {
			case "floor":
				bin = floorBin
			case "portmap":
				bin, conf = pmBin, portmap
			case "skipped":
				e = skipEnv
			}
			w, c, f := execOnce(b, bin, conf, e)
			s.wall, s.cpu, s.faults = append(s.wall, w), append(s.cpu, c), append(s.faults, f)
			s.agent = append(s.agent, agent.takeAddTime())
		}
	}
	q := func(d []time.Duration, q float64) float64 {
		s := slices.Clone(d)
		slices.Sort(s)
		return float64(s[int(q*float64(len(s)-1))]) / 1e6
	}
	median := func(d []int64) float64 {
		s := slices.Clone(d)
		slices.Sort(s)
		return float64(s[len(s)/2])
	}
	for _, s := range all {
		b.ReportMetric(q(s.wall, .5), "p50-ms-"+s.name)
		b.ReportMetric(q(s.wall, .99), "p99-ms-"+s.name)
		b.ReportMetric(q(s.cpu, .5), "cpu-p50-ms-"+s.name)
		b.ReportMetric(median(s.faults), "faults-p50-"+s.name)
	}
	floor, enr, skip := all[0], all[2], all[3]
	b.ReportMetric(q(enr.wall, .5)-q(floor.wall, .5), "p50-ms-enrolled-over-floor")
	b.ReportMetric(q(enr.wall, .99)-q(floor.wall, .99), "p99-ms-enrolled-over-floor")
	b.ReportMetric(q(enr.cpu, .5)-q(floor.cpu, .5), "cpu-p50-ms-enrolled-over-floor")
	b.ReportMetric(median(enr.faults)-median(floor.faults), "faults-enrolled-over-floor")
	b.ReportMetric(median(skip.faults)-median(floor.faults), "faults-skipped-over-floor")
	b.ReportMetric(q(enr.wall, .99)/q(all[1].wall, .99), "p99-ratio-enrolled/portmap")
	// Per exec: wall time minus the agent's part of it.
	own := make([]time.Duration, len(enr.wall))
	for i := range own {
		own[i] = enr.wall[i] - enr.agent[i]
	}
	b.ReportMetric(q(enr.agent, .5), "p50-ms-enrolled-agent")
	b.ReportMetric(q(enr.agent, .99), "p99-ms-enrolled-agent")
	b.ReportMetric(q(own, .5), "p50-ms-enrolled-without-agent")
	b.ReportMetric(q(own, .99), "p99-ms-enrolled-without-agent")
}

// emptyGoBinary builds `func main() {}` the way ambit-cni is built (static,
// stripped, trimmed) in its own module, so the floor tracks the toolchain.
func emptyGoBinary(b *testing.B) string {
	b.Helper()
	dir := b.TempDir()
	files := map[string]string{
		"go.mod":  "module floor\n\ngo 1.26\n",
		"main.go": "package main\n\nfunc main() {}\n",
	}
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			b.Fatal(err)
		}
	}
	out := filepath.Join(dir, "floor")
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", out, ".")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOWORK=off", "GOFLAGS=-mod=mod", "GOTOOLCHAIN=local")
	if o, err := cmd.CombinedOutput(); err != nil {
		b.Fatalf("building the empty Go program: %v\n%s", err, o)
	}
	return out
}

// execOnce runs bin once as an ADD and returns its wall time, CPU time
// (user+sys) and minor page faults.
func execOnce(b *testing.B, bin string, conf []byte, env []string) (wall, cpu time.Duration, faults int64) {
	cmd := exec.Command(bin)
	cmd.Env = append([]string{"CNI_COMMAND=ADD", "CNI_IFNAME=eth0", "CNI_PATH=/nonexistent", "PATH=" + os.Getenv("PATH")}, env...)
	cmd.Stdin = bytes.NewReader(conf)
	var out bytes.Buffer
	cmd.Stdout = &out
	start := time.Now()
	if err := cmd.Run(); err != nil {
		b.Fatalf("%s ADD: %v: %s", bin, err, out.String())
	}
	wall = time.Since(start)
	if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		faults = ru.Minflt
	}
	return wall, cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime(), faults
}
