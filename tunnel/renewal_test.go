package tunnel_test

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testca"
)

// TestRotationFailsNoStream: the workloads' certificates are renewed
// again and again (as the identity manager does at half-life; here every
// second, each valid for 3 s) while A's app keeps connecting to B, so
// A's pooled connections keep reaching the end of the certificates they
// were made with. None of the app's connections may fail. Both ends stop
// taking streams on a connection at the same expiry (the earliest of
// the same certificates), so unless the client leaves ahead, a stream
// opened just before reaches B just after and is refused (401). The race
// is one trip wide, hence the many expiries and clients.
func TestRotationFailsNoStream(t *testing.T) {
	m := newMesh(t)
	renew := func() {
		for _, id := range []string{m.A.Workload.Identity, m.B.Workload.Identity} {
			c, err := m.CA.Issue(id, testca.IssueOptions{NotAfter: time.Now().Add(3 * time.Second)})
			if err != nil {
				t.Error(err)
				return
			}
			m.Certs.Set(id, c)
		}
	}
	renew()
	stop := make(chan struct{})
	var rotations sync.WaitGroup
	rotations.Add(1)
	go func() {
		defer rotations.Done()
		tk := time.NewTicker(time.Second)
		defer tk.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tk.C:
				renew()
			}
		}
	}()
	// One pooled connection per address of B: two expiring at a time.
	var ok, failed atomic.Int64
	end := time.Now().Add(6 * time.Second)
	var wg sync.WaitGroup
	for i := range 8 {
		dst := m.B.Pod.IP4
		if i%2 == 1 {
			dst = m.B.Pod.IP6
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(end) {
				if reachesAt(m, dst) {
					ok.Add(1)
				} else {
					failed.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	close(stop)
	rotations.Wait()
	t.Logf("%d connections reached B, %d failed", ok.Load(), failed.Load())
	if failed.Load() > 0 {
		t.Errorf("%d of A's connections failed while certificates rotated", failed.Load())
	}
	if n := m.B.Metric(t, "ambit_tunnel_connections_failed_total", map[string]string{"direction": "inbound", "reason": "tls_expired"}); n != 0 {
		t.Errorf("B refused %v streams for an expired certificate", n)
	}
}
