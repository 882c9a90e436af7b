package health

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambit-mesh/ambit/internal/testenv"
)

// A loop is stalled only once its due turn is more than its grace past:
// not before its first beat, not while it rests (waits for an event that
// need not come), not while it beats as it works.
func TestHeartbeatDueAndGrace(t *testing.T) {
	h := NewHeartbeat("loop", 100*time.Millisecond)
	if err := h.Check(); err != nil {
		t.Fatalf("before its first beat: %v", err)
	}
	h.Beat(50 * time.Millisecond)
	if err := h.Check(); err != nil {
		t.Fatalf("right after a beat: %v", err)
	}
	time.Sleep(250 * time.Millisecond) // past due (50 ms) + grace (100 ms)
	err := h.Check()
	if err == nil || !strings.Contains(err.Error(), "stalled: last turned") {
		t.Fatalf("past its due time and grace: %v", err)
	}
	h.Rest()
	time.Sleep(250 * time.Millisecond)
	if err := h.Check(); err != nil {
		t.Fatalf("resting: %v", err)
	}
	for range 5 { // working: progress every 50 ms, never 100 ms late
		h.Beat(0)
		time.Sleep(50 * time.Millisecond)
		if err := h.Check(); err != nil {
			t.Fatalf("making progress: %v", err)
		}
	}
}

// A loop expected to turn (it started work) and never turning is a
// stall once due plus grace have passed; its first turn clears it, and
// Expect after a rest makes the loop due again.
func TestHeartbeatExpect(t *testing.T) {
	h := NewHeartbeat("loop", 100*time.Millisecond)
	h.Expect(50 * time.Millisecond)
	if err := h.Check(); err != nil {
		t.Fatalf("expected, not yet due: %v", err)
	}
	if _, ok := h.Age(); ok {
		t.Fatal("Expect recorded a turn")
	}
	time.Sleep(250 * time.Millisecond)
	if err := h.Check(); err == nil || !strings.Contains(err.Error(), "stalled: never turned") {
		t.Fatalf("never turned past due and grace: %v", err)
	}
	h.Beat(time.Hour)
	if err := h.Check(); err != nil {
		t.Fatalf("after its first turn: %v", err)
	}
	h.Rest()
	h.Expect(-time.Second) // due a second ago: past the grace already
	if err := h.Check(); err == nil || !strings.Contains(err.Error(), "stalled: last turned") {
		t.Fatalf("expected again after a rest, long past due: %v", err)
	}
}

// The node's wall clock stepping is no stall, and hides none. NTP
// correcting a node that booted with a wrong clock, or a VM or laptop
// resumed from suspend, moves CLOCK_REALTIME by minutes at once while
// CLOCK_MONOTONIC (Go's timers, the loops' tickers) does not move: a
// loop that turned a moment ago is on time. Before, the heartbeat kept
// wall-clock stamps: a 10 min step forward made every loop "10m past
// its due time" at once, /healthz 503 until each loop turned again (the
// certificate loop only every 5 min), and the kubelet restarted a
// healthy agent, resetting every connection of the node; a step back
// hid a real stall for as long as the step. The step is simulated
// (wallNow): stepping this shared machine's clock would disturb
// everything else on it.
func TestHeartbeatIgnoresWallClockSteps(t *testing.T) {
	var step atomic.Int64
	wallNow = func() time.Time { return time.Now().Add(time.Duration(step.Load())) }
	t.Cleanup(func() { wallNow = time.Now })
	reg := prometheus.NewRegistry()
	s := New(reg)
	reg.MustRegister(s.Collector())
	onTime := NewHeartbeat("on-time", 2*time.Minute)
	s.AddHeartbeat(onTime)
	onTime.Beat(time.Minute)

	step.Store(int64(10 * time.Minute))
	if err := onTime.Check(); err != nil {
		t.Errorf("after a 10 min step forward, a loop that turned a moment ago: %v", err)
	}
	rec := httptest.NewRecorder()
	s.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/healthz", nil))
	if rec.Code != 200 || !strings.Contains(rec.Body.String(), "on-time: last turned ") || strings.Contains(rec.Body.String(), "m0s ago") {
		t.Errorf("/healthz after a 10 min step forward: %d %q", rec.Code, rec.Body.String())
	}
	// time() minus the metric, what a dashboard alerts on, is the
	// loop's real age on the clock of the moment.
	v := testenv.Metric(t, reg, "ambit_agent_loop_last_turn_timestamp_seconds", map[string]string{"loop": "on-time"})
	if age := wallNow().Sub(time.Unix(0, int64(v*1e9))); age < -time.Second || age > 30*time.Second {
		t.Errorf("time() - ambit_agent_loop_last_turn_timestamp_seconds = %s after the step, want the real age (~0)", age)
	}

	step.Store(0)
	stuck := NewHeartbeat("stuck", 50*time.Millisecond)
	stuck.Beat(0)
	step.Store(int64(-10 * time.Minute))
	time.Sleep(150 * time.Millisecond) // past grace on the monotonic clock
	if err := stuck.Check(); err == nil {
		t.Error("a loop stalled past its grace passes once the wall clock stepped back 10 min")
	}
}

