// Package benchkit measures a data path the same way for every
// configuration (direct, relay pair, Istio Go HBONE, Ambit): single-stream
// throughput, 1 KB request/response latency on a warm connection, new
// connections per second, and CPU seconds per GB; configurations are run
// interleaved, several rounds, and the medians are printed as a table
// with ratios, since the machine is shared and noisy.
package benchkit

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// App ports served in the destination pod.
const (
	PortSink = 5201 // reads an 8-byte length, then that many bytes, answers the count
	PortRR   = 5202 // echoes 1 KB messages
	PortPing = 5203 // answers one byte, closes
)

// ServeApps runs the destination apps on listeners from listen.
func ServeApps(listen func(port uint16) net.Listener) {
	sink := listen(PortSink)
	go accept(sink, func(c net.Conn) {
		// Length-prefixed rather than to EOF: Istio's Go dialer hands
		// out a net.Pipe, which cannot half-close.
		var hdr [8]byte
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return
		}
		want := int64(binary.BigEndian.Uint64(hdr[:]))
		n, _ := io.CopyBuffer(io.Discard, io.LimitReader(c, want), make([]byte, 256<<10))
		var b [8]byte
		binary.BigEndian.PutUint64(b[:], uint64(n))
		c.Write(b[:])
	})
	go accept(listen(PortRR), func(c net.Conn) {
		buf := make([]byte, 1024)
		for {
			if _, err := io.ReadFull(c, buf); err != nil {
				return
			}
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	})
	go accept(listen(PortPing), func(c net.Conn) {
		var b [1]byte
		if _, err := io.ReadFull(c, b[:]); err == nil {
			c.Write(b[:])
		}
	})
}

func accept(ln net.Listener, fn func(net.Conn)) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() { defer c.Close(); fn(c) }()
	}
}

// Setup is one configuration: Dial connects the client (in the source
// pod) to an app port of the destination pod, through the data path.
// CPU returns extra CPU seconds spent outside this process (proxies in
// other processes); nil for none.
type Setup struct {
	Name string
	Dial func(port uint16) (net.Conn, error)
	CPU  func() float64
	// Pids are the proxies' processes, if any (for perf/strace).
	Pids []int
	// Iperf is where an iperf3 client measures the path (nil: not
	// measured).
	Iperf *IperfTarget
}

// Result is one configuration's figures.
type Result struct {
	Name      string
	Gbps      float64
	IperfGbps float64 // iperf3's figure, 0 if not measured
	P50, P99  time.Duration
	ConnsPerS float64
	CPUPerGB  float64
}

// Options size the measurements.
type Options struct {
	Bytes    int64         // per throughput run (default 512 MiB)
	RTTs     int           // round trips per latency run (default 3000)
	ConnFor  time.Duration // per connection-rate run (default 1.5 s)
	ConnConc int           // concurrent connecting clients (default 4)
	Rounds   int           // interleaved rounds (default 3)
	// IperfSecs is each iperf3 run's length (0: no iperf3 runs; they
	// need iperf3 and a setup with an Iperf target).
	IperfSecs int
}

func (o Options) withDefaults() Options {
	if o.Bytes == 0 {
		o.Bytes = 512 << 20
	}
	if o.RTTs == 0 {
		o.RTTs = 3000
	}
	if o.ConnFor == 0 {
		o.ConnFor = 1500 * time.Millisecond
	}
	if o.ConnConc == 0 {
		o.ConnConc = 4
	}
	if o.Rounds == 0 {
		o.Rounds = 3
	}
	return o
}

// cpuSeconds is this process's user+system CPU time.
func cpuSeconds() float64 {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return float64(ru.Utime.Sec+ru.Stime.Sec) + float64(ru.Utime.Usec+ru.Stime.Usec)/1e6
}

// ProcCPU is the CPU seconds used so far by process pid (for proxies
// running as child processes).
func ProcCPU(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	f := strings.Fields(s[i+2:])
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / 100 // USER_HZ
}

