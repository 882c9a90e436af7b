package tunnel_test

import (
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/tunnel"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/tunnel/internal/benchkit"
	"github.com/ambit-mesh/ambit/tunnel/internal/meshtest"
)

// TestMain lets the test binary serve as a benchmark helper process
// (relay or agent in its own process).
func TestMain(m *testing.M) {
	benchkit.MaybeHelper()
	os.Exit(m.Run())
}

// BenchmarkDataPath compares, in one run on the same two-netns topology:
// direct (no mesh), a plain TCP relay pair (a relay process in each
// pod), Ambit with an agent process per pod (the pods as if on two
// nodes) and Ambit with one agent serving both pods (two pods on one
// node, as the node agent runs them). (The Istio Go
// HBONE baseline runs in tunnel/interop/istio, which adds it to the same
// table.) Figures are medians of interleaved rounds; ratios are against
// the relay pair. Never pass/fail on timing.
func BenchmarkDataPath(b *testing.B) {
	testenv.RequireRoot(b)
	setups := []benchkit.Setup{benchkit.Direct(b), benchkit.RelayPairProcs(b), benchkit.AmbitProcs(b), benchkit.AmbitOneAgent(b)}
	b.ResetTimer()
	var rs []benchkit.Result
	for i := 0; i < b.N; i++ {
		rs = benchkit.Run(b, setups, benchkit.Options{Rounds: 5})
	}
	b.StopTimer()
	fmt.Fprintf(os.Stdout, "\n%s\n", benchkit.Table(rs, "relay pair"))
	for _, a := range []string{"ambit", "ambit 1 agent"} {
		fmt.Fprintf(os.Stdout, "%s\n", benchkit.Goals(rs, "relay pair", a))
	}
	benchkit.Report(b, rs)
}

// BenchmarkAmbitThroughput is Ambit alone, for profiling
// (-cpuprofile): 64 MiB per iteration on one connection.
func BenchmarkAmbitThroughput(b *testing.B) {
	testenv.RequireRoot(b)
	amb, _ := benchkit.Ambit(b, meshtest.Options{Config: quietConfig()})
	b.SetBytes(64 << 20)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, _, err := benchkit.Throughput(amb, 64<<20); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkAmbitRTT is Ambit alone: 1 KB request/response per iteration.
func BenchmarkAmbitRTT(b *testing.B) {
	testenv.RequireRoot(b)
	amb, _ := benchkit.Ambit(b, meshtest.Options{Config: quietConfig()})
	b.ResetTimer()
	p50, _, err := benchkit.Latency(amb, max(b.N, 100))
	if err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(p50.Microseconds()), "p50-µs")
}

// quietConfig keeps the access log to warnings: a log line per
// connection to the terminal would measure the terminal.
func quietConfig() tunnel.Config {
	return tunnel.Config{Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))}
}

// BenchmarkThroughputProcs: single-stream throughput only, relay pair
// and Ambit as processes, interleaved (quick A/B of data path changes).
func BenchmarkThroughputProcs(b *testing.B) {
	testenv.RequireRoot(b)
	setups := []benchkit.Setup{benchkit.RelayPairProcs(b), benchkit.AmbitProcs(b)}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for r := 0; r < 3; r++ {
			for _, s := range setups {
				g, cpu, err := benchkit.Throughput(s, 256<<20)
				if err != nil {
					b.Fatal(err)
				}
				fmt.Printf("%-12s %.2f Gb/s  %.2f CPU s/GB\n", s.Name, g, cpu)
			}
		}
	}
}

// BenchmarkIdleConnMemory reports what an idle tunneled connection costs
// both agents together (heap + goroutine stacks, after GC): 1,000
// connections through HBONE, each after one round trip, then idle.
func BenchmarkIdleConnMemory(b *testing.B) {
	testenv.RequireRoot(b)
	m := meshtest.New(b, meshtest.Options{Config: quietConfig()})
	ln := m.B.Listen(b, "[::]:8085")
	held := make(chan net.Conn, 2000)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			var one [1]byte
			io.ReadFull(c, one[:])
			c.Write(one[:])
			held <- c // no goroutine, no buffer: the app side costs nothing
		}
	}()
	mem := func() uint64 {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapInuse + ms.StackInuse
	}
	const N = 1000
	// Warm the pool (one HBONE connection per 100 streams) first.
	conns := make([]net.Conn, 0, 2*N)
	open := func() {
		c, err := m.A.Dial(netip.AddrPortFrom(m.B.Pod.IP4, 8085))
		if err != nil {
			b.Fatal(err)
		}
		c.Write([]byte{1})
		var one [1]byte
		if _, err := io.ReadFull(c, one[:]); err != nil {
			b.Fatal(err)
		}
		conns = append(conns, c)
	}
	for i := 0; i < N; i++ {
		open()
	}
	before := mem()
	for i := 0; i < N; i++ {
		open()
	}
	time.Sleep(200 * time.Millisecond)
	after := mem()
	per := float64(after-before) / N
	b.ReportMetric(per, "bytes/idle-conn")
	fmt.Printf("idle tunneled connection: %.1f KiB (both agents, heap+stacks)\n", per/1024)
	for _, c := range conns {
		c.Close()
	}
}

