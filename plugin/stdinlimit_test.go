package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
)

// padded is a valid ADD config of exactly size bytes: d's config with a
// "pad" string filling the rest (an unknown key, which ADD only warns
// about, so the size alone decides).
func (d *direct) padded(size int) []byte {
	d.t.Helper()
	m := map[string]any{}
	for k, v := range d.conf {
		m[k] = v
	}
	m["pad"] = ""
	b, _ := json.Marshal(m)
	n := size - len(b)
	if n < 0 {
		d.t.Fatalf("config is %d bytes already, cannot pad to %d", len(b), size)
	}
	m["pad"] = strings.Repeat("a", n)
	b, _ = json.Marshal(m)
	if len(b) != size {
		d.t.Fatalf("padded config is %d bytes, want %d", len(b), size)
	}
	return b
}

// endless is a config that never ends: a JSON object whose last string
// goes on for n bytes, generated as it is read, so the test itself does
// not hold it.
type endless struct {
	head []byte
	n    int64
}

func (e *endless) Read(p []byte) (int, error) {
	if len(e.head) > 0 {
		k := copy(p, e.head)
		e.head = e.head[k:]
		return k, nil
	}
	if e.n <= 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > e.n {
		p = p[:e.n]
	}
	for i := range p {
		p[i] = 'a'
	}
	e.n -= int64(len(p))
	return len(p), nil
}

// TestOversizedStdin: the plugin reads at most maxStdin bytes of config.
// A config over the limit is refused with code 7 (invalid network config)
// naming the limit, before the agent is asked; one at the limit is
// served; a caller streaming 256 MiB does not make the plugin allocate
// them (its peak RSS stays far below).
func TestOversizedStdin(t *testing.T) {
	agent := newResponder(t, "mesh")
	d := newDirect(t, "mesh", agent.socket)

	if _, e := runAmbit(t, d.bin, "ADD", d.padded(maxStdin), d.env...); e != nil {
		t.Fatalf("a config of exactly %d bytes: %v", maxStdin, e)
	}
	agent.mu.Lock()
	served := len(agent.reqs)
	agent.mu.Unlock()
	if served != 1 {
		t.Fatalf("a config at the limit reached the agent %d times, want 1", served)
	}
	for _, cmd := range []string{"ADD", "DEL"} {
		_, e := runAmbit(t, d.bin, cmd, d.padded(maxStdin+1), d.env...)
		wantCode(t, cmd+" with a config one byte over the limit", e, types.ErrInvalidNetworkConfig, "larger than 4 MiB")
	}
	agent.mu.Lock()
	served = len(agent.reqs)
	agent.mu.Unlock()
	if served != 1 {
		t.Fatalf("oversized configs reached the agent (%d requests, want 1)", served)
	}

	// 256 MiB streamed: refused, and the plugin's peak RSS shows it did
	// not read them (the Go runtime and binary are ~10 MiB; the limit
	// adds at most 2x maxStdin).
	const streamed = 256 << 20
	cmd := exec.Command(d.bin)
	cmd.Env = append([]string{"CNI_COMMAND=ADD", "CNI_IFNAME=eth0", "CNI_PATH=/nonexistent", "PATH=" + os.Getenv("PATH")}, d.env...)
	cmd.Stdin = &endless{head: []byte(`{"cniVersion":"1.0.0","name":"ambit-test","type":"ambit-cni","pad":"`), n: streamed}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	rss, err := peakRSS(cmd)
	var e types.Error
	if err == nil || json.Unmarshal(stdout.Bytes(), &e) != nil {
		t.Fatalf("256 MiB on stdin: %v, stdout %.300q, stderr %.300q", err, stdout.String(), stderr.String())
	}
	wantCode(t, "256 MiB on stdin", &e, types.ErrInvalidNetworkConfig, "larger than 4 MiB")
	t.Logf("256 MiB on stdin: peak RSS %d MiB, answer %q", rss>>20, e.Msg)
	if rss > 64<<20 {
		t.Fatalf("peak RSS %d MiB reading a 256 MiB stdin: the input was not bounded", rss>>20)
	}
}

// peakRSSHelperEnv names the program a re-executed test binary runs for
// peakRSS.
const peakRSSHelperEnv = "AMBIT_TEST_PEAK_RSS_OF"

// peakRSS runs cmd and returns its peak RSS in bytes, and cmd's error
// (an *exec.ExitError carrying its exit code when it fails).
//
// The rusage of a child of this process cannot answer that: Linux carries
// the parent's RSS high-water mark into the child's ru_maxrss (exec records
// the old, here shared or copied, mm's peak). Under -race this test process
// peaks at ~166 MiB, so ambit-cni "peaked" at 166 MiB whatever it read. So
// a fresh copy of the test binary, which stays small, starts ambit-cni and
// reports its child's rusage on fd 3; stdin, stdout and stderr pass through
// as the same files.
func peakRSS(cmd *exec.Cmd) (int64, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return 0, err
	}
	defer r.Close()
	helper := exec.Command(os.Args[0])
	helper.Env = append(append([]string{}, cmd.Env...), peakRSSHelperEnv+"="+cmd.Path)
	helper.Stdin, helper.Stdout, helper.Stderr = cmd.Stdin, cmd.Stdout, cmd.Stderr
	helper.ExtraFiles = []*os.File{w}
	runErr := helper.Run()
	w.Close()
	b, err := io.ReadAll(r)
	if err != nil {
		return 0, err
	}
	var rss int64
	if _, err := fmt.Sscan(string(b), &rss); err != nil {
		return 0, fmt.Errorf("peak RSS helper reported %q (%v), helper: %v", b, err, runErr)
	}
	return rss, runErr
}

// peakRSSHelper is the test binary's whole run as peakRSS's helper: run
// the program named by peakRSSHelperEnv with this process's stdio and
// environment, write its ru_maxrss in bytes to fd 3, exit with its code.
func peakRSSHelper() int {
	report := os.NewFile(3, "peak-rss")
	cmd := exec.Command(os.Getenv(peakRSSHelperEnv))
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	err := cmd.Run()
	if cmd.ProcessState == nil {
		fmt.Fprintf(os.Stderr, "peak RSS helper: %v\n", err)
		return 2
	}
	ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage)
	if !ok {
		fmt.Fprintln(os.Stderr, "peak RSS helper: no rusage")
		return 2
	}
	fmt.Fprintf(report, "%d", ru.Maxrss<<10) // KiB on Linux
	report.Close()
	return cmd.ProcessState.ExitCode()
}
