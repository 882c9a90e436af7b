package tunnel

import (
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// idleClock gives m's series cache a clock the test moves.
func idleClock(m *metrics) *int64 {
	now := monoNanos(time.Now())
	m.cache.now = func() int64 { return now }
	m.cache.lastSweep = now
	return &now
}

// exported lists the identity pairs (src/dst) a metric exports now.
func exported(t *testing.T, reg *prometheus.Registry, name string) []string {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, mt := range mf.GetMetric() {
			var src, dst string
			for _, l := range mt.GetLabel() {
				switch l.GetName() {
				case "src_identity":
					src = l.GetValue()
				case "dst_identity":
					dst = l.GetValue()
				}
			}
			out = append(out, src+">"+dst)
		}
	}
	return out
}

// Identity-labelled series of pairs that stopped talking (deleted
// namespaces, CI's throwaway service accounts) are dropped after
// seriesIdle, failures and plaintext-from-meshed included; those still
// in use are kept. Before, every pair that ever talked stayed for the
// agent's life: its memory and every scrape grew with the cluster's churn.
func TestIdleIdentitySeriesDropped(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := newMetrics(reg)
	now := idleClock(m)

	old := m.series("outbound", "hbone", "spiffe://td/ns/ci-1/sa/default", "spiffe://td/ns/ci-1/sa/api")
	old.opened.Inc()
	old.closed.Inc()
	m.failed.WithLabelValues("inbound", "denied", "spiffe://td/ns/ci-1/sa/default", "spiffe://td/ns/ci-1/sa/api").Inc()
	m.plainFromMesh.WithLabelValues("spiffe://td/ns/ci-1/sa/default", "spiffe://td/ns/ci-1/sa/api").Inc()
	kept := m.series("outbound", "hbone", "spiffe://td/ns/shop/sa/web", "spiffe://td/ns/shop/sa/db")
	kept.opened.Inc()

	*now += int64(seriesIdle) - int64(time.Minute)
	m.series("outbound", "hbone", "spiffe://td/ns/shop/sa/web", "spiffe://td/ns/shop/sa/db") // kept: in use
	*now += int64(2 * time.Minute)                                                           // ci-1 idle past seriesIdle
	m.series("outbound", "hbone", "spiffe://td/ns/ci-2/sa/default", "spiffe://td/ns/ci-2/sa/api").opened.Inc()

	for _, name := range []string{"ambit_tunnel_connections_opened_total", "ambit_tunnel_connections_failed_total", "ambit_tunnel_plaintext_from_meshed_total"} {
		for _, pair := range exported(t, reg, name) {
			if strings.Contains(pair, "ci-1") {
				t.Errorf("%s still exports the idle pair %s", name, pair)
			}
		}
	}
	got := strings.Join(exported(t, reg, "ambit_tunnel_connections_opened_total"), " ")
	if !strings.Contains(got, "ns/shop/sa/web>") || !strings.Contains(got, "ns/ci-2/") {
		t.Errorf("pairs in use were dropped: %s", got)
	}
}

// A connection that outlives its series (open past seriesIdle with no
// other connection of its labels, then a sweep) counts its close on the
// series again, not on the dropped counters nobody exports.
func TestLongConnectionCountsItsCloseAfterASweep(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := newMetrics(reg)
	now := idleClock(m)
	cs := m.series("inbound", "hbone", "spiffe://td/ns/a/sa/x", "spiffe://td/ns/b/sa/y")
	cs.opened.Inc()
	*now += int64(seriesIdle + sweepEvery)
	m.series("inbound", "hbone", "spiffe://td/ns/c/sa/z", "spiffe://td/ns/b/sa/y") // sweeps
	end := m.ending(cs, "inbound", "hbone", "spiffe://td/ns/a/sa/x", "spiffe://td/ns/b/sa/y")
	end.closed.Inc()
	end.sent.Add(100)
	closed := m.closed.WithLabelValues("inbound", "hbone", "spiffe://td/ns/a/sa/x", "spiffe://td/ns/b/sa/y")
	if got := testutil.ToFloat64(closed); got != 1 {
		t.Fatalf("the close of a connection whose series was swept is not exported: closed_total %v, want 1", got)
	}
	// A series still held is kept as it is: ending hands back the same.
	if again := m.ending(end, "inbound", "hbone", "spiffe://td/ns/a/sa/x", "spiffe://td/ns/b/sa/y"); again != end {
		t.Fatal("ending replaced a series no sweep dropped")
	}
}

// Two Proxies on one registry share their vectors, so they share the
// sweep: one's sweep must not leave the other counting on dropped
// counters.
func TestSharedRegistrySharesTheSweep(t *testing.T) {
	reg := prometheus.NewRegistry()
	m1, m2 := newMetrics(reg), newMetrics(reg)
	if m1.cache != m2.cache {
		t.Fatal("two metrics of one registry have two series caches")
	}
	now := idleClock(m1)
	cs := m2.series("outbound", "hbone", "a", "b")
	*now += int64(seriesIdle + sweepEvery)
	m1.series("outbound", "hbone", "c", "d") // sweeps a>b
	if got := m2.series("outbound", "hbone", "a", "b"); got == cs {
		t.Fatal("m2 kept a series m1's sweep dropped")
	}
}
