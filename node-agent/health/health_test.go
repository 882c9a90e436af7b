package health

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	r, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Body.Close()
	b, _ := io.ReadAll(r.Body)
	return r.StatusCode, string(b)
}

func TestEndpoints(t *testing.T) {
	reg := prometheus.NewRegistry()
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "ambit_test_total", Help: "x"})
	reg.MustRegister(c)
	c.Inc()
	s := New(reg)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- s.ServeListener(ctx, l) }()
	base := "http://" + l.Addr().String()

	if code, body := get(t, base+"/readyz"); code != 503 || !strings.Contains(body, "starting") {
		t.Fatalf("readyz before ready: %d %q", code, body)
	}
	if code, _ := get(t, base+"/healthz"); code != 200 {
		t.Fatalf("healthz: %d", code)
	}
	s.SetReady()
	if code, _ := get(t, base+"/readyz"); code != 200 {
		t.Fatalf("readyz after ready: %d", code)
	}
	s.AddLiveness("loop", func() error { return errors.New("stuck") })
	if code, body := get(t, base+"/healthz"); code != 503 || !strings.Contains(body, "loop: stuck") {
		t.Fatalf("healthz failing check: %d %q", code, body)
	}
	if code, body := get(t, base+"/metrics"); code != 200 || !strings.Contains(body, "ambit_test_total 1") {
		t.Fatalf("metrics: %d %q", code, body)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// Two agents on one node during a surge upgrade share the health port.
// A newer agent joins it only once ready (node-agent/main.go: a 503 of
// its own, reached by the old pod's probes, made the DaemonSet controller
// delete the old pod), so every probe finds a ready agent, and the older
// one leaving the port leaves every probe to the newer one.
func TestSharedPortAnswersForEachAgent(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()

	old, neu := New(prometheus.NewRegistry()), New(prometheus.NewRegistry())
	old.SetReady()
	neu.SetReady()
	oldCtx, stopOld := context.WithCancel(context.Background())
	newCtx, stopNew := context.WithCancel(context.Background())
	defer stopNew()
	oldDone, newDone := make(chan error, 1), make(chan error, 1)
	go func() { oldDone <- old.Serve(oldCtx, addr) }()
	waitListening(t, addr)
	go func() { newDone <- neu.Serve(newCtx, addr) }()

	// Fresh connections, so SO_REUSEPORT spreads them over both.
	probe := func() (codes map[int]int) {
		codes = map[int]int{}
		cl := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
		for range 40 {
			r, err := cl.Get("http://" + addr + "/readyz")
			if err != nil {
				codes[-1]++
				continue
			}
			io.Copy(io.Discard, r.Body)
			r.Body.Close()
			codes[r.StatusCode]++
		}
		return codes
	}
	waitFor(t, "the new agent to join the port", func() bool {
		select {
		case err := <-newDone:
			t.Fatalf("second Serve on the same port: %v", err)
		default:
		}
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	if c := probe(); c[200] != 40 {
		t.Fatalf("both agents ready: probes answered %v, want 40×200", c)
	}
	// The old agent stops (SIGTERM): it leaves the port at once and the
	// new one answers everything; its own "stopping" is never seen.
	old.SetNotReady("stopping")
	stopOld()
	if err := <-oldDone; err != nil {
		t.Fatal(err)
	}
	if c := probe(); c[200] != 40 {
		t.Fatalf("after the old agent left: %v, want 40×200", c)
	}
}

func waitListening(t *testing.T, addr string) {
	waitFor(t, addr+" to listen", func() bool {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
}

func waitFor(t *testing.T, what string, ok func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if ok() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}
