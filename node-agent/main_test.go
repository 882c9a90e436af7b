package main

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/health"
	"github.com/ambit-mesh/ambit/node-agent/instance"
)

// healthAddr is a health address of this test alone: a fixed port on a
// random loopback address (all of 127/8 is local). Two test processes of
// this package on one machine (two people, or make test beside a rerun)
// used to share 127.0.0.1:1593x, and with SO_REUSEPORT each agent could
// answer for the other's.
func healthAddr(port int) string {
	var b [3]byte
	rand.Read(b[:])
	return fmt.Sprintf("127.%d.%d.%d:%d", 1+b[0]%254, b[1], 1+b[2]%254, port)
}

func get(url string) (int, string) {
	r, err := http.Get(url)
	if err != nil {
		return 0, err.Error()
	}
	defer r.Body.Close()
	b, _ := io.ReadAll(r.Body)
	return r.StatusCode, string(b)
}

// staticNode makes a state dir with an inventory (namespace apps in the
// mesh) and an agent config file: nodeName, inventory and state dir, plus
// the YAML extra returns for the dir.
func staticNode(t *testing.T, prefix string, extra func(dir string) string) (dir, cfg string) {
	t.Helper()
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	inv := filepath.Join(dir, "inventory.yaml")
	os.WriteFile(inv, []byte("namespaces:\n  - name: apps\n    labels: {ambit.dev/dataplane-mode: ambient}\n"), 0o600)
	cfg = filepath.Join(dir, "config.yaml")
	os.WriteFile(cfg, []byte("nodeName: n1\ninventoryFile: "+inv+"\nstateDir: "+dir+"\n"+extra(dir)), 0o600)
	return dir, cfg
}

// startProcess starts bin (stderr to the test's) and kills it at the end
// of the test unless the test waited for it.
func startProcess(t *testing.T, bin string, args ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	return cmd
}

// TestRunStatic runs the built ambit-agent with a static inventory: the
// whole wiring (inventory, local CA, real tunnel, policies, health) comes
// up, becomes ready, enrolls a pod at ADD and stops cleanly on SIGTERM.
func TestRunStatic(t *testing.T) {
	testenv.RequireRoot(t)
	bin := testenv.Binary(t, "ambit-agent")
	health := healthAddr(15931)
	dir, cfg := staticNode(t, "amb-agt-", func(dir string) string {
		return "healthAddr: " + health + "\npolicyDir: " + filepath.Join(dir, "policies") + "\ndrainTimeout: 2s\n"
	})

	cmd := startProcess(t, bin, "run", "-config", cfg)
	waitReady(t, health)

	// A pod: a netns holding its IP.
	newTestPod(t, "web", "10.74.0", false).add(t, filepath.Join(dir, "cni.sock"))
	if _, body := get("http://" + health + "/metrics"); !strings.Contains(body, "ambit_agent_enrolled_pods 1") || !strings.Contains(body, "ambit_identity_") {
		t.Fatalf("metrics after ADD lack the enrolled pod or identity metrics")
	}
	stopBySIGTERM(t, cmd)
}

// waitReady waits for the agent's /readyz on health to answer 200.
func waitReady(t *testing.T, health string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if code, _ := get("http://" + health + "/readyz"); code == 200 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("agent not ready within 30s")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stopBySIGTERM stops cmd with SIGTERM and fails the test unless it
// exits cleanly within 20s.
func stopBySIGTERM(t *testing.T, cmd *exec.Cmd) {
	t.Helper()
	cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("agent exit: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("agent did not stop within 20s of SIGTERM")
	}
}

func TestConfigFlagsOverride(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "c.yaml")
	os.WriteFile(p, []byte("nodeName: a\nstateDir: /x\nlogLevel: warn\n"), 0o600)
	c, err := loadConfig(overrides{path: p, nodeName: "b", stateDir: "/y"})
	if err != nil {
		t.Fatal(err)
	}
	if c.NodeName != "b" || c.StateDir != "/y" || c.Socket != "/y/cni.sock" || c.LogLevel != "warn" {
		t.Fatalf("overrides not applied: %+v", c)
	}
	os.WriteFile(p, []byte("nodeName: a\nbogus: 1\n"), 0o600)
	if _, err := loadConfig(overrides{path: p}); err == nil || !strings.Contains(err.Error(), "bogus") {
		t.Fatalf("unknown key: %v", err)
	}
}

