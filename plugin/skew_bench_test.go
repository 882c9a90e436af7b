package main

import (
	"bytes"
	"encoding/json"
	"net"
	"path/filepath"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/plugin/cniproto/cniprototest"
	"github.com/ambit-mesh/ambit/plugin/internal/nstest"
)

// BenchmarkAddToOlderAgent measures what an ADD costs while the plugin on
// disk is newer than the agent that owns the socket (an upgrade's surge,
// from the new agent's start until it is ready and takes the socket): the
// version 2 agent refuses the version 3 request and the plugin asks
// again. Interleaved against a stand-in of the same shape that serves
// version 3 at once, so both see the same machine load; "exchanges" is
// the agent round trips per ADD.
func BenchmarkAddToOlderAgent(b *testing.B) {
	testenv.RequireRoot(b)
	const samples = 200
	bin := testenv.Binary(b, "ambit-cni")
	dir := b.TempDir()
	podNS := nstest.New(b, "pod")
	var oldExchanges, curExchanges atomic.Int64
	oldSock, curSock := filepath.Join(dir, "v2.sock"), filepath.Join(dir, "v3.sock")
	v2 := cniprototest.Version2Agent(nil)
	cniprototest.Serve(b, oldSock, func(c *net.UnixConn) { oldExchanges.Add(1); v2(c) })
	cniprototest.Serve(b, curSock, func(c *net.UnixConn) { curExchanges.Add(1); skipAgent(c) })
	conf := func(socket string) []byte {
		m := map[string]any{"cniVersion": "1.0.0", "name": "ambit-test", "type": "ambit-cni", "agentSocket": socket,
			"logFile": filepath.Join(dir, "cni.log"), "snapshotFile": filepath.Join(dir, "snapshot.json"), "agentTimeout": "2s",
			"prevResult": map[string]any{"cniVersion": "1.0.0", "ips": []any{map[string]any{"address": "10.9.0.5/24"}}}}
		out, _ := json.Marshal(m)
		return out
	}
	oldConf, curConf := conf(oldSock), conf(curSock)
	env := []string{"CNI_CONTAINERID=ctr-1", "CNI_NETNS=" + podNS.Path(), "CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=mesh;K8S_POD_NAME=web-0;K8S_POD_UID=u1"}
	var old, cur, oldCPU, curCPU []time.Duration
	for i := 0; i < b.N*samples; i++ {
		for _, s := range []struct {
			conf []byte
			out  *[]time.Duration
			cpu  *[]time.Duration
		}{{curConf, &cur, &curCPU}, {oldConf, &old, &oldCPU}} {
			cpu0, start := childCPU(), time.Now()
			if _, e := runAmbit(b, bin, "ADD", s.conf, env...); e != nil {
				b.Fatalf("ADD: %v", e)
			}
			*s.out = append(*s.out, time.Since(start))
			*s.cpu = append(*s.cpu, childCPU()-cpu0)
		}
	}
	q := func(d []time.Duration, q float64) float64 {
		s := slices.Clone(d)
		slices.Sort(s)
		return float64(s[int(q*float64(len(s)-1))]) / 1e6
	}
	b.ReportMetric(q(cur, .5), "p50-ms-current")
	b.ReportMetric(q(old, .5), "p50-ms-older")
	b.ReportMetric(q(old, .5)-q(cur, .5), "p50-ms-added")
	b.ReportMetric(q(old, .99)-q(cur, .99), "p99-ms-added")
	b.ReportMetric(q(oldCPU, .5)-q(curCPU, .5), "cpu-p50-ms-added")
	b.ReportMetric(q(curCPU, .5), "cpu-p50-ms-current")
	b.ReportMetric(float64(oldExchanges.Load())/float64(len(old)), "exchanges-older")
	b.ReportMetric(float64(curExchanges.Load())/float64(len(cur)), "exchanges-current")
}

// skipAgent is Version2Agent's shape for a current agent: one decode of
// the request, answered "skip" in its version.
func skipAgent(c *net.UnixConn) {
	msg, err := cniprototest.ReadRequest(c)
	if err != nil {
		return
	}
	var req struct {
		Version int `json:"version"`
	}
	if err := json.NewDecoder(bytes.NewReader(msg)).Decode(&req); err != nil {
		return
	}
	out, _ := json.Marshal(map[string]any{"version": req.Version, "decision": "skip"})
	c.Write(out)
}
