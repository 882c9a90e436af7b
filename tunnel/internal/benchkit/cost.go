package benchkit

// What a data path costs at a fixed, moderate load: a user's bill is the
// CPU and memory the proxies take at the rate the workloads actually run,
// not at saturation. Saturation figures on this shared 2-vCPU machine
// follow whatever else runs; CPU per request at a fixed rate moves much
// less, since the work per request is the same whether the machine is
// busy or not.

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// CostMode is one load: Rate requests per second, either on Conns
// keep-alive connections (1 KB request, 1 KB answer on PortRR) or, with
// NewConn, one new connection per request (connect, 1-byte round trip on
// PortPing, close).
type CostMode struct {
	Name    string
	Rate    float64
	NewConn bool
}

// CostOptions size the cost measurement.
type CostOptions struct {
	Conns   int           // keep-alive connections (default 16)
	Workers int           // goroutines opening connections in NewConn mode (default 8)
	Warmup  time.Duration // load before the window, not measured (default 500 ms)
	Window  time.Duration // measured (default 3 s)
	Rounds  int           // interleaved rounds (default 3)
}

func (o CostOptions) withDefaults() CostOptions {
	if o.Conns == 0 {
		o.Conns = 16
	}
	if o.Workers == 0 {
		o.Workers = 8
	}
	if o.Warmup == 0 {
		o.Warmup = 500 * time.Millisecond
	}
	if o.Window == 0 {
		o.Window = 3 * time.Second
	}
	if o.Rounds == 0 {
		o.Rounds = 3
	}
	return o
}

// Cost is one setup's figures at one load.
type Cost struct {
	Name     string
	Mode     string
	Target   float64 // requests/s asked for
	Rate     float64 // requests/s answered over the window
	VCPU     float64 // the proxies' CPU seconds per second
	SelfVCPU float64 // this process's: the clients and the apps
	HostVCPU float64 // the whole machine's busy CPUs (is it saturated?)
	IdleRSS  int64   // the proxies' VmRSS summed, bytes, before any load
	LoadRSS  int64   // its peak during the window
	P50, P99 time.Duration
	Errors   int64 // failed requests in the window
}

// PerK is vCPU per 1,000 requests/s, the figure meshes are compared on.
func (c Cost) PerK() float64 {
	if c.Rate == 0 {
		return 0
	}
	return c.VCPU / (c.Rate / 1000)
}

// Short reports whether the achieved rate fell more than 3 % below the
// target: the figures are then for a lower load than the row says.
func (c Cost) Short() bool { return c.Rate < 0.97*c.Target }

// pacer spreads rate requests/s over workers: worker w's i-th request
// is due at start + w·interval/workers + i·interval, so the workers take
// turns and the sum is one request every 1/rate. A request never starts
// before it is due: over any span d, at most rate·d + workers start,
// whatever the machine does. A worker that falls behind (a slow answer,
// a descheduled client) catches up at once while it is within maxLag of
// its schedule, and beyond that skips the slots it missed rather than
// bursting: the shortfall shows in the achieved rate.
type pacer struct {
	start    time.Time
	end      time.Time // no request starts at or after it
	workers  int
	interval time.Duration // between one worker's requests
	maxLag   time.Duration
}

func newPacer(start time.Time, dur time.Duration, rate float64, workers int) pacer {
	iv := time.Duration(float64(workers) / rate * float64(time.Second))
	return pacer{start: start, end: start.Add(dur), workers: workers, interval: iv, maxLag: max(iv, 20*time.Millisecond)}
}

func (p pacer) due(w, i int) time.Time {
	return p.start.Add(time.Duration(w)*p.interval/time.Duration(p.workers) + time.Duration(i)*p.interval)
}

// run calls do(w) for each worker on its schedule until end, and
// returns when every worker has finished. do gets the time the request
// started; it returns false to stop its worker.
func (p pacer) run(do func(w int, at time.Time) bool) {
	var wg sync.WaitGroup
	for w := 0; w < p.workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; {
				at := p.due(w, i)
				if !at.Before(p.end) {
					return
				}
				now := time.Now()
				if d := at.Sub(now); d > 0 {
					time.Sleep(d)
				} else if -d > p.maxLag {
					// Skip to the first slot not yet due, which
					// keeps the schedule's ceiling (never early).
					i = int(now.Sub(p.due(w, 0))/p.interval) + 1
					continue
				}
				// Woken late past the end: the window's books
				// are closed.
				now = time.Now()
				if !now.Before(p.end) || !do(w, now) {
					return
				}
				i++
			}
		}()
	}
	wg.Wait()
}

