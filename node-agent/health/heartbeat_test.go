package health

import (
	"context"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
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
	dump := filepath.Join(t.TempDir(), "goroutines.txt")
	s.SetStallDump(dump)
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
