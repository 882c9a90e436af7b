package main

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/ambit-mesh/ambit/node-agent/instance"
)

// TestStatusAllJSONNoAnswer: `ambit-agent status --all -o json` when the
// node's one registered agent does not answer (no admin socket: an agent
// that could not open it, or one older than status). The output is
// still a JSON list, empty, for a script's `jq '.[]'`, and the command
// fails (exit code 1) saying which agent did not answer. Before, it
// printed "null".
func TestStatusAllJSONNoAnswer(t *testing.T) {
	dir := t.TempDir()
	self, err := instance.Register(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer self.Close()
	var out bytes.Buffer
	err = runStatus(context.Background(), []string{"--state-dir", dir, "--all", "-o", "json"}, &out)
	if err == nil || !strings.Contains(err.Error(), self.Name()) {
		t.Fatalf("status --all with no agent answering: %v, want an error naming %s", err, self.Name())
	}
	if got := strings.TrimSpace(out.String()); got != "[]" {
		t.Fatalf("status --all -o json with no agent answering printed %q, want []", got)
	}
}
