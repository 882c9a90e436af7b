package statussync

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/ambit-mesh/ambit/node-agent/cluster"
	"github.com/ambit-mesh/ambit/node-agent/config"
	"github.com/ambit-mesh/ambit/node-agent/kube"
)

// BenchmarkBulkAnnotation: 50 pods enrolled at once on a node (a
// Deployment scaled up, a node drained onto this one) and the time until
// each carries ambit.dev/redirection=enabled, which is when other nodes
// stop reaching it in plaintext. The writes go through a real client-go
// client, with its real token-bucket rate limiter, to a local HTTP
// server answering the patches (no network time: what is left is the
// rate limit). baseline is client-go's default rate (5/s, burst 10), the
// agent's before kubeAPIQPS/kubeAPIBurst; new is config.Default()'s.
// Reported: the 50th pod's latency (last-ms) and the mean (mean-ms) for
// each, and new/baseline of the last.
//
//	go test -run '^$' -bench BulkAnnotation -benchtime 1x ./node-agent/statussync/
func BenchmarkBulkAnnotation(b *testing.B) {
	const pods = 50
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// /api/v1/namespaces/shop/pods/<name>
		parts := strings.Split(r.URL.Path, "/")
		if r.Method != http.MethodPatch || len(parts) != 7 {
			http.Error(w, "unexpected "+r.Method+" "+r.URL.Path, http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"apiVersion":"v1","kind":"Pod","metadata":{"namespace":%q,"name":%q}}`, parts[4], parts[6])
	}))
	defer srv.Close()
	def := config.Default()
	var last, mean [2]time.Duration
	b.ResetTimer()
	for range b.N {
		for i, rate := range []struct {
			qps   float32
			burst int
		}{{rest.DefaultQPS, rest.DefaultBurst}, {float32(def.KubeAPIQPS), def.KubeAPIBurst}} {
			l, m := bulk(b, srv.URL, rate.qps, rate.burst, pods)
			last[i] += l
			mean[i] += m
		}
	}
	n := float64(b.N)
	ms := func(d time.Duration) float64 { return float64(d.Milliseconds()) / n }
	b.ReportMetric(ms(last[0]), "baseline-last-ms")
	b.ReportMetric(ms(mean[0]), "baseline-mean-ms")
	b.ReportMetric(ms(last[1]), "last-ms")
	b.ReportMetric(ms(mean[1]), "mean-ms")
	b.ReportMetric(float64(last[1])/float64(last[0]), "new/baseline")
}

// bulk sets n pods enabled at once through a Syncer writing with a client
// of that rate, and returns the latency of the last write and the mean.
func bulk(b *testing.B, url string, qps float32, burst, n int) (last, mean time.Duration) {
	client, err := kubernetes.NewForConfig(&rest.Config{Host: url, QPS: qps, Burst: burst})
	if err != nil {
		b.Fatal(err)
	}
	src, err := kube.New(kube.Config{Client: client, NodeName: node, Logger: quiet()})
	if err != nil {
		b.Fatal(err)
	}
	w := &timedWriter{w: src, done: make(chan struct{}), left: n}
	// No Reader: the informers are not started (the server only
	// answers patches), so every Set is written once.
	s, err := New(Options{Writer: w, Logger: quiet()})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	stopped := make(chan struct{})
	go func() { defer close(stopped); s.Run(ctx) }()
	defer func() { cancel(); <-stopped }()
	start := time.Now()
	w.start = start
	for i := range n {
		s.Set(cluster.Pod{Namespace: "shop", Name: fmt.Sprintf("p%d", i)}, kube.StateEnabled)
	}
	select {
	case <-w.done:
	case <-time.After(time.Minute):
		b.Fatal("not every pod annotated within a minute")
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.errs > 0 {
		b.Fatalf("%d writes failed", w.errs)
	}
	return w.last, w.sum / time.Duration(n)
}

// timedWriter records when each write was acknowledged.
type timedWriter struct {
	w     Writer
	start time.Time
	mu    sync.Mutex
	left  int
	errs  int
	sum   time.Duration
	last  time.Duration
	done  chan struct{}
}

func (t *timedWriter) SetRedirection(ctx context.Context, pod cluster.Pod, state string) error {
	err := t.w.SetRedirection(ctx, pod, state)
	t.mu.Lock()
	defer t.mu.Unlock()
	if err != nil {
		t.errs++
		return err
	}
	d := time.Since(t.start)
	t.sum += d
	t.last = max(t.last, d)
	if t.left--; t.left == 0 {
		close(t.done)
	}
	return nil
}