// A stalled loop's /healthz names it and how long ago it turned, the
// metrics show it, the log says it (the kubelet's event shows only the
// status code) and the goroutines are written once per episode, so what
// held the loop survives the restart.
func TestHealthzNamesTheStalledLoop(t *testing.T) {
	reg := prometheus.NewRegistry()
	s := New(reg)
	reg.MustRegister(s.Collector())
	var logged testenv.Buffer
	s.SetLogger(slog.New(slog.NewTextHandler(&logged, nil)))
	dir := t.TempDir()
	s.SetStallDump(dir, "20260101T000000.000000000Z-ab12")
	dump := filepath.Join(dir, "goroutines-at-stall-20260101T000000.000000000Z-ab12.txt")
	ok, stuck := NewHeartbeat("ok-loop", time.Hour), NewHeartbeat("stuck-loop", 50*time.Millisecond)
	s.AddHeartbeat(ok)
	s.AddHeartbeat(stuck)
	ok.Beat(time.Minute)
	stuck.Beat(0)

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go s.ServeListener(ctx, l)
	base := "http://" + l.Addr().String()

	code, body := get(t, base+"/healthz")
	if code != 200 || !strings.Contains(body, "ok-loop: last turned") || !strings.Contains(body, "stuck-loop: last turned") {
		t.Fatalf("both loops on time: %d %q", code, body)
	}
	if _, err := os.Stat(dump); err == nil {
		t.Fatal("goroutines written while nothing stalled")
	}
	time.Sleep(150 * time.Millisecond)
	code, body = get(t, base+"/healthz")
	if code != 503 || !strings.HasPrefix(body, "stuck-loop: stalled: last turned ") || strings.Contains(body, "ok-loop") {
		t.Fatalf("stalled loop: %d %q", code, body)
	}
	if v := testenv.Metric(t, reg, "ambit_agent_loop_stalled", map[string]string{"loop": "stuck-loop"}); v != 1 {
		t.Errorf("ambit_agent_loop_stalled{loop=stuck-loop} = %v", v)
	}
	if v := testenv.Metric(t, reg, "ambit_agent_loop_stalled", map[string]string{"loop": "ok-loop"}); v != 0 {
		t.Errorf("ambit_agent_loop_stalled{loop=ok-loop} = %v", v)
	}
	if v := testenv.Metric(t, reg, "ambit_agent_loop_last_turn_timestamp_seconds", map[string]string{"loop": "ok-loop"}); time.Since(time.Unix(int64(v), 0)) > time.Minute {
		t.Errorf("last turn of ok-loop: %v", v)
	}
	if !strings.Contains(logged.String(), "liveness check failing") || !strings.Contains(logged.String(), "stuck-loop: stalled") {
		t.Errorf("log: %q", logged.String())
	}
	b, err := os.ReadFile(dump)
	if err != nil || !strings.Contains(string(b), "goroutine ") || !strings.Contains(string(b), "TestHealthzNamesTheStalledLoop") {
		t.Fatalf("goroutine dump: %v %.200q", err, b)
	}
	// A later probe of the same episode does not write them again.
	os.Remove(dump)
	get(t, base+"/healthz")
	if _, err := os.Stat(dump); err == nil {
		t.Error("goroutines written again in the same episode")
	}
	stuck.Beat(time.Minute)
	if code, _ := get(t, base+"/healthz"); code != 200 {
		t.Fatalf("after the loop turned again: %d", code)
	}
	if !strings.Contains(logged.String(), "liveness checks pass again") {
		t.Errorf("recovery not logged: %q", logged.String())
	}
}

//go:noinline
func parkedForTheDumpTest(ch chan struct{}) { <-ch }