// BenchmarkRTTProcs: 1 KB round trips, relay pair and Ambit as
// processes, interleaved (quick A/B of latency changes).
func BenchmarkRTTProcs(b *testing.B) {
	testenv.RequireRoot(b)
	setups := []benchkit.Setup{benchkit.RelayPairProcs(b), benchkit.AmbitProcs(b)}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for r := 0; r < 3; r++ {
			for _, s := range setups {
				p50, p99, err := benchkit.Latency(s, 5000)
				if err != nil {
					b.Fatal(err)
				}
				fmt.Printf("%-12s p50 %v p99 %v\n", s.Name, p50, p99)
			}
		}
	}
}

// BenchmarkConnsProcs: new connections per second, relay pair and Ambit
// as processes, interleaved (quick A/B of connection setup changes).
func BenchmarkConnsProcs(b *testing.B) {
	testenv.RequireRoot(b)
	setups := []benchkit.Setup{benchkit.RelayPairProcs(b), benchkit.AmbitProcs(b)}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for r := 0; r < 3; r++ {
			for _, s := range setups {
				n, cpu, err := benchkit.ConnCost(s, 2*time.Second, 4)
				if err != nil {
					b.Fatal(err)
				}
				fmt.Printf("%-12s %.0f conns/s  %.0f µs proxy CPU/conn\n", s.Name, n, float64(cpu)/float64(time.Microsecond))
			}
		}
	}
}

// abSetups is the relay pair and Ambit, plus "ambit B" (and C, D) with
// agents from the test binary named by AMBIT_BENCH_AGENT_B (_C, _D):
// this package built from another commit, or "self" for this binary,
// with the extra environment AMBIT_BENCH_AGENT_B_ENV (space-separated),
// so builds or settings are measured in the same run. Diagnostics:
// AMBIT_BENCH_AGENT_B_ONE=1 makes "ambit B" one agent for both pods
// (AMBIT_BENCH_ONE_AGENT=1 adds this build's one-agent setup).
// AMBIT_BENCH_RELAY_CT=1 adds the relay pair with conntrack on in its
// pods ("relay+ct"); AMBIT_BENCH_NOTRACK=1 in an agent's _ENV gives that
// setup's pods a raw-table notrack for port 15008 (test pods only: the
// rule is not safe for production, see docs/tunnel.md).
func abSetups(b *testing.B) []benchkit.Setup {
	setups := []benchkit.Setup{benchkit.RelayPairProcs(b), benchkit.AmbitProcs(b)}
	if os.Getenv("AMBIT_BENCH_RELAY_CT") != "" {
		setups = append(setups, benchkit.RelayPairCT(b))
	}
	if os.Getenv("AMBIT_BENCH_ONE_AGENT") != "" {
		setups = append(setups, benchkit.AmbitOneAgent(b))
	}
	for _, x := range []string{"B", "C", "D"} {
		bin := os.Getenv("AMBIT_BENCH_AGENT_" + x)
		if bin == "" {
			continue
		}
		if bin == "self" {
			bin, _ = os.Executable()
		}
		env := strings.Fields(os.Getenv("AMBIT_BENCH_AGENT_" + x + "_ENV"))
		if os.Getenv("AMBIT_BENCH_AGENT_"+x+"_ONE") != "" {
			setups = append(setups, benchkit.AmbitOneAgentBin(b, "ambit 1 agent "+x, bin, env...))
			continue
		}
		setups = append(setups, benchkit.AmbitProcsBin(b, "ambit "+x, bin, env...))
	}
	return setups
}

