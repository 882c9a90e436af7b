package agent

import (
	"context"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/cluster"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
	"github.com/ambit-mesh/ambit/tunnel"
	"github.com/ambit-mesh/ambit/tunnel/hbone"
)

// BenchmarkDelWithStreams is what ending a pod's connections adds to its
// DEL's answer. A client pod holds n connections to a server pod's app,
// each a stream on a pooled HBONE connection of its own
// (MaxStreamsPerConn 1), and gets a DEL as the plugin sends it (its
// netns: the rules are removed, the pod forgotten); del-ms/op is the
// time to the answer. "reset" is the DEL now (every connection reset
// first), "drain" the DEL before (a serving that cannot abort: idle
// pooled connections closed, the others left to drain after the
// answer). ns/op is the whole cycle (ADD, n connections, DEL, their
// end), so a run stays short at the default benchtime.
func BenchmarkDelWithStreams(b *testing.B) {
	testenv.RequireRoot(b)
	for _, mode := range []string{"drain", "reset"} {
		for _, n := range []int{1, 50} {
			b.Run(fmt.Sprintf("%s/streams=%d", mode, n), func(b *testing.B) { benchDel(b, mode == "reset", n) })
		}
	}
}

func benchDel(b *testing.B, reset bool, n int) {
	reg := prometheus.NewRegistry()
	h := startAgent(b, "", invAmbient, func(o *Options) {
		p, err := tunnel.New(tunnel.Config{Directory: o.View, Certificates: newTestCA(b), Logger: quietLogger(),
			Registerer: reg, HBONE: hbone.Config{MaxStreamsPerConn: 1}})
		if err != nil {
			b.Fatal(err)
		}
		o.Tunnel = ProxyTunnel{Proxy: p}
		if !reset {
			o.Tunnel = drainOnly{p}
		}
	})
	pol := h.a.Policy()
	h.inv.SetMeshed(func(p cluster.Pod, ns *cluster.Namespace) bool { return pol.Decide(p, ns).Enroll })
	client, server := newPair(b, "10.91.0.2", "10.91.0.3")
	enrollLikePlugin(b, h, "server", server, "10.91.0.3/24")
	pooled := func() float64 { return testenv.Metric(b, reg, "ambit_tunnel_hbone_pool_connections", nil) }
	var del time.Duration
	for i := 0; b.Loop(); i++ {
		cid := fmt.Sprintf("cid-client-%d", i)
		if resp, err := h.call(cniproto.OpAdd, "apps", "client", cid, client, "10.91.0.2/24"); err != nil || resp.Decision != cniproto.Enroll {
			b.Fatalf("ADD: %+v %v", resp, err)
		}
		conns := make([]net.Conn, 0, n)
		for range n {
			c, line, err := dialFrom(b, client, "10.91.0.3:8080")
			if err != nil || line != "plain" {
				b.Fatalf("client → server: %q %v", line, err)
			}
			conns = append(conns, c)
		}
		if got := pooled(); got != float64(n) {
			b.Fatalf("%v pooled HBONE connections, want %d", got, n)
		}
		start := time.Now()
		resp, err := h.call(cniproto.OpDel, "apps", "client", cid, client)
		del += time.Since(start)
		if err != nil || resp.Error != "" {
			b.Fatalf("DEL: %+v %v", resp, err)
		}
		for _, c := range conns {
			c.Close()
		}
		// The next cycle starts from an empty pool (a drained serving
		// closes its pool once its connections are done).
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		for pooled() != 0 && ctx.Err() == nil {
			time.Sleep(5 * time.Millisecond)
		}
		cancel()
	}
	b.ReportMetric(float64(del.Microseconds())/1000/float64(b.N), "del-ms/op")
}

// drainOnly is the real tunnel with its servings' Abort hidden: the agent
// then releases a deleted pod as it did before session 20.
type drainOnly struct{ p *tunnel.Proxy }

func (t drainOnly) Serve(pod tunnel.Pod) (Serving, error) {
	s, err := t.p.Serve(pod)
	if err != nil {
		return nil, err
	}
	return drainServing{s}, nil
}

type drainServing struct{ s *tunnel.Serving }

func (d drainServing) Close(ctx context.Context) error       { return d.s.Close(ctx) }
func (d drainServing) CloseIdleOutbound(ctx context.Context) { d.s.CloseIdleOutbound(ctx) }