// The goroutine dump of a busy agent stays small and still shows what
// every goroutine waits on. A busy agent has tens of thousands of
// goroutines (two per proxied connection, one per idle HBONE
// connection); the full dump (debug=2) of 20,000 here was 6.6 MB, and of
// 50,000 deeper ones 40 MB in 3.5 s with every goroutine, the node's data path among
// them, stopped for 1.2 s, written to the host's /var/run (usually a
// tmpfs: the node's memory, shared with the agent's pod records).
// Above fullDumpMax goroutines identical stacks are grouped (debug=1).
func TestStallDumpOfABusyAgentStaysSmall(t *testing.T) {
	const n = 20000
	ch := make(chan struct{})
	defer close(ch)
	for range n {
		go parkedForTheDumpTest(ch)
	}
	s := New(prometheus.NewRegistry())
	dir := t.TempDir()
	s.SetStallDump(dir, "busy")
	dump := filepath.Join(dir, "goroutines-at-stall-busy.txt")
	stuck := NewHeartbeat("stuck-loop", time.Millisecond)
	s.AddHeartbeat(stuck)
	stuck.Beat(0)
	time.Sleep(20 * time.Millisecond)

	rec := httptest.NewRecorder()
	s.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/healthz", nil))
	if rec.Code != 503 {
		t.Fatalf("/healthz of a stalled loop: %d %q", rec.Code, rec.Body.String())
	}
	b, err := os.ReadFile(dump)
	if err != nil {
		t.Fatal(err)
	}
	const most = 1 << 20
	t.Logf("dump of %d goroutines: %d bytes", n, len(b))
	if len(b) > most {
		t.Errorf("dump of %d goroutines is %d bytes, want at most %d", n, len(b), most)
	}
	for _, want := range []string{"parkedForTheDumpTest", "TestStallDumpOfABusyAgentStaysSmall"} {
		if !strings.Contains(string(b), want) {
			t.Errorf("dump does not show %s: %.300q", want, b)
		}
	}
}

// stall makes s's /healthz fail once (a new episode: the goroutine dump).
func stall(t *testing.T, s *Server) {
	t.Helper()
	hb := NewHeartbeat("stuck-loop", 0)
	s.AddHeartbeat(hb)
	hb.Beat(-time.Second)
	rec := httptest.NewRecorder()
	s.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/healthz", nil))
	if rec.Code != 503 {
		t.Fatalf("/healthz of a stalled loop: %d %q", rec.Code, rec.Body.String())
	}
}

// Two agents of a node (a surge upgrade) that both stall keep both
// dumps: each writes its own file. Before, both wrote
// stateDir/goroutines-at-stall.txt and the later stall replaced the
// earlier one's stacks. An agent restarted by its probe again and again
// (a new instance each time) leaves the newest StallDumpsKept dumps
// only, and a temporary dump left by an agent killed while writing goes
// once stale: the directory is the host's /var/run, memory.
func TestStallDumpsPerAgentAndBounded(t *testing.T) {
	dir := t.TempDir()
	older, newer := New(prometheus.NewRegistry()), New(prometheus.NewRegistry())
	older.SetStallDump(dir, "1000-old")
	newer.SetStallDump(dir, "2000-new")
	stall(t, older)
	stall(t, newer)
	for _, name := range []string{"1000-old", "2000-new"} {
		b, err := os.ReadFile(filepath.Join(dir, "goroutines-at-stall-"+name+".txt"))
		if err != nil || !strings.Contains(string(b), "TestStallDumpsPerAgentAndBounded") {
			t.Fatalf("dump of agent %s: %v %.100q", name, err, b)
		}
	}

	left := filepath.Join(dir, ".goroutines-12345")
	if err := os.WriteFile(left, []byte("half a dump"), 0o600); err != nil {
		t.Fatal(err)
	}
	old := time.Now().Add(-2 * staleTmpDump)
	os.Chtimes(left, old, old)
	other := filepath.Join(dir, "pods.json") // not a dump: left alone
	if err := os.WriteFile(other, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	// Restarts: a new instance each time, each stalling.
	var names []string
	for i := range 6 {
		name := fmt.Sprintf("%d-restart", 3000+i)
		names = append(names, name)
		s := New(prometheus.NewRegistry())
		s.SetStallDump(dir, name)
		stall(t, s)
		time.Sleep(20 * time.Millisecond) // distinct modification times
	}
	got, _ := filepath.Glob(filepath.Join(dir, "goroutines-at-stall-*.txt"))
	var want []string
	for _, name := range names[len(names)-StallDumpsKept:] {
		want = append(want, filepath.Join(dir, "goroutines-at-stall-"+name+".txt"))
	}
	slices.Sort(got)
	if !slices.Equal(got, want) {
		t.Errorf("dumps kept: %v, want the newest %d: %v", got, StallDumpsKept, want)
	}
	if _, err := os.Stat(left); err == nil {
		t.Error("a stale temporary dump was kept")
	}
	if _, err := os.Stat(other); err != nil {
		t.Errorf("a file that is no dump was removed: %v", err)
	}
}

// An instance name that is no file name does not put the dump elsewhere.
func TestStallDumpNameIsAFileName(t *testing.T) {
	dir := t.TempDir()
	s := New(prometheus.NewRegistry())
	s.SetStallDump(dir, "../x/y")
	stall(t, s)
	if _, err := os.Stat(filepath.Join(dir, "goroutines-at-stall-_._x_y.txt")); err != nil {
		t.Fatal(err)
	}
}
