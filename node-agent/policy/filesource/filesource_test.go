package filesource

import (
	"context"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/node-agent/policy"
	"github.com/ambit-mesh/ambit/tunnel"
)

var web = tunnel.Workload{UID: "u", Namespace: "shop", Name: "web-1", Labels: map[string]string{"app": "web"},
	Identity: "spiffe://cluster.local/ns/shop/sa/web"}

func connFrom(id string) tunnel.ConnInfo {
	return tunnel.ConnInfo{SrcIdentity: id, SrcIP: netip.MustParseAddr("10.1.0.5"), Dst: web, DstPort: 8080, Plaintext: id == ""}
}

const (
	ui    = "spiffe://cluster.local/ns/front/sa/ui"
	batch = "spiffe://cluster.local/ns/jobs/sa/batch"
)

const allowUI = `apiVersion: ambit.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {namespace: shop, name: allow-ui}
spec:
  rules:
  - from: {principals: ["cluster.local/ns/front/sa/ui"]}
`

const strictShop = `apiVersion: ambit.dev/v1alpha1
kind: InboundMode
metadata: {namespace: shop, name: strict}
spec: {mode: STRICT}
`

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func write(t *testing.T, dir, name, content string) {
	t.Helper()
	// Write then rename, as editors and ConfigMap updates do.
	tmp := filepath.Join(dir, ".tmp-"+name)
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		t.Fatal(err)
	}
}

func allowed(e *policy.Engine, id string) bool { return e.Authorize(connFrom(id)).Allow }

func TestLoadEnforcesAndReportsByFileAndField(t *testing.T) {
	dir := t.TempDir()
	write(t, dir, "10-allow.yaml", allowUI+"---\n"+strictShop)
	write(t, dir, "20-bad.yml", `apiVersion: ambit.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {namespace: bank, name: bad-cidr}
spec:
  rules:
  - from: {ipBlocks: ["10.0.0/8"]}
`)
	write(t, dir, "README.md", "not a policy")
	e := policy.New(policy.Options{Logger: quiet()})
	s := New(dir, e, quiet())
	problems := s.Load()

	if !allowed(e, ui) || allowed(e, batch) || allowed(e, "") {
		t.Fatalf("want ui allowed, batch and plaintext denied")
	}
	if v := e.Authorize(connFrom("")); v.Policy != "shop/strict" {
		t.Errorf("plaintext decided by %q, want shop/strict", v.Policy)
	}
	if len(problems) != 1 {
		t.Fatalf("problems = %v, want the bad CIDR only", problems)
	}
	p := problems[0].String()
	for _, want := range []string{"20-bad.yml", "AuthorizationPolicy bank/bad-cidr", "spec.rules[0].from.ipBlocks[0]", "10.0.0/8", "deny-all"} {
		if !strings.Contains(p, want) {
			t.Errorf("problem %q does not mention %q", p, want)
		}
	}
}

func TestBrokenEditKeepsLastGoodAndDeleteRemoves(t *testing.T) {
	dir := t.TempDir()
	write(t, dir, "p.yaml", allowUI)
	e := policy.New(policy.Options{Logger: quiet()})
	s := New(dir, e, quiet())
	if p := s.Load(); len(p) != 0 {
		t.Fatal(p)
	}
	write(t, dir, "p.yaml", allowUI+"  - from: {principals: [\"unterminated]\n")
	problems := s.Load()
	if len(problems) != 1 || !strings.Contains(problems[0].String(), "p.yaml") || !strings.Contains(problems[0].String(), "keeping the file's last good version") {
		t.Fatalf("problems = %v", problems)
	}
	if allowed(e, batch) {
		t.Fatal("a broken edit opened access")
	}
	if err := os.Remove(filepath.Join(dir, "p.yaml")); err != nil {
		t.Fatal(err)
	}
	if p := s.Load(); len(p) != 0 {
		t.Fatal(p)
	}
	if !allowed(e, batch) {
		t.Fatal("a deleted file's policy is still enforced")
	}
}

