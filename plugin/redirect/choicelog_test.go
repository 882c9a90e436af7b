package redirect

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
)

// TestEngineChoiceLoggedOnce: the engine is chosen at every install, and
// the agent installs at every ADD and every repair. Before, each choice
// logged its line at info, so a node resolving "iptables" (or lacking
// nf_tables) printed it once per pod and per retried repair; now the
// first says why at info and the rest go to debug.
func TestEngineChoiceLoggedOnce(t *testing.T) {
	var buf bytes.Buffer
	old := slog.Default()
	slog.SetDefault(slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelInfo})))
	t.Cleanup(func() { slog.SetDefault(old) })
	choicesLogged.Clear()
	t.Cleanup(choicesLogged.Clear)

	for range 5 {
		b, err := resolve(nil, Iptables)
		if err != nil || (b != IptablesLegacy && b != IptablesNft) {
			t.Fatalf("resolve(iptables) = %q, %v", b, err)
		}
	}
	if n := strings.Count(buf.String(), "iptables variant chosen"); n != 1 {
		t.Errorf("five installs logged the engine choice %d times at info, want 1:\n%s", n, buf.String())
	}
}
