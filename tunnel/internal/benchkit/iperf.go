package benchkit

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// PortIperf is where an iperf3 server listens in the destination pod.
// Issue #4 names iperf3 for single-stream throughput: it is the tool a
// platform engineer runs to check a mesh's claim, so the table carries
// its figure beside Throughput's own sink (which also gives CPU per GB).
const PortIperf = 5204

// IperfTarget is where a setup's iperf3 client runs and connects: the
// source pod's netns (by `ip netns` name) and the address that leads,
// through the setup's data path, to PortIperf in the destination pod.
type IperfTarget struct {
	Netns string
	Addr  netip.AddrPort
}

// LocalIperf is the target of a setup whose client connects to a relay
// in its own pod at 17000+port (the relay pair, Istio's pair).
func LocalIperf(netns string) *IperfTarget {
	return &IperfTarget{Netns: netns, Addr: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), 17000+PortIperf)}
}

// HaveIperf says whether iperf3 is installed (hack/deps.sh installs it).
func HaveIperf() bool {
	_, err := exec.LookPath("iperf3")
	return err == nil
}

// ServeIperf runs `iperf3 -s` on PortIperf in netns until the test ends,
// once it listens. Without iperf3 it does nothing (Iperf then reports
// that, and Run leaves the column empty).
func ServeIperf(tb testing.TB, netns string) {
	if !HaveIperf() {
		return
	}
	cmd := exec.Command("ip", "netns", "exec", netns, "iperf3", "-s", "-p", itoa(PortIperf))
	if err := cmd.Start(); err != nil {
		tb.Fatalf("iperf3 server in %s: %v", netns, err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	tb.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
	})
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		out, _ := exec.Command("ip", "netns", "exec", netns, "ss", "-Hltn", "sport = :"+itoa(PortIperf)).Output()
		if strings.Contains(string(out), "LISTEN") {
			return
		}
		select {
		case <-exited:
			tb.Fatalf("iperf3 server in %s exited before it listened", netns)
		default:
		}
		if time.Now().After(deadline) {
			tb.Fatalf("iperf3 server in %s not listening on %d after 10 s", netns, PortIperf)
		}
	}
}

// Iperf runs one iperf3 client test of secs seconds (one stream, its
// defaults otherwise: no omitted warm-up) through s's data path and
// returns the receiver's Gb/s.
func Iperf(s Setup, secs int) (float64, error) {
	if s.Iperf == nil {
		return 0, fmt.Errorf("%s: no iperf3 target", s.Name)
	}
	if !HaveIperf() {
		return 0, errors.New("iperf3 is not installed (hack/deps.sh installs it)")
	}
	t := s.Iperf
	out, err := exec.Command("ip", "netns", "exec", t.Netns, "iperf3", "-J", "-c", t.Addr.Addr().String(),
		"-p", strconv.Itoa(int(t.Addr.Port())), "-t", strconv.Itoa(secs), "--connect-timeout", "5000").Output()
	bps, perr := parseIperf(out)
	if perr != nil {
		if err != nil {
			return 0, fmt.Errorf("iperf3 -c %s: %v: %v", t.Addr, err, perr)
		}
		return 0, fmt.Errorf("iperf3 -c %s: %v", t.Addr, perr)
	}
	return bps / 1e9, nil
}

// parseIperf reads the receiver's bits per second from iperf3's JSON
// report, or the error iperf3 reported in it.
func parseIperf(out []byte) (float64, error) {
	var r struct {
		Error string `json:"error"`
		End   struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
				Bytes         int64   `json:"bytes"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal(out, &r); err != nil {
		return 0, fmt.Errorf("reading its JSON report: %v", err)
	}
	if r.Error != "" {
		return 0, errors.New(r.Error)
	}
	if r.End.SumReceived.Bytes <= 0 || r.End.SumReceived.BitsPerSecond <= 0 {
		return 0, errors.New("its report shows nothing received")
	}
	return r.End.SumReceived.BitsPerSecond, nil
}
