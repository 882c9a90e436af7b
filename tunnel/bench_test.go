package tunnel_test

import (
	"fmt"
	"log/slog"
	"os"
	"testing"

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
// pod), and Ambit (an agent process per pod). (The Istio Go
// HBONE baseline runs in tunnel/interop/istio, which adds it to the same
// table.) Figures are medians of interleaved rounds; ratios are against
// the relay pair. Never pass/fail on timing.
func BenchmarkDataPath(b *testing.B) {
	testenv.RequireRoot(b)
	setups := []benchkit.Setup{benchkit.Direct(b), benchkit.RelayPairProcs(b), benchkit.AmbitProcs(b)}
	b.ResetTimer()
	var rs []benchkit.Result
	for i := 0; i < b.N; i++ {
		rs = benchkit.Run(b, setups, benchkit.Options{})
	}
	b.StopTimer()
	fmt.Fprintf(os.Stdout, "\n%s\n", benchkit.Table(rs, "relay pair"))
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
