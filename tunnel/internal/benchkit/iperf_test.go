package benchkit

import (
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
)

func TestParseIperf(t *testing.T) {
	ok := `{"start":{},"end":{"sum_sent":{"bytes":9000,"bits_per_second":9.5e9},"sum_received":{"bytes":8800,"bits_per_second":9.25e9}}}`
	if got, err := parseIperf([]byte(ok)); err != nil || got != 9.25e9 {
		t.Errorf("parseIperf(report) = %v, %v; want the receiver's 9.25e9", got, err)
	}
	for _, c := range []struct{ in, want string }{
		{`{"start":{},"end":{},"error":"unable to connect to server: Connection refused"}`, "Connection refused"},
		{`{"start":{},"end":{"sum_received":{"bytes":0,"bits_per_second":0}}}`, "nothing received"},
		{`iperf3: error - unable to connect`, "JSON report"},
		{``, "JSON report"},
	} {
		if _, err := parseIperf([]byte(c.in)); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("parseIperf(%q) error %v, want one saying %q", c.in, err, c.want)
		}
	}
}

func TestTableAndGoalsCarryIperf(t *testing.T) {
	relay := Result{Name: "relay pair", Gbps: 10, IperfGbps: 8, P50: 100 * time.Microsecond, ConnsPerS: 2000}
	ambit := Result{Name: "ambit", Gbps: 6.5, IperfGbps: 4.4, P50: 110 * time.Microsecond, ConnsPerS: 2100}
	tab := Table([]Result{relay, ambit}, "relay pair")
	if !strings.Contains(strings.Split(tab, "\n")[0], "iperf3 Gb/s") {
		t.Errorf("Table header without the iperf3 column:\n%s", tab)
	}
	if !strings.Contains(tab, "4.40     0.55") {
		t.Errorf("Table without ambit's iperf3 figure and ratio (4.40, 0.55):\n%s", tab)
	}
	g := Goals([]Result{relay, ambit}, "relay pair", "ambit")
	if !strings.Contains(g, "throughput 0.65 ≥ 0.6 met") || !strings.Contains(g, "iperf3 throughput 0.55 ≥ 0.6 NOT MET") {
		t.Errorf("Goals = %q, want the sink's 0.65 met and iperf3's 0.55 not met", g)
	}
	relay.IperfGbps, ambit.IperfGbps = 0, 0
	if tab := Table([]Result{relay, ambit}, "relay pair"); strings.Contains(tab, "iperf3") {
		t.Errorf("Table shows iperf3 columns with no iperf3 figure:\n%s", tab)
	}
	if g := Goals([]Result{relay, ambit}, "relay pair", "ambit"); strings.Contains(g, "iperf3") {
		t.Errorf("Goals = %q names iperf3 with no iperf3 figure", g)
	}
}

// The iperf3 plumbing works end to end through a data path with
// proxies: a server in the destination pod, a client in the source pod
// through the relay pair's relays.
func TestIperfThroughRelayPair(t *testing.T) {
	testenv.RequireRoot(t)
	if !HaveIperf() {
		t.Fatal("iperf3 is not installed: hack/deps.sh (make deps) installs it")
	}
	s := RelayPair(t)
	gbps, err := Iperf(s, 1)
	if err != nil {
		t.Fatal(err)
	}
	if gbps <= 0 {
		t.Fatalf("iperf3 through the relay pair: %v Gb/s", gbps)
	}
	t.Logf("iperf3 through the relay pair: %.2f Gb/s", gbps)
}