// BenchmarkDataPathAB: throughput (256 MiB) and 1 KB RTT, relay pair,
// Ambit and (with AMBIT_BENCH_AGENT_B) another build of Ambit,
// interleaved for AMBIT_BENCH_ROUNDS rounds (default 5, the order of
// the setups rotating each round so drift cancels); medians with ratios
// against the relay pair of the same run.
func BenchmarkDataPathAB(b *testing.B) {
	testenv.RequireRoot(b)
	setups := abSetups(b)
	rounds := 5
	fmt.Sscan(os.Getenv("AMBIT_BENCH_ROUNDS"), &rounds)
	only := os.Getenv("AMBIT_BENCH_ONLY") // "rtt" or "tp": one of the two
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		all := make([][]benchkit.Result, len(setups))
		rtCPUs := make([][]float64, len(setups))
		for r := 0; r < rounds; r++ {
			for k := range setups {
				j := (k + r) % len(setups)
				s := setups[j]
				var g, cpu float64
				var p50, p99 time.Duration
				var err error
				if only != "rtt" {
					if g, cpu, err = benchkit.Throughput(s, 256<<20); err != nil {
						b.Fatal(err)
					}
				}
				var rtCPU float64 // the proxies' CPU µs per round trip
				if only != "tp" {
					c0 := s.CPU()
					if p50, p99, err = benchkit.Latency(s, 3000); err != nil {
						b.Fatal(err)
					}
					rtCPU = (s.CPU() - c0) / 3050 * 1e6
				}
				var conns float64
				if os.Getenv("AMBIT_BENCH_CONNS") != "" {
					// As BenchmarkDataPath does after each latency run.
					if conns, err = benchkit.ConnRate(s, 1500*time.Millisecond, 4); err != nil {
						b.Fatal(err)
					}
				}
				fmt.Printf("round %d %-12s %.2f Gb/s  %.2f CPU s/GB  p50 %v p99 %v  proxies %.0f µs CPU/round trip  %.0f conns/s\n", r, s.Name, g, cpu, p50.Round(time.Microsecond), p99.Round(time.Microsecond), rtCPU, conns)
				all[j] = append(all[j], benchkit.Result{Name: s.Name, Gbps: g, CPUPerGB: cpu, P50: p50, P99: p99, ConnsPerS: conns})
				rtCPUs[j] = append(rtCPUs[j], rtCPU)
			}
		}
		fmt.Print(benchkit.Table(benchkit.Medians(all), "relay pair"))
		// Ratios within each round (against that round's relay pair),
		// then their median: drift between rounds cancels.
		for j := 1; j < len(setups); j++ {
			var tp, rt, cpu []float64
			for r := range all[j] {
				base := all[0][r]
				tp = append(tp, all[j][r].Gbps/base.Gbps)
				rt = append(rt, float64(all[j][r].P50)/float64(base.P50))
				cpu = append(cpu, all[j][r].CPUPerGB/base.CPUPerGB)
			}
			fmt.Printf("paired %-10s throughput %.2fx  RTT p50 %.2fx  CPU/GB %.2fx the relay pair (median of %d rounds); proxies' CPU per round trip %.0f µs (relay pair %.0f)\n",
				setups[j].Name, medianOf(tp), medianOf(rt), medianOf(cpu), len(tp), medianOf(rtCPUs[j]), medianOf(rtCPUs[0]))
		}
	}
}

// BenchmarkRTTTailAB: AMBIT_BENCH_RTTS (default 20,000) warm 1 KB round
// trips per setup of abSetups, AMBIT_BENCH_ROUNDS rounds (default 3)
// with the order rotating; prints each round's p99.9 and maximum. For
// stalls too rare for the p99: a one-P agent whose only P is held by a
// blocking system call (AMBIT_BENCH_EXEC_EVERY in an agent's _ENV runs
// a child that often, as rule checks do).
func BenchmarkRTTTailAB(b *testing.B) {
	testenv.RequireRoot(b)
	setups := abSetups(b)
	rounds, n := 3, 20000
	fmt.Sscan(os.Getenv("AMBIT_BENCH_ROUNDS"), &rounds)
	fmt.Sscan(os.Getenv("AMBIT_BENCH_RTTS"), &n)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for r := 0; r < rounds; r++ {
			for k := range setups {
				s := setups[(k+r)%len(setups)]
				p999, max, err := benchkit.LatencyTail(s, n)
				if err != nil {
					b.Fatal(err)
				}
				fmt.Printf("round %d %-16s p99.9 %v max %v (%d round trips)\n", r, s.Name, p999.Round(time.Microsecond), max.Round(time.Microsecond), n)
			}
		}
	}
}

func medianOf(v []float64) float64 {
	v = append([]float64(nil), v...)
	sort.Float64s(v)
	return v[len(v)/2]
}

