package benchkit

import (
	"strings"
	"testing"
	"time"
)

func TestGoals(t *testing.T) {
	relay := Result{Name: "relay pair", Gbps: 5, P50: 100 * time.Microsecond, ConnsPerS: 2000}
	for _, c := range []struct {
		r    Result
		want []string
	}{
		{Result{Name: "ambit", Gbps: 3, P50: 120 * time.Microsecond, ConnsPerS: 2000},
			[]string{"throughput 0.60 ≥ 0.6 met", "RTT p50 1.20 ≤ 1.2 met", "conns/s 1.00 ≥ 1.0 met"}},
		{Result{Name: "ambit", Gbps: 2.9, P50: 130 * time.Microsecond, ConnsPerS: 1900},
			[]string{"throughput 0.58 ≥ 0.6 NOT MET", "RTT p50 1.30 ≤ 1.2 NOT MET", "conns/s 0.95 ≥ 1.0 NOT MET"}},
	} {
		got := Goals([]Result{relay, c.r}, "relay pair", "ambit")
		for _, w := range c.want {
			if !strings.Contains(got, w) {
				t.Errorf("Goals = %q, want it to contain %q", got, w)
			}
		}
	}
	if got := Goals([]Result{relay}, "relay pair", "ambit"); got != "" {
		t.Errorf("Goals without the result = %q, want nothing", got)
	}
	if got := Goals([]Result{{Name: "relay pair"}, {Name: "ambit", Gbps: 1}}, "relay pair", "ambit"); got != "" {
		t.Errorf("Goals against an empty baseline = %q, want nothing", got)
	}
}