// TestSurgeOverlap runs what a surge upgrade does on a node: a second
// agent beside the first, same state dir, same health port. The first
// agent stays ready while the newer one starts; the startup probe
// answers for its own process only (so the old agent never vouches for
// the new pod); the old agent leaves the port and the registry when it
// stops.
func TestSurgeOverlap(t *testing.T) {
	testenv.RequireRoot(t)
	bin := testenv.Binary(t, "ambit-agent")
	health := healthAddr(15932)
	dir, cfg := staticNode(t, "amb-surge-", func(string) string { return "healthAddr: " + health + "\ndrainTimeout: 1s\n" })
	readyz := "http://" + health + "/readyz"
	start := func(name string) (*exec.Cmd, string) {
		file := filepath.Join(dir, name+".instance")
		return startProcess(t, bin, "run", "-config", cfg, "--instance-file", file), file
	}
	probe := func(file string) error {
		return exec.Command(bin, "probe", "-config", cfg, "--instance-file", file).Run()
	}
	eventually := func(what string, ok func() bool) {
		t.Helper()
		for deadline := time.Now().Add(30 * time.Second); !ok(); time.Sleep(50 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
		}
	}

	old, oldFile := start("old")
	eventually("the old agent ready", func() bool { code, _ := get(readyz); return code == 200 })
	if err := probe(oldFile); err != nil {
		t.Fatalf("startup probe of the ready agent: %v", err)
	}

	// A newer agent registered but not ready yet: the old one, serving,
	// stays ready. Answering 503 "for the node" (as it did until session
	// 7) made its pod unready after three probes, and the DaemonSet
	// controller deletes an unready old pod during a surge at once: the
	// node was left to an agent still re-adopting its pods.
	fake, err := instance.Register(dir)
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if code, body := get(readyz); code != 200 {
			t.Fatalf("old agent with a starting successor answered %d %q, want 200 (it serves)", code, body)
		}
		time.Sleep(100 * time.Millisecond)
	}
	fake.SetReady()
	if code, body := get(readyz); code != 200 {
		t.Fatalf("old agent with a ready successor answered %d %q", code, body)
	}
	fake.Close()

	// The real new agent: its own probe passes once it is ready, the
	// shared port keeps answering, and the old agent leaves cleanly.
	neu, newFile := start("new")
	eventually("the new agent's startup probe", func() bool { return probe(newFile) == nil })
	if code, body := get(readyz); code != 200 {
		t.Fatalf("both agents ready, readyz %d %q", code, body)
	}
	old.Process.Signal(syscall.SIGTERM)
	if err := old.Wait(); err != nil {
		t.Fatalf("old agent exit: %v", err)
	}
	if err := probe(oldFile); err == nil {
		t.Fatal("the stopped agent's startup probe still passes")
	}
	for range 20 { // fresh connections: none may reach a closed listener
		if code, body := get(readyz); code != 200 {
			t.Fatalf("after the old agent stopped, readyz %d %q", code, body)
		}
	}
	ents, _ := os.ReadDir(filepath.Join(dir, instance.Dir))
	if len(ents) != 2 { // the new agent's entry and its ready marker
		t.Errorf("registry after the hand-over: %d entries, want the new agent's 2", len(ents))
	}
	neu.Process.Signal(syscall.SIGTERM)
	neu.Wait()
}