// MeasureCost runs load m against s for o.Warmup then o.Window and
// returns the window's figures (IdleRSS is left to the caller, who
// knows when the proxies were last idle).
func MeasureCost(s Setup, m CostMode, o CostOptions) (Cost, error) {
	o = o.withDefaults()
	if m.Rate <= 0 {
		return Cost{}, fmt.Errorf("cost: rate %v: want > 0", m.Rate)
	}
	c := Cost{Name: s.Name, Mode: m.Name, Target: m.Rate}
	workers := o.Conns
	var conns []io.ReadWriteCloser
	if m.NewConn {
		workers = o.Workers
	} else {
		// Dialled before the schedule starts: the keep-alive mode
		// measures requests, not handshakes.
		for i := 0; i < workers; i++ {
			cn, err := s.Dial(PortRR)
			if err != nil {
				for _, x := range conns {
					x.Close()
				}
				return c, fmt.Errorf("dial %d: %w", i, err)
			}
			conns = append(conns, cn)
		}
		defer func() {
			for _, x := range conns {
				x.Close()
			}
		}()
	}
	start := time.Now().Add(10 * time.Millisecond)
	from := start.Add(o.Warmup)
	p := newPacer(start, o.Warmup+o.Window, m.Rate, workers)

	type sample struct {
		at  time.Time
		lat time.Duration
		ok  bool
	}
	per := make([][]sample, workers)
	bufs := make([][]byte, workers)
	for i := range bufs {
		bufs[i] = make([]byte, 1024)
	}
	one := func(w int) error {
		if !m.NewConn {
			cn := conns[w]
			if _, err := cn.Write(bufs[w]); err != nil {
				return err
			}
			_, err := io.ReadFull(cn, bufs[w])
			return err
		}
		cn, err := s.Dial(PortPing)
		if err != nil {
			return err
		}
		defer cn.Close()
		var b [1]byte
		if _, err := cn.Write(b[:]); err != nil {
			return err
		}
		_, err = io.ReadFull(cn, b[:])
		return err
	}

	// The window's books: CPU at its edges, RSS sampled through it.
	var cpu0, cpu1, self0, self1, host0, host1 float64
	var t0, t1 time.Time
	var peak atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		time.Sleep(time.Until(from))
		t0, cpu0, self0, host0 = time.Now(), ext(s), cpuSeconds(), hostBusy()
		tick := time.NewTicker(200 * time.Millisecond)
		defer tick.Stop()
		for {
			if r := PidsRSS(s.Pids); r > peak.Load() {
				peak.Store(r)
			}
			if !time.Now().Add(200 * time.Millisecond).Before(p.end) {
				break
			}
			<-tick.C
		}
		time.Sleep(time.Until(p.end))
		t1, cpu1, self1, host1 = time.Now(), ext(s), cpuSeconds(), hostBusy()
	}()

	var fatal atomic.Value
	p.run(func(w int, at time.Time) bool {
		err := one(w)
		per[w] = append(per[w], sample{at: at, lat: time.Since(at), ok: err == nil})
		if err != nil && !m.NewConn {
			// A keep-alive connection that failed is gone.
			fatal.CompareAndSwap(nil, err)
			return false
		}
		return true
	})
	<-done
	if e := fatal.Load(); e != nil {
		return c, e.(error)
	}
	var lat []time.Duration
	var n int64
	for _, ss := range per {
		for _, x := range ss {
			if x.at.Before(from) {
				continue
			}
			if !x.ok {
				c.Errors++
				continue
			}
			n++
			lat = append(lat, x.lat)
		}
	}
	el := t1.Sub(t0).Seconds()
	if n == 0 || el <= 0 {
		return c, fmt.Errorf("no request answered in the window (%d failed)", c.Errors)
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	c.Rate = float64(n) / el
	c.VCPU = (cpu1 - cpu0) / el
	c.SelfVCPU = (self1 - self0) / el
	c.HostVCPU = (host1 - host0) / el
	c.LoadRSS = peak.Load()
	c.P50, c.P99 = lat[len(lat)/2], lat[len(lat)*99/100]
	return c, nil
}

