package agent

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/node-agent/state"
)

// BenchmarkRecordPass is what following the records costs an agent alone
// on a full node (110 pods) per pod churning: the pass after its own ADD
// (one new record, its own) and the pass after its own DEL (one record
// gone, no other agent), against the record write that triggers them
// (Store.Put, fsync included), measured in the same loop.
func BenchmarkRecordPass(b *testing.B) {
	st, err := state.Open(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	a := &Agent{store: st, log: quietLogger(), byCID: map[string]*pod{}, byName: map[string]*pod{}, ready: make(chan struct{}),
		peers: func() bool { return false }}
	close(a.ready)
	rec := func(i int) state.Pod {
		return state.Pod{Namespace: "apps", Name: fmt.Sprintf("p%d", i), UID: fmt.Sprintf("uid-%d", i), ContainerID: fmt.Sprintf("cid-%d", i), Since: time.Now()}
	}
	for i := range 109 {
		r := rec(i)
		if err := st.Put(r); err != nil {
			b.Fatal(err)
		}
		a.register(&pod{rec: r})
	}
	ctx := context.Background()
	prev := a.recordPass(ctx, nil)
	var put, pass time.Duration
	i := 1000
	for b.Loop() {
		r := rec(i)
		i++
		t0 := time.Now()
		if err := st.Put(r); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		a.register(&pod{rec: r}) // as its ADD does, under the pod's lock
		t2 := time.Now()
		prev = a.recordPass(ctx, prev)
		t3 := time.Now()
		a.mu.Lock()
		delete(a.byCID, r.ContainerID)
		delete(a.byName, r.Namespace+"/"+r.Name)
		a.mu.Unlock()
		if err := st.Delete(r.ContainerID); err != nil {
			b.Fatal(err)
		}
		t4 := time.Now()
		prev = a.recordPass(ctx, prev)
		t5 := time.Now()
		put += t1.Sub(t0)
		pass += t3.Sub(t2) + t5.Sub(t4)
	}
	if len(prev) != 109 {
		b.Fatalf("%d records seen, want 109", len(prev))
	}
	b.ReportMetric(float64(put.Microseconds())/float64(b.N), "µs/put")
	b.ReportMetric(float64(pass.Microseconds())/float64(b.N), "µs/passes")
	b.ReportMetric(float64(pass)/float64(put), "passes/put")
}
