package redirect

import (
	"context"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/plugin/internal/nstest"
)

// cpuNow is this process's CPU time plus that of its waited-for children
// (iptables-save runs).
func cpuNow(b *testing.B) time.Duration {
	var self, kids unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &self); err != nil {
		b.Fatal(err)
	}
	if err := unix.Getrusage(unix.RUSAGE_CHILDREN, &kids); err != nil {
		b.Fatal(err)
	}
	var t time.Duration
	for _, tv := range []unix.Timeval{self.Utime, self.Stime, kids.Utime, kids.Stime} {
		t += time.Duration(tv.Nano())
	}
	return t
}

// BenchmarkRecheck compares the CPU one Recheck of an unchanged netns
// costs with one Verify of it, the two alternating in the same loop (the
// machine is shared: only the ratio of the same run means much). Each
// iteration is one of each.
func BenchmarkRecheck(b *testing.B) {
	testenv.RequireRoot(b)
	for _, backend := range []Backend{Nftables, IptablesNft} {
		b.Run(string(backend), func(b *testing.B) {
			n := nstest.New(b, "rd")
			spec := DefaultSpec()
			if _, err := Install(context.Background(), n, backend, spec); err != nil {
				b.Fatal(err)
			}
			var c Checked
			for range 2 { // the second check trusts the generation
				if err := Recheck(context.Background(), n, spec, &c); err != nil {
					b.Fatal(err)
				}
			}
			var verify, recheck time.Duration
			for b.Loop() {
				t0 := cpuNow(b)
				if err := Verify(context.Background(), n, spec); err != nil {
					b.Fatal(err)
				}
				t1 := cpuNow(b)
				if err := Recheck(context.Background(), n, spec, &c); err != nil {
					b.Fatal(err)
				}
				t2 := cpuNow(b)
				verify += t1 - t0
				recheck += t2 - t1
			}
			if !c.ok {
				b.Fatal("Recheck did not skip the nf_tables rules")
			}
			b.ReportMetric(float64(verify.Microseconds())/float64(b.N), "cpu-µs/verify")
			b.ReportMetric(float64(recheck.Microseconds())/float64(b.N), "cpu-µs/recheck")
			b.ReportMetric(float64(recheck)/float64(verify), "recheck/verify")
		})
	}
}

// BenchmarkInstall is the agent's part of an enrolled ADD: one Install of
// the default spec into a pod netns (re-installed each iteration, as a
// repeated ADD does: the batch replaces the table, routes are re-asserted),
// wall and CPU per install.
func BenchmarkInstall(b *testing.B) {
	testenv.RequireRoot(b)
	n := nstest.New(b, "ri")
	spec := DefaultSpec()
	var cpu time.Duration
	start := time.Now()
	for b.Loop() {
		t0 := cpuNow(b)
		if _, err := Install(context.Background(), n, Nftables, spec); err != nil {
			b.Fatal(err)
		}
		cpu += cpuNow(b) - t0
	}
	b.ReportMetric(float64(time.Since(start).Microseconds())/float64(b.N), "wall-µs/install")
	b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-µs/install")
}