// RunCost measures every setup at every load, interleaved (each load in
// turn on every setup), o.Rounds times, and returns per setup and load
// the medians. The idle RSS of each setup is read before any load runs:
// after one, Go's heap keeps pages for a while.
func RunCost(tb testing.TB, setups []Setup, modes []CostMode, o CostOptions) []Cost {
	o = o.withDefaults()
	idle := make([]int64, len(setups))
	for i, s := range setups {
		idle[i] = PidsRSS(s.Pids)
	}
	all := make([][][]Cost, len(setups))
	for i := range all {
		all[i] = make([][]Cost, len(modes))
	}
	for r := 0; r < o.Rounds; r++ {
		for j, m := range modes {
			for i, s := range setups {
				c, err := MeasureCost(s, m, o)
				if err != nil {
					tb.Fatalf("%s at %s: %v", s.Name, m.Name, err)
				}
				c.IdleRSS = idle[i]
				all[i][j] = append(all[i][j], c)
			}
		}
	}
	var out []Cost
	for j := range modes {
		for i := range setups {
			out = append(out, costMedian(all[i][j]))
		}
	}
	return out
}

func costMedian(cs []Cost) Cost {
	med := func(f func(Cost) float64) float64 {
		v := make([]float64, len(cs))
		for i, c := range cs {
			v[i] = f(c)
		}
		sort.Float64s(v)
		return v[len(v)/2]
	}
	r := cs[0]
	r.Rate = med(func(c Cost) float64 { return c.Rate })
	r.VCPU = med(func(c Cost) float64 { return c.VCPU })
	r.SelfVCPU = med(func(c Cost) float64 { return c.SelfVCPU })
	r.HostVCPU = med(func(c Cost) float64 { return c.HostVCPU })
	r.LoadRSS = int64(med(func(c Cost) float64 { return float64(c.LoadRSS) }))
	r.P50 = time.Duration(med(func(c Cost) float64 { return float64(c.P50) }))
	r.P99 = time.Duration(med(func(c Cost) float64 { return float64(c.P99) }))
	r.Errors = 0
	for _, c := range cs {
		r.Errors += c.Errors
	}
	return r
}

// perKOf is the vCPU per 1,000 rps of setup name at mode, or 0.
func perKOf(cs []Cost, name, mode string) float64 {
	for _, c := range cs {
		if c.Name == name && c.Mode == mode {
			return c.PerK()
		}
	}
	return 0
}

func ratio(a, b float64) string {
	if b == 0 {
		return "-"
	}
	return strconv.FormatFloat(a/b, 'f', 2, 64)
}

// CostTable formats costs, with each row's vCPU per 1,000 rps as a
// ratio to setups base and other at the same load.
func CostTable(cs []Cost, base, other string) string {
	var sb strings.Builder
	short := func(s string) string { return "×" + strings.Fields(s)[0] }
	fmt.Fprintf(&sb, "%-15s %-13s %9s %7s %10s %7s %7s %15s %8s %8s %5s %5s\n",
		"config", "load", "achieved", "vCPU", "vCPU/krps", short(base), short(other), "RSS idle→load", "p50", "p99", "self", "host")
	for _, c := range cs {
		mark := ""
		if c.Short() {
			mark = "!"
		}
		if c.Errors > 0 {
			mark += fmt.Sprintf(" (%d err)", c.Errors)
		}
		fmt.Fprintf(&sb, "%-15s %-13s %8.0f%1s %7.3f %10.3f %7s %7s %15s %8s %8s %5.2f %5.2f\n",
			c.Name, c.Mode, c.Rate, mark, c.VCPU, c.PerK(),
			ratio(c.PerK(), perKOf(cs, base, c.Mode)), ratio(c.PerK(), perKOf(cs, other, c.Mode)),
			fmt.Sprintf("%.1f→%.1f MB", mb(c.IdleRSS), mb(c.LoadRSS)),
			c.P50.Round(time.Microsecond), c.P99.Round(time.Microsecond), c.SelfVCPU, c.HostVCPU)
	}
	sb.WriteString("(vCPU: the proxies' processes; ! = achieved rate more than 3 % under the target; self = vCPUs of the clients and apps\n" +
		" (this process); host = the machine's busy vCPUs, others' work included: near the CPU count, the load saturates it)\n")
	return sb.String()
}