// Throughput sends n bytes on one connection; returns Gb/s and CPU s/GB.
func Throughput(s Setup, n int64) (gbps, cpuPerGB float64, err error) {
	c, err := s.Dial(PortSink)
	if err != nil {
		return 0, 0, err
	}
	defer c.Close()
	buf := make([]byte, 256<<10)
	cpu0, ext0 := cpuSeconds(), ext(s)
	t0 := time.Now()
	var hdr [8]byte
	binary.BigEndian.PutUint64(hdr[:], uint64(n))
	if _, err := c.Write(hdr[:]); err != nil {
		return 0, 0, err
	}
	for sent := int64(0); sent < n; sent += int64(len(buf)) {
		if _, err := c.Write(buf); err != nil {
			return 0, 0, err
		}
	}
	var b [8]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		return 0, 0, fmt.Errorf("reading count: %w", err)
	}
	el := time.Since(t0)
	if got := int64(binary.BigEndian.Uint64(b[:])); got < n {
		return 0, 0, fmt.Errorf("sink got %d of %d bytes", got, n)
	}
	cpu := cpuSeconds() - cpu0 + ext(s) - ext0
	return float64(n) * 8 / el.Seconds() / 1e9, cpu / (float64(n) / 1e9), nil
}

func ext(s Setup) float64 {
	if s.CPU == nil {
		return 0
	}
	return s.CPU()
}

// Latency does n 1 KB round trips on one warm connection.
func Latency(s Setup, n int) (p50, p99 time.Duration, err error) {
	d, err := latencies(s, n)
	if err != nil {
		return 0, 0, err
	}
	return d[n/2], d[n*99/100], nil
}

// LatencyTail is Latency's p99.9 and maximum: a stall of the proxy
// that catches one round trip in a thousand (a blocking system call
// holding a one-P agent's only P) shows there and not in the p99.
func LatencyTail(s Setup, n int) (p999, max time.Duration, err error) {
	d, err := latencies(s, n)
	if err != nil {
		return 0, 0, err
	}
	return d[n*999/1000], d[n-1], nil
}

// latencies is n warm 1 KB round trips, sorted.
func latencies(s Setup, n int) ([]time.Duration, error) {
	c, err := s.Dial(PortRR)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	buf := make([]byte, 1024)
	for i := 0; i < 50; i++ { // warm up
		c.Write(buf)
		if _, err := io.ReadFull(c, buf); err != nil {
			return nil, err
		}
	}
	d := make([]time.Duration, n)
	for i := range d {
		t0 := time.Now()
		c.Write(buf)
		if _, err := io.ReadFull(c, buf); err != nil {
			return nil, err
		}
		d[i] = time.Since(t0)
	}
	sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
	return d, nil
}

// ConnRate opens connections (connect, one 1-byte round trip, close) from
// conc clients for dur; returns connections per second.
func ConnRate(s Setup, dur time.Duration, conc int) (float64, error) {
	rate, _, err := ConnCost(s, dur, conc)
	return rate, err
}

// ConnCost is ConnRate that also returns the proxies' CPU time per
// connection (the setup's other processes, not the clients and apps of
// this one). On a shared machine the CPU a connection costs moves less
// than the rate, which follows whatever else is running.
func ConnCost(s Setup, dur time.Duration, conc int) (rate float64, cpuPerConn time.Duration, err error) {
	ext0 := ext(s)
	rate, n, err := connRate(s, dur, conc)
	if err != nil || n == 0 {
		return rate, 0, err
	}
	return rate, time.Duration((ext(s) - ext0) / float64(n) * float64(time.Second)), nil
}

func connRate(s Setup, dur time.Duration, conc int) (float64, int64, error) {
	var n atomic.Int64
	var firstErr atomic.Value
	ctx, cancel := context.WithTimeout(context.Background(), dur)
	defer cancel()
	t0 := time.Now()
	var wg sync.WaitGroup
	for i := 0; i < conc; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var b [1]byte
			for ctx.Err() == nil {
				c, err := s.Dial(PortPing)
				if err != nil {
					firstErr.CompareAndSwap(nil, err)
					return
				}
				c.Write(b[:])
				_, err = io.ReadFull(c, b[:])
				c.Close()
				if err != nil {
					firstErr.CompareAndSwap(nil, err)
					return
				}
				n.Add(1)
			}
		}()
	}
	wg.Wait()
	if e := firstErr.Load(); e != nil {
		return 0, 0, e.(error)
	}
	return float64(n.Load()) / time.Since(t0).Seconds(), n.Load(), nil
}