// BenchmarkHoldThroughputProcs prints the proxies' pids, waits
// AMBIT_BENCH_HOLD seconds (default 3: time to attach perf or strace),
// then sends AMBIT_BENCH_BYTES (default 2 GiB) through Ambit and then
// the relay pair, for per-process counts during a bulk transfer (or
// AMBIT_BENCH_RTTS 1 KB round trips on a warm connection).
func BenchmarkHoldThroughputProcs(b *testing.B) {
	testenv.RequireRoot(b)
	setups := abSetups(b)
	hold, size := 3, int64(2<<30)
	fmt.Sscan(os.Getenv("AMBIT_BENCH_HOLD"), &hold)
	fmt.Sscan(os.Getenv("AMBIT_BENCH_BYTES"), &size)
	rtts := 0 // AMBIT_BENCH_RTTS: that many 1 KB round trips instead
	fmt.Sscan(os.Getenv("AMBIT_BENCH_RTTS"), &rtts)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for _, s := range setups[1:] {
			fmt.Printf("PIDS %s %v\n", s.Name, s.Pids)
		}
		fmt.Printf("PIDS relay %v\n", setups[0].Pids)
		for _, s := range append(setups[1:], setups[0]) {
			// Warm: the pooled connection exists and its SETTINGS are
			// known, as in every round of BenchmarkDataPath but the first.
			if _, _, err := benchkit.Throughput(s, 1<<20); err != nil {
				b.Fatal(err)
			}
			fmt.Printf("START %s\n", s.Name)
			time.Sleep(time.Duration(hold) * time.Second)
			t0 := time.Now()
			if rtts > 0 {
				p50, p99, err := benchkit.Latency(s, rtts)
				if err != nil {
					b.Fatal(err)
				}
				fmt.Printf("DONE %s %d round trips p50 %v p99 %v in %v\n", s.Name, rtts, p50, p99, time.Since(t0).Round(time.Millisecond))
				continue
			}
			g, cpu, err := benchkit.Throughput(s, size)
			if err != nil {
				b.Fatal(err)
			}
			fmt.Printf("DONE %s %.2f Gb/s %.2f CPU s/GB in %v\n", s.Name, g, cpu, time.Since(t0).Round(time.Millisecond))
		}
	}
}

// BenchmarkConnsAB: new connections (connect, 1-byte round trip, close;
// 4 clients) through the relay pair, Ambit and the builds of abSetups,
// AMBIT_BENCH_ROUNDS rounds (default 7) with the order rotating; prints
// the medians of the rate and of the proxies' CPU per connection, each
// also as a paired ratio against the relay pair of the same round. The
// CPU per connection is the steadier of the two on a shared machine.
func BenchmarkConnsAB(b *testing.B) {
	testenv.RequireRoot(b)
	setups := abSetups(b)
	rounds := 7
	fmt.Sscan(os.Getenv("AMBIT_BENCH_ROUNDS"), &rounds)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		rate := make([][]float64, len(setups))
		cpu := make([][]float64, len(setups))
		app := make([][]float64, len(setups)) // this process: the apps

		for r := 0; r < rounds; r++ {
			for k := range setups {
				j := (k + r) % len(setups)
				a0 := selfCPU()
				n, c, err := benchkit.ConnCost(setups[j], 2*time.Second, 4)
				if err != nil {
					b.Fatal(err)
				}
				us := float64(c) / float64(time.Microsecond)
				apps := (selfCPU() - a0).Seconds() * 1e6 / (n * 2) // ConnCost runs 2 s
				fmt.Printf("round %d %-12s %.0f conns/s  %.0f µs proxy CPU/conn  %.0f µs apps' CPU/conn\n", r, setups[j].Name, n, us, apps)
				app[j] = append(app[j], apps)
				rate[j] = append(rate[j], n)
				cpu[j] = append(cpu[j], us)
			}
		}
		for j := range setups {
			var rr, cr []float64
			for r := range rate[j] {
				rr = append(rr, rate[j][r]/rate[0][r])
				cr = append(cr, cpu[j][r]/cpu[0][r])
			}
			fmt.Printf("%-12s %.0f conns/s (paired %.2fx the relay pair)  %.0f µs proxy CPU/conn (paired %.2fx)  %.0f µs apps' CPU/conn, medians of %d rounds\n",
				setups[j].Name, medianOf(rate[j]), medianOf(rr), medianOf(cpu[j]), medianOf(cr), medianOf(app[j]), len(rr))
		}
	}
}

// selfCPU is this process's user+system CPU time (the benchmark's apps,
// kernel work done in their system calls included).
func selfCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
