package main

import (
	"context"
	"io"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

func get(url string) (int, string) {
	r, err := http.Get(url)
	if err != nil {
		return 0, err.Error()
	}
	defer r.Body.Close()
	b, _ := io.ReadAll(r.Body)
	return r.StatusCode, string(b)
}

// TestRunStatic runs the built ambit-agent with a static inventory: the
// whole wiring (inventory, local CA, real tunnel, policies, health) comes
// up, becomes ready, enrolls a pod at ADD and stops cleanly on SIGTERM.
func TestRunStatic(t *testing.T) {
	testenv.RequireRoot(t)
	bin := testenv.Binary(t, "ambit-agent")
	dir, err := os.MkdirTemp("", "amb-agt-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	inv := filepath.Join(dir, "inventory.yaml")
	os.WriteFile(inv, []byte("namespaces:\n  - name: apps\n    labels: {ambit.dev/dataplane-mode: ambient}\n"), 0o600)
	cfg := filepath.Join(dir, "config.yaml")
	os.WriteFile(cfg, []byte("nodeName: n1\ninventoryFile: "+inv+"\nstateDir: "+dir+"\nhealthAddr: 127.0.0.1:15931\npolicyDir: "+filepath.Join(dir, "policies")+"\ndrainTimeout: 2s\n"), 0o600)

	cmd := exec.Command(bin, "run", "-config", cfg)
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
	deadline := time.Now().Add(30 * time.Second)
	for {
		if code, _ := get("http://127.0.0.1:15931/readyz"); code == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("agent not ready within 30s")
		}
		time.Sleep(50 * time.Millisecond)
	}

	// A pod: a netns holding its IP.
	name := "amb-agt-main" + strings.ReplaceAll(time.Now().Format("150405.000"), ".", "")
	func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		orig, _ := netns.Get()
		defer orig.Close()
		h, err := netns.NewNamed(name)
		if err != nil {
			t.Fatal(err)
		}
		defer netns.Set(orig)
		h.Close()
		lo, _ := netlink.LinkByName("lo")
		netlink.LinkSetUp(lo)
		a, _ := netlink.ParseAddr("10.74.0.2/24")
		netlink.AddrAdd(lo, a)
	}()
	t.Cleanup(func() { netns.DeleteNamed(name) })
	f, err := os.Open("/var/run/netns/" + name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	resp, err := cniproto.Call(ctx, filepath.Join(dir, "cni.sock"), &cniproto.Request{Version: cniproto.Version, Op: cniproto.OpAdd,
		Pod: cniproto.Pod{Namespace: "apps", Name: "web", UID: "u1", ContainerID: "c1", Netns: f.Name(), IPs: []netip.Prefix{netip.MustParsePrefix("10.74.0.2/24")}}}, f)
	if err != nil || resp.Decision != cniproto.Enroll {
		t.Fatalf("ADD: %+v %v", resp, err)
	}
	if _, body := get("http://127.0.0.1:15931/metrics"); !strings.Contains(body, "ambit_agent_enrolled_pods 1") || !strings.Contains(body, "ambit_identity_") {
		t.Fatalf("metrics after ADD lack the enrolled pod or identity metrics")
	}
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
