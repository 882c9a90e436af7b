package agent

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/node-agent/inventory"
)

// heldView is an inventory whose first sync waits for release: the agent
// stays short of ready for as long as the test needs.
type heldView struct {
	*inventory.Source
	release chan struct{}
}

func (v *heldView) WaitSynced(ctx context.Context) error {
	select {
	case <-v.release:
	case <-ctx.Done():
		return ctx.Err()
	}
	return v.Source.WaitSynced(ctx)
}

// TestServingWaitsForTheOlderAgent: beside an older agent that serves the
// plugin socket (a surge upgrade), Serving stays open until this agent
// takes the socket, at ready; the installer copies the plugin binary only
// then (install.Config.Serving), so the older agent is never asked in a
// protocol newer than its own. Without an older agent it closes as the
// socket serves, before ready.
func TestServingWaitsForTheOlderAgent(t *testing.T) {
	for _, older := range []bool{true, false} {
		dir := agentDir(t)
		inv := filepath.Join(dir, "inventory.yaml")
		if err := os.WriteFile(inv, []byte(invPlain), 0o600); err != nil {
			t.Fatal(err)
		}
		cfg := testConfig(dir, inv)
		if err := cfg.Finish(); err != nil {
			t.Fatal(err)
		}
		src, err := inventory.Load(inventory.Options{Path: inv, NodeName: cfg.NodeName, EnrollLabel: cfg.EnrollLabel})
		if err != nil {
			t.Fatal(err)
		}
		view := &heldView{Source: src, release: make(chan struct{})}
		o := Options{Config: cfg, View: view, Status: src, Tunnel: &echoTunnel{}, Logger: quietLogger()}
		if older {
			o.Predecessor = func() bool { return true }
		}
		a, err := New(o)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- a.Run(ctx) }()

		time.Sleep(100 * time.Millisecond) // time to serve early, were it wrong
		select {
		case <-a.Serving():
			t.Fatalf("older agent %v: Serving closed before the agent served the plugin socket", older)
		default:
		}
		close(view.release)
		select {
		case <-a.Serving():
		case <-time.After(30 * time.Second):
			t.Fatalf("older agent %v: Serving never closed", older)
		}
		if older {
			select {
			case <-a.Ready():
			default:
				t.Fatal("Serving closed beside a serving older agent before this agent was ready")
			}
		}
		if _, err := os.Stat(cfg.Socket); err != nil {
			t.Fatalf("older agent %v: Serving closed, but the plugin socket is not there: %v", older, err)
		}
		<-a.Ready()
		cancel()
		if err := <-done; err != nil {
			t.Errorf("agent: %v", err)
		}
	}
}