func mb(b int64) float64 { return float64(b) / (1 << 20) }

// CostVersus compares setup a with b at each load: vCPU per 1,000 rps,
// RSS under load, latency p50 and p99 (each a's over b's).
func CostVersus(cs []Cost, a, b string) string {
	var sb strings.Builder
	for _, ca := range cs {
		if ca.Name != a {
			continue
		}
		for _, cb := range cs {
			if cb.Name != b || cb.Mode != ca.Mode {
				continue
			}
			fmt.Fprintf(&sb, "%s vs %s at %s: vCPU/krps %s, RSS under load %s, p50 %s, p99 %s\n",
				a, b, ca.Mode, ratio(ca.PerK(), cb.PerK()), ratio(float64(ca.LoadRSS), float64(cb.LoadRSS)),
				ratio(float64(ca.P50), float64(cb.P50)), ratio(float64(ca.P99), float64(cb.P99)))
		}
	}
	return sb.String()
}

// ReportCost sets Go benchmark metrics for every cost.
func ReportCost(b *testing.B, cs []Cost) {
	for _, c := range cs {
		n := strings.ReplaceAll(c.Name+"@"+c.Mode, " ", "_")
		b.ReportMetric(c.Rate, n+"-rps")
		b.ReportMetric(c.PerK(), n+"-vCPU/krps")
		b.ReportMetric(mb(c.LoadRSS), n+"-RSS-MB")
		b.ReportMetric(float64(c.P50.Microseconds()), n+"-p50-µs")
		b.ReportMetric(float64(c.P99.Microseconds()), n+"-p99-µs")
	}
}

// PidsRSS is the resident memory of processes pids summed, in bytes;
// a process that is gone counts 0.
func PidsRSS(pids []int) int64 {
	var t int64
	for _, p := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p))
		if err != nil {
			continue
		}
		if n, err := parseVmRSS(b); err == nil {
			t += n
		}
	}
	return t
}

// parseVmRSS reads the VmRSS line of a /proc/<pid>/status ("VmRSS:
// 12345 kB") as bytes. A zombie has no VmRSS line: an error, not 0, so
// a caller cannot mistake a dead proxy for a lean one.
func parseVmRSS(status []byte) (int64, error) {
	sc := bufio.NewScanner(bytes.NewReader(status))
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:")
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) != 2 || f[1] != "kB" {
			return 0, fmt.Errorf("VmRSS line %q: want \"<n> kB\"", sc.Text())
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil || n < 0 {
			return 0, fmt.Errorf("VmRSS line %q: bad count", sc.Text())
		}
		return n << 10, nil
	}
	return 0, errors.New("no VmRSS line")
}

// hostBusy is the machine's busy CPU seconds so far (all CPUs, from
// /proc/stat), or NaN if it cannot be read.
func hostBusy() float64 {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return math.NaN()
	}
	v, err := parseStatBusy(b)
	if err != nil {
		return math.NaN()
	}
	return v
}

// parseStatBusy is the busy time of /proc/stat's "cpu" line in seconds:
// every field but idle and iowait (guest time is already inside user).
func parseStatBusy(stat []byte) (float64, error) {
	line, _, _ := bytes.Cut(stat, []byte("\n"))
	f := strings.Fields(string(line))
	if len(f) < 6 || f[0] != "cpu" {
		return 0, fmt.Errorf("/proc/stat first line %q: want the cpu totals", line)
	}
	var busy float64
	for i, s := range f[1:] {
		if i >= 8 { // guest, guest_nice: counted in user, nice
			break
		}
		n, err := strconv.ParseFloat(s, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/stat cpu field %d %q: %w", i+1, s, err)
		}
		if i == 3 || i == 4 { // idle, iowait
			continue
		}
		busy += n
	}
	return busy / 100, nil // USER_HZ
}