// TestHealthPortHeldByOldAgent: the first upgrade to a version with the
// shared health port finds the old agent holding :15021 without
// SO_REUSEPORT. The new agent must take the port once the old one lets it
// go, not give up (which would leave it without probes and get it killed
// by its liveness probe).
func TestHealthPortHeldByOldAgent(t *testing.T) {
	testenv.RequireRoot(t)
	bin := testenv.Binary(t, "ambit-agent")
	health := healthAddr(15933)
	old, err := net.Listen("tcp", health) // no SO_REUSEPORT
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	_, cfg := staticNode(t, "amb-oldport-", func(string) string { return "healthAddr: " + health + "\n" })
	dir := filepath.Dir(cfg)
	file := filepath.Join(dir, "instance")
	startProcess(t, bin, "run", "-config", cfg, "--instance-file", file)
	deadline := time.Now().Add(30 * time.Second)
	for exec.Command(bin, "probe", "-config", cfg, "--instance-file", file).Run() != nil {
		if time.Now().After(deadline) {
			t.Fatal("agent not ready within 30s while the old agent held the health port")
		}
		time.Sleep(100 * time.Millisecond)
	}
	old.Close()
	for {
		if code, _ := get("http://" + health + "/readyz"); code == 200 {
			break
		}
		if time.Now().After(deadline.Add(10 * time.Second)) {
			t.Fatal("the agent never took the health port after the old agent released it")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestHostRulesYieldWithThreeAgents: a rollout started in the middle of a
// surge puts three agents on a node. The oldest has yielded the host rules
// to the middle one, which is ready; the newest is starting. The oldest
// must keep yielding (to the newest ready agent), not resume reconciling
// its stale picture beside the middle one because a newer, not yet ready
// agent appeared. Once the newest is ready, both older ones yield; when
// the ready agents newer than one are gone, it is in charge again.
func TestHostRulesYieldWithThreeAgents(t *testing.T) {
	dir := t.TempDir()
	reg := func() *instance.Self {
		s, err := instance.Register(dir)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		time.Sleep(time.Microsecond) // distinct start times
		return s
	}
	oldest := reg()
	oldest.SetReady()
	mid := reg()
	yOldest, yMid := yieldHostRules(oldest), yieldHostRules(mid)
	if yOldest() || yMid() {
		t.Fatalf("middle agent starting: oldest yields %v, middle %v; want neither (the oldest is the only one with the whole picture)", yOldest(), yMid())
	}
	mid.SetReady()
	if !yOldest() || yMid() {
		t.Fatalf("middle agent ready: oldest yields %v, middle %v; want the oldest only", yOldest(), yMid())
	}
	newest := reg()
	yNewest := yieldHostRules(newest)
	if !yOldest() {
		t.Fatal("a newer agent is starting beside the ready middle one: the oldest stopped yielding and reconciles its stale picture again")
	}
	if yMid() || yNewest() {
		t.Fatalf("newest starting: middle yields %v, newest %v; want neither (the middle one is in charge, the newest merges until its Sync)", yMid(), yNewest())
	}
	newest.SetReady()
	if !yOldest() || !yMid() || yNewest() {
		t.Fatalf("newest ready: yields oldest %v, middle %v, newest %v; want true, true, false", yOldest(), yMid(), yNewest())
	}
	// The newest dies (crash loop): the middle one is in charge again,
	// the oldest still yields to it.
	newest.Close()
	if !yOldest() || yMid() {
		t.Fatalf("newest gone: oldest yields %v, middle %v; want the oldest only", yOldest(), yMid())
	}
	mid.Close()
	if yOldest() {
		t.Fatal("no newer agent left, the oldest still yields")
	}
}

// Rotation ends with the stop signal while the agent drains: its turn,
// due after the signal, never comes, and must not fail /healthz (a long
// drainTimeout outlived the next turn plus its grace, and the kubelet
// killed the draining agent).
func TestRotationStoppedBySignalIsNoStall(t *testing.T) {
	hb := health.NewHeartbeat("certificates", 0)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		runRotation(ctx, func(ctx context.Context) error {
			hb.Beat(-time.Second) // its next turn already due, as it will be during the drain
			<-ctx.Done()
			return nil
		}, hb, slog.New(slog.DiscardHandler))
	}()
	cancel()
	<-done
	if err := hb.Check(); err != nil {
		t.Fatalf("rotation stopped by the stop signal counts as stalled: %v", err)
	}
}
