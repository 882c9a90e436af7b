package istio

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testca"
	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/tunnel/internal/benchkit"
)

// istioPair is the baseline: Istio's Go HBONE as a proxy pair, its
// dialer behind a local listener in A (one process in A's netns), its
// server on B:15008 (one process in B's netns), mTLS with the same test
// CA, apps in B.
func istioPair(tb testing.TB) benchkit.Setup {
	p := benchkit.NewPlain(tb)
	ca, err := testca.New("cluster.local")
	if err != nil {
		tb.Fatal(err)
	}
	srv, _ := helper(tb, p.B, true, append(writePEM(tb, ca, ca.ID("b", "server")), "AMBIT_ISTIO_ROLE=server")...)
	ports := fmt.Sprintf("%d %d %d %d", benchkit.PortSink, benchkit.PortRR, benchkit.PortPing, benchkit.PortIperf)
	rel, _ := helper(tb, p.A, true, append(writePEM(tb, ca, ca.ID("a", "client")), "AMBIT_ISTIO_ROLE=relay",
		"PROXY="+netip.AddrPortFrom(p.B.IP4, 15008).String(), "TARGET_IP="+p.B.IP4.String(), "PORTS="+ports)...)
	return benchkit.Setup{
		Name: "istio go hbone",
		Dial: func(port uint16) (net.Conn, error) {
			return p.NA.Dial(context.Background(), netip.Addr{}, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), 17000+port))
		},
		CPU:   func() float64 { return benchkit.ProcCPU(srv.Process.Pid) + benchkit.ProcCPU(rel.Process.Pid) },
		Pids:  []int{srv.Process.Pid, rel.Process.Pid},
		Iperf: benchkit.LocalIperf(p.A.Name),
	}
}

// BenchmarkDataPath is the full comparison, one run, same topology:
// direct, relay pair, Istio's Go HBONE pair, Ambit with an agent per
// pod (as if on two nodes) and Ambit with one agent for both (one node);
// medians of interleaved rounds, ratios against the relay pair, Ambit
// against Istio and against the goals of issue #4. Throughput is
// measured twice: by benchkit's own sink (512 MiB, with the proxies'
// CPU per GB) and by iperf3, the tool issue #4 names and users run
// (AMBIT_BENCH_IPERF_SECS a run, default 3; 0 leaves it out).
func BenchmarkDataPath(b *testing.B) {
	testenv.RequireRoot(b)
	o := benchkit.Options{Rounds: 5, IperfSecs: 3}
	if v, ok := os.LookupEnv("AMBIT_BENCH_IPERF_SECS"); ok {
		if _, err := fmt.Sscan(v, &o.IperfSecs); err != nil {
			b.Fatalf("AMBIT_BENCH_IPERF_SECS=%q: want whole seconds", v)
		}
	}
	if o.IperfSecs > 0 && !benchkit.HaveIperf() {
		b.Fatal("iperf3 is not installed (hack/deps.sh installs it); AMBIT_BENCH_IPERF_SECS=0 runs without it")
	}
	setups := []benchkit.Setup{benchkit.Direct(b), benchkit.RelayPairProcs(b), istioPair(b), benchkit.AmbitProcs(b), benchkit.AmbitOneAgent(b)}
	b.ResetTimer()
	var rs []benchkit.Result
	for i := 0; i < b.N; i++ {
		rs = benchkit.Run(b, setups, o)
	}
	b.StopTimer()
	fmt.Fprintf(os.Stdout, "\n%s\n", benchkit.Table(rs, "relay pair"))
	for _, a := range []string{"ambit", "ambit 1 agent"} {
		fmt.Fprintf(os.Stdout, "%s\n", benchkit.Versus(rs, a, "istio go hbone"))
	}
	for _, a := range []string{"ambit", "ambit 1 agent"} {
		fmt.Fprintf(os.Stdout, "%s\n", benchkit.Goals(rs, "relay pair", a))
	}
	benchkit.Report(b, rs)
}

// BenchmarkCostAtLoad is what each data path costs at a fixed, moderate
// load (the figure a user's bill follows, and the one ztunnel publishes:
// vCPU and MB per 1,000 requests/s): 1,000 and 3,000 requests/s of 1 KB
// on 16 keep-alive connections, and 500 new connections/s; the proxies'
// CPU and memory, the client's latency at that rate. Medians of
// interleaved rounds. Not 5,000 requests/s: with the relay pair and
// Istio's pair that kept this 2-vCPU machine 75–97 % busy (clients,
// apps, proxies, the kernel's network work), a saturated figure. AMBIT_COST_WINDOW (a duration) and
// AMBIT_COST_ROUNDS lengthen it for a steadier figure.
func BenchmarkCostAtLoad(b *testing.B) {
	testenv.RequireRoot(b)
	o := benchkit.CostOptions{}
	if d, err := time.ParseDuration(os.Getenv("AMBIT_COST_WINDOW")); err == nil {
		o.Window = d
	}
	fmt.Sscan(os.Getenv("AMBIT_COST_ROUNDS"), &o.Rounds)
	setups := []benchkit.Setup{benchkit.RelayPairProcs(b), istioPair(b), benchkit.AmbitProcs(b), benchkit.AmbitOneAgent(b)}
	modes := []benchkit.CostMode{
		{Name: "1k rps", Rate: 1000},
		{Name: "3k rps", Rate: 3000},
		{Name: "500 conn/s", Rate: 500, NewConn: true},
	}
	b.ResetTimer()
	var cs []benchkit.Cost
	for i := 0; i < b.N; i++ {
		cs = benchkit.RunCost(b, setups, modes, o)
	}
	b.StopTimer()
	fmt.Fprintf(os.Stdout, "\n%s\n", benchkit.CostTable(cs, "relay pair", "istio go hbone"))
	for _, a := range []string{"ambit", "ambit 1 agent"} {
		for _, base := range []string{"relay pair", "istio go hbone"} {
			fmt.Fprint(os.Stdout, benchkit.CostVersus(cs, a, base))
		}
	}
	benchkit.ReportCost(b, cs)
}
