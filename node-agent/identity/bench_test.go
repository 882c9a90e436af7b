package identity_test

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/node-agent/identity"
)

// Benchmark250Pods: time for one agent to obtain certificates for 250 new
// pods (250 distinct identities) from a CA over HTTPS on loopback, against
// the in-process local CA as baseline.
func Benchmark250Pods(b *testing.B) {
	const pods = 250
	ids := make([]string, pods)
	for i := range ids {
		ids[i] = fmt.Sprintf("spiffe://cluster.local/ns/ns-%d/sa/sa-%d", i%25, i)
	}
	run := func(b *testing.B, newMgr func() *identity.Manager) {
		var total time.Duration
		for i := 0; i < b.N; i++ {
			b.StopTimer()
			m := newMgr()
			b.StartTimer()
			start := time.Now()
			for _, id := range ids {
				if err := m.Prefetch(id); err != nil {
					b.Fatal(err)
				}
			}
			for _, id := range ids {
				if _, err := m.Certificate(context.Background(), id); err != nil {
					b.Fatal(err)
				}
			}
			total += time.Since(start)
		}
		b.ReportMetric(float64(total.Milliseconds())/float64(b.N), "ms/250pods")
	}
	b.Run("local", func(b *testing.B) {
		dir := filepath.Join(b.TempDir(), "ca")
		run(b, func() *identity.Manager {
			m, err := identity.NewManager(identity.Config{TrustDomain: td, LocalCADir: dir})
			if err != nil {
				b.Fatal(err)
			}
			return m
		})
	})
	b.Run("remote", func(b *testing.B) {
		e := newCA(b, "node-1")
		for i := range ids {
			e.cluster.AddPod(b, fmt.Sprintf("ns-%d", i%25), fmt.Sprintf("pod-%d", i), fmt.Sprintf("sa-%d", i), "node-1")
		}
		run(b, func() *identity.Manager { return e.agent(b, "node-1", 24*time.Hour, nil) })
	})
}