func TestDocumentErrors(t *testing.T) {
	dir := t.TempDir()
	write(t, dir, "a.yaml", allowUI+"---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
	write(t, dir, "b.json", `{"apiVersion":"ambit.dev/v1alpha1","kind":"AuthorizationPolicy","metadata":{"namespace":"shop","name":"allow-ui"},"spec":{"rules":[{"to":{"ports":[8080]}}]}}`)
	write(t, dir, "c.yaml", strings.ReplaceAll(strictShop, "STRICT", "strict"))
	e := policy.New(policy.Options{Logger: quiet()})
	problems := New(dir, e, quiet()).Load()
	all := ""
	for _, p := range problems {
		all += p.String() + "\n"
	}
	for _, want := range []string{
		"a.yaml: document 2: unsupported kind v1 ConfigMap",
		"b.json: AuthorizationPolicy shop/allow-ui (ambit.dev/v1alpha1): also defined in",
		"c.yaml: InboundMode shop/strict: Invalid: spec.mode: Unsupported value: \"strict\"",
	} {
		if !strings.Contains(all, want) {
			t.Errorf("problems do not contain %q:\n%s", want, all)
		}
	}
	// The invalid mode fails closed.
	if allowed(e, "") {
		t.Error("plaintext allowed under an unreadable InboundMode")
	}
}

func TestRunReloadsOnChange(t *testing.T) {
	parent := t.TempDir()
	dir := filepath.Join(parent, "policies") // created later
	e := policy.New(policy.Options{Logger: quiet()})
	var changes atomic.Int32
	e.OnChange(func() { changes.Add(1) })
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- New(dir, e, quiet()).Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})

	waitFor(t, "the watch to start", func() bool { return allowed(e, batch) })
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	write(t, dir, "p.yaml", allowUI)
	waitFor(t, "the new file to deny batch", func() bool { return !allowed(e, batch) && allowed(e, ui) })
	before := changes.Load()
	if before == 0 {
		t.Error("OnChange not called")
	}
	write(t, dir, "p.yaml", strings.ReplaceAll(allowUI, "front/sa/ui", "jobs/sa/batch"))
	waitFor(t, "the edit to flip", func() bool { return allowed(e, batch) && !allowed(e, ui) })
	if changes.Load() <= before {
		t.Error("OnChange not called for the edit")
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestUnreadableFailsClosed: a policy directory that cannot be read at
// the first load (here a file given as the directory), or a policy file
// never read, may hold a DENY: every connection is denied until it can
// be read. Before, nothing was in force and everything was allowed.
func TestUnreadableFailsClosed(t *testing.T) {
	t.Run("directory", func(t *testing.T) {
		dir := t.TempDir()
		notDir := filepath.Join(dir, "policies.yaml")
		if err := os.WriteFile(notDir, []byte(allowUI), 0o644); err != nil {
			t.Fatal(err)
		}
		e := policy.New(policy.Options{Logger: quiet()})
		s := New(notDir, e, quiet())
		if probs := s.Load(); len(probs) == 0 {
			t.Error("no problem reported")
		}
		if allowed(e, ui) || allowed(e, batch) {
			t.Fatal("connections allowed while the policy directory cannot be read")
		}
		// Readable (here: gone, so no policies): back to normal.
		os.Remove(notDir)
		s.Load()
		if !allowed(e, batch) {
			t.Fatal("still denied once the directory reads (no policies)")
		}
	})
	t.Run("file", func(t *testing.T) {
		dir := t.TempDir()
		write(t, dir, "10-allow.yaml", allowUI)
		// A regular file whose read fails, as root: /proc/self/mem
		// (reading at offset 0 gives EIO).
		if err := os.Symlink("/proc/self/mem", filepath.Join(dir, "20-unreadable.yaml")); err != nil {
			t.Fatal(err)
		}
		e := policy.New(policy.Options{Logger: quiet()})
		New(dir, e, quiet()).Load()
		if allowed(e, ui) {
			t.Fatal("connection allowed while a policy file was never read")
		}
	})
}
