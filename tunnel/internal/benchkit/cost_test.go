package benchkit

import (
	"net"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// loopback serves the apps on 127.0.0.1 (any port) in this netns: no
// root needed, and a setup whose proxies are this process.
func loopback(t *testing.T) Setup {
	t.Helper()
	var mu sync.Mutex
	addrs := map[uint16]string{}
	ServeApps(func(port uint16) net.Listener {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		mu.Lock()
		addrs[port] = ln.Addr().String()
		mu.Unlock()
		return ln
	})
	return Setup{Name: "loopback", Dial: func(port uint16) (net.Conn, error) {
		mu.Lock()
		a := addrs[port]
		mu.Unlock()
		return net.Dial("tcp", a)
	}, CPU: cpuSeconds, Pids: []int{os.Getpid()}}
}

// The pacer never starts a request before it is due, so over its run
// at most rate·duration + workers requests start, however fast the
// answers come (a loopback echo answers in tens of µs: unpaced, the
// same loop would send tens of thousands). A worker stalled far behind
// skips its missed slots instead of bursting through them.
func TestPacerCeiling(t *testing.T) {
	s := loopback(t)
	const (
		rate    = 1000.0
		workers = 4
		dur     = 600 * time.Millisecond
		stall   = 250 * time.Millisecond
	)
	conns := make([]net.Conn, workers)
	for i := range conns {
		c, err := s.Dial(PortRR)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		conns[i] = c
	}
	p := newPacer(time.Now(), dur, rate, workers)
	var counts [workers]int
	var total, failed atomic.Int64
	var stalledUntil time.Time
	var mu sync.Mutex
	var starts []time.Time
	p.run(func(w int, at time.Time) bool {
		if at.Before(p.start) || !at.Before(p.end) {
			t.Errorf("worker %d started at %v, outside the run [%v, %v)", w, at, p.start, p.end)
		}
		mu.Lock()
		starts = append(starts, at)
		mu.Unlock()
		buf := make([]byte, 1024)
		if _, err := conns[w].Write(buf); err != nil {
			failed.Add(1)
			return false
		}
		if _, err := readFull(conns[w], buf); err != nil {
			failed.Add(1)
			return false
		}
		counts[w]++
		total.Add(1)
		if w == 0 && counts[0] == 1 {
			time.Sleep(stall)
			stalledUntil = time.Now()
		}
		return true
	})
	if failed.Load() != 0 {
		t.Fatalf("%d round trips failed on a loopback echo", failed.Load())
	}
	if n, ceiling := total.Load(), int64(rate*dur.Seconds())+workers; n > ceiling || n == 0 {
		t.Errorf("%d requests started in %v at %v/s over %d workers, want 1..%d", n, dur, rate, workers, ceiling)
	}
	// And so over every span from the start: the k-th request did not
	// start before k-workers slots were due.
	sort.Slice(starts, func(i, j int) bool { return starts[i].Before(starts[j]) })
	for k, at := range starts {
		if ceiling := rate*at.Sub(p.start).Seconds() + workers; float64(k+1) > ceiling {
			t.Fatalf("%d requests started in the first %v at %v/s over %d workers, want at most %.0f", k+1, at.Sub(p.start), rate, workers, ceiling)
		}
	}
	// After the stall, worker 0 has at most the slots still ahead of
	// it, plus those within maxLag it may catch up on, plus its first.
	left := p.end.Sub(stalledUntil) + p.maxLag
	if most := 2 + int(left/p.interval); counts[0] > most {
		t.Errorf("stalled worker made %d requests, want at most %d: it burst through the slots it missed", counts[0], most)
	}
}

func readFull(c net.Conn, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		m, err := c.Read(b[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// MeasureCost's books on a loopback echo: every request answered, the
// latency and memory filled in, for both loads.
func TestMeasureCostLoopback(t *testing.T) {
	s := loopback(t)
	o := CostOptions{Conns: 4, Workers: 2, Warmup: 100 * time.Millisecond, Window: 400 * time.Millisecond}
	for _, m := range []CostMode{{Name: "keep-alive", Rate: 400}, {Name: "conn/req", Rate: 100, NewConn: true}} {
		c, err := MeasureCost(s, m, o)
		if err != nil {
			t.Fatalf("%s: %v", m.Name, err)
		}
		if c.Errors != 0 || c.Rate <= 0 || c.P50 <= 0 || c.P99 < c.P50 || c.LoadRSS <= 0 || c.VCPU < 0 {
			t.Errorf("%s: %+v, want answered requests, a latency, an RSS", m.Name, c)
		}
		if c.Name != "loopback" || c.Mode != m.Name || c.Target != m.Rate {
			t.Errorf("%s: labelled %q %q %v", m.Name, c.Name, c.Mode, c.Target)
		}
	}
	if _, err := MeasureCost(s, CostMode{Name: "zero", Rate: 0}, o); err == nil || !strings.Contains(err.Error(), "rate") {
		t.Errorf("rate 0: err %v, want one naming the rate", err)
	}
}

const statusFixture = `Name:	ambit-agent
Umask:	0022
State:	S (sleeping)
Tgid:	4242
Pid:	4242
VmPeak:	 1259424 kB
VmSize:	 1259424 kB
VmHWM:	   18940 kB
VmRSS:	   17508 kB
RssAnon:	    6444 kB
RssFile:	   11064 kB
Threads:	9
`

func TestParseVmRSS(t *testing.T) {
	n, err := parseVmRSS([]byte(statusFixture))
	if err != nil || n != 17508<<10 {
		t.Errorf("parseVmRSS = %d, %v; want %d (VmRSS, not VmHWM or RssAnon)", n, err, 17508<<10)
	}
	for name, in := range map[string]string{
		"zombie (no VmRSS)": "Name:\tx\nState:\tZ (zombie)\n",
		"no unit":           "VmRSS:\t12\n",
		"not a number":      "VmRSS:\t1x2 kB\n",
		"negative":          "VmRSS:\t-5 kB\n",
		"empty":             "",
	} {
		if n, err := parseVmRSS([]byte(in)); err == nil {
			t.Errorf("%s: parseVmRSS = %d, want an error", name, n)
		}
	}
	if PidsRSS([]int{os.Getpid()}) <= 0 {
		t.Error("PidsRSS of this process is 0")
	}
	if PidsRSS([]int{-1}) != 0 {
		t.Error("PidsRSS of no process is not 0")
	}
}

func TestParseStatBusy(t *testing.T) {
	// user nice system idle iowait irq softirq steal guest guest_nice
	in := "cpu  1000 20 300 5000 40 5 6 7 900 9\ncpu0 500 10 150 2500 20 2 3 3 450 4\n"
	got, err := parseStatBusy([]byte(in))
	if want := (1000 + 20 + 300 + 5 + 6 + 7) / 100.0; err != nil || got != want {
		t.Errorf("parseStatBusy = %v, %v; want %v (no idle, iowait, or guest twice)", got, err, want)
	}
	for _, bad := range []string{"", "intr 1 2 3\n", "cpu 1 2 x 4 5\n"} {
		if _, err := parseStatBusy([]byte(bad)); err == nil {
			t.Errorf("parseStatBusy(%q): no error", bad)
		}
	}
}
