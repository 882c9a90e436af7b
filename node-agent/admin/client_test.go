package admin

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/node-agent/instance"
)

// TestFetchSaysWhyNoAgentAnswers: `status` on a socket a killed agent
// left, or on an agent that accepts and never answers, ends (no hang)
// with a message saying which; an --instance-file naming an agent that
// is no longer running says so before any socket is tried.
func TestFetchSaysWhyNoAgentAnswers(t *testing.T) {
	dir := shortDir(t)
	os.MkdirAll(filepath.Join(dir, SocketDir), 0o700)

	// kill -9: the socket file stays, nothing listens on it.
	dead := SocketPath(dir, "00000000000000000001-dead")
	l, err := listenUnix(dead)
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := Fetch(ctx, dead); err == nil || !strings.Contains(err.Error(), "nothing listens") {
		t.Fatalf("fetch from a killed agent's socket: %v, want 'nothing listens'", err)
	}

	// Stuck (stopped, deadlocked): accepts, never answers.
	stuck := SocketPath(dir, "00000000000000000002-stuck")
	sl, err := listenUnix(stuck)
	if err != nil {
		t.Fatal(err)
	}
	defer sl.Close()
	go func() {
		for {
			c, err := sl.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	sctx, scancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer scancel()
	if _, err := Fetch(sctx, stuck); err == nil || !strings.Contains(err.Error(), "no answer") {
		t.Fatalf("fetch from a stuck agent: %v, want 'no answer'", err)
	}

	// --instance-file naming an agent that is gone: its registry entry
	// is there, unlocked (kill -9 releases the lock).
	self, err := instance.Register(dir)
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(dir, "agent.instance")
	self.WriteName(file)
	entry := filepath.Join(dir, instance.Dir, self.Name())
	b, _ := os.ReadFile(entry)
	self.Close()
	os.WriteFile(entry, b, 0o644) // as a killed agent leaves it
	if _, err := Targets(dir, file, false); err == nil || !strings.Contains(err.Error(), "not running") {
		t.Fatalf("instance file of a killed agent: %v, want 'not running'", err)
	}
}