// Run measures every setup, interleaved, Rounds times, and returns the
// per-setup medians.
func Run(tb testing.TB, setups []Setup, o Options) []Result {
	o = o.withDefaults()
	all := make([][]Result, len(setups))
	for r := 0; r < o.Rounds; r++ {
		for i, s := range setups {
			var res Result
			res.Name = s.Name
			var err error
			if res.Gbps, res.CPUPerGB, err = Throughput(s, o.Bytes); err != nil {
				tb.Fatalf("%s throughput: %v", s.Name, err)
			}
			if o.IperfSecs > 0 && s.Iperf != nil {
				if res.IperfGbps, err = Iperf(s, o.IperfSecs); err != nil {
					tb.Fatalf("%s iperf3: %v", s.Name, err)
				}
			}
			if res.P50, res.P99, err = Latency(s, o.RTTs); err != nil {
				tb.Fatalf("%s latency: %v", s.Name, err)
			}
			if res.ConnsPerS, err = ConnRate(s, o.ConnFor, o.ConnConc); err != nil {
				tb.Fatalf("%s connections: %v", s.Name, err)
			}
			all[i] = append(all[i], res)
		}
	}
	return Medians(all)
}

// Medians reduces per-setup rounds (all[i] = setup i's rounds) to one
// Result per setup, figure by figure.
func Medians(all [][]Result) []Result {
	out := make([]Result, 0, len(all))
	for _, rs := range all {
		if len(rs) == 0 {
			continue
		}
		out = append(out, Result{
			Name:      rs[0].Name,
			Gbps:      median(rs, func(r Result) float64 { return r.Gbps }),
			IperfGbps: median(rs, func(r Result) float64 { return r.IperfGbps }),
			P50:       time.Duration(median(rs, func(r Result) float64 { return float64(r.P50) })),
			P99:       time.Duration(median(rs, func(r Result) float64 { return float64(r.P99) })),
			ConnsPerS: median(rs, func(r Result) float64 { return r.ConnsPerS }),
			CPUPerGB:  median(rs, func(r Result) float64 { return r.CPUPerGB }),
		})
	}
	return out
}

func median(rs []Result, f func(Result) float64) float64 {
	v := make([]float64, len(rs))
	for i, r := range rs {
		v[i] = f(r)
	}
	sort.Float64s(v)
	return v[len(v)/2]
}

// find is the result named name, or nil.
func find(rs []Result, name string) *Result {
	for i := range rs {
		if rs[i].Name == name {
			return &rs[i]
		}
	}
	return nil
}

// Table formats results with ratios against the setup named base; the
// iperf3 columns only when some result has an iperf3 figure.
func Table(rs []Result, base string) string {
	b := find(rs, base)
	withIperf := false
	for _, r := range rs {
		withIperf = withIperf || r.IperfGbps > 0
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "%-18s %10s %8s %10s %10s %9s %10s %10s %9s", "config", "Gb/s", "×"+base, "RTT p50", "RTT p99", "×"+base, "conns/s", "×"+base, "CPU s/GB")
	if withIperf {
		fmt.Fprintf(&sb, " %12s %8s", "iperf3 Gb/s", "×"+base)
	}
	sb.WriteString("\n")
	for _, r := range rs {
		rt, rp, rc, ri := 0.0, 0.0, 0.0, 0.0
		if b != nil {
			rt, rp, rc = r.Gbps/b.Gbps, float64(r.P50)/float64(b.P50), r.ConnsPerS/b.ConnsPerS
			if b.IperfGbps > 0 {
				ri = r.IperfGbps / b.IperfGbps
			}
		}
		fmt.Fprintf(&sb, "%-18s %10.2f %8.2f %10s %10s %9.2f %10.0f %10.2f %9.2f", r.Name, r.Gbps, rt,
			r.P50.Round(time.Microsecond), r.P99.Round(time.Microsecond), rp, r.ConnsPerS, rc, r.CPUPerGB)
		if withIperf {
			fmt.Fprintf(&sb, " %12.2f %8.2f", r.IperfGbps, ri)
		}
		sb.WriteString("\n")
	}
	return sb.String()
}

// Goals checks result name against the data path's goals (issue #4), as
// ratios to base measured in the same run: throughput at least 0.6×, RTT
// p50 at most 1.2×, new connections per second at least 1.0×.
func Goals(rs []Result, base, name string) string {
	b, r := find(rs, base), find(rs, name)
	if b == nil || r == nil || b.Gbps == 0 || b.P50 == 0 || b.ConnsPerS == 0 {
		return ""
	}
	verdict := func(ok bool) string {
		if ok {
			return "met"
		}
		return "NOT MET"
	}
	tp, rtt, cps := r.Gbps/b.Gbps, float64(r.P50)/float64(b.P50), r.ConnsPerS/b.ConnsPerS
	line := fmt.Sprintf("%s goals ×%s: throughput %.2f ≥ 0.6 %s, RTT p50 %.2f ≤ 1.2 %s, conns/s %.2f ≥ 1.0 %s",
		name, base, tp, verdict(tp >= 0.6), rtt, verdict(rtt <= 1.2), cps, verdict(cps >= 1.0))
	if b.IperfGbps > 0 && r.IperfGbps > 0 {
		ip := r.IperfGbps / b.IperfGbps
		line += fmt.Sprintf(", iperf3 throughput %.2f ≥ 0.6 %s", ip, verdict(ip >= 0.6))
	}
	return line
}

// Report sets Go benchmark metrics for every result.
func Report(b *testing.B, rs []Result) {
	for _, r := range rs {
		n := strings.ReplaceAll(r.Name, " ", "_")
		b.ReportMetric(r.Gbps, n+"-Gb/s")
		if r.IperfGbps > 0 {
			b.ReportMetric(r.IperfGbps, n+"-iperf3-Gb/s")
		}
		b.ReportMetric(float64(r.P50.Microseconds()), n+"-p50-µs")
		b.ReportMetric(float64(r.P99.Microseconds()), n+"-p99-µs")
		b.ReportMetric(r.ConnsPerS, n+"-conns/s")
		b.ReportMetric(r.CPUPerGB, n+"-CPU-s/GB")
	}
}

// Versus compares two results figure by figure ("better" means higher
// throughput and rate, lower latency and CPU).
func Versus(rs []Result, a, b string) string {
	ra, rb := find(rs, a), find(rs, b)
	if ra == nil || rb == nil {
		return ""
	}
	mark := func(better bool) string {
		if better {
			return "better"
		}
		return "WORSE"
	}
	line := fmt.Sprintf("%s vs %s: throughput %.2fx (%s), RTT p50 %.2fx (%s), RTT p99 %.2fx (%s), conns/s %.2fx (%s), CPU/GB %.2fx (%s)",
		a, b,
		ra.Gbps/rb.Gbps, mark(ra.Gbps > rb.Gbps),
		float64(ra.P50)/float64(rb.P50), mark(ra.P50 < rb.P50),
		float64(ra.P99)/float64(rb.P99), mark(ra.P99 < rb.P99),
		ra.ConnsPerS/rb.ConnsPerS, mark(ra.ConnsPerS > rb.ConnsPerS),
		ra.CPUPerGB/rb.CPUPerGB, mark(ra.CPUPerGB < rb.CPUPerGB))
	if ra.IperfGbps > 0 && rb.IperfGbps > 0 {
		line += fmt.Sprintf(", iperf3 %.2fx (%s)", ra.IperfGbps/rb.IperfGbps, mark(ra.IperfGbps > rb.IperfGbps))
	}
	return line
}
