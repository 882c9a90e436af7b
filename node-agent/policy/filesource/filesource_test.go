package filesource

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/ambit-mesh/ambit/internal/testenv"
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

	testenv.Eventually(t, "the watch to start", func() bool { return allowed(e, batch) })
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	write(t, dir, "p.yaml", allowUI)
	testenv.Eventually(t, "the new file to deny batch", func() bool { return !allowed(e, batch) && allowed(e, ui) })
	before := changes.Load()
	if before == 0 {
		t.Error("OnChange not called")
	}
	write(t, dir, "p.yaml", strings.ReplaceAll(allowUI, "front/sa/ui", "jobs/sa/batch"))
	testenv.Eventually(t, "the edit to flip", func() bool { return allowed(e, batch) && !allowed(e, ui) })
	if changes.Load() <= before {
		t.Error("OnChange not called for the edit")
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

var bankDB = tunnel.Workload{UID: "b", Namespace: "bank", Name: "db-1", Labels: map[string]string{"app": "db"},
	Identity: "spiffe://cluster.local/ns/bank/sa/db"}

func allowedTo(e *policy.Engine, id string, w tunnel.Workload) bool {
	c := connFrom(id)
	c.Dst = w
	return e.Authorize(c).Allow
}

func problemText(problems []Problem) string {
	var b strings.Builder
	for _, p := range problems {
		b.WriteString(p.String() + "\n")
	}
	return b.String()
}

// denyBatch is the policy edited with a typo below: it denies jobs/batch
// in shop, and allows the rest.
const denyBatch = `apiVersion: ambit.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {namespace: shop, name: deny-batch}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
  - from: {principals: ["cluster.local/ns/jobs/sa/batch"]}
`

// TestMistypedTypeFailsClosed: editing a DENY with a typo in its
// apiVersion or kind, in one of our groups, must not drop the DENY at
// the next reload (before: the document was skipped, so batch got in).
// It is enforced as a deny-all of its namespace (mesh-wide in a root
// namespace) and reported naming the field.
func TestMistypedTypeFailsClosed(t *testing.T) {
	istioDeny := strings.ReplaceAll(denyBatch, "ambit.dev/v1alpha1", "security.istio.io/v1")
	istioDeny = strings.ReplaceAll(istioDeny, `- from: {principals: ["cluster.local/ns/jobs/sa/batch"]}`,
		`- from: [{source: {principals: ["cluster.local/ns/jobs/sa/batch"]}}]`)
	for _, c := range []struct {
		name, good, bad string
		field           string // named in the problem
		meshWide        bool
	}{
		{"kind", denyBatch, strings.Replace(denyBatch, "kind: AuthorizationPolicy", "kind: AuthorisationPolicy", 1), `kind: Unsupported value: "AuthorisationPolicy"`, false},
		{"version", denyBatch, strings.Replace(denyBatch, "v1alpha1", "v1alpah1", 1), `apiVersion: Unsupported value: "ambit.dev/v1alpah1"`, false},
		{"version-missing", denyBatch, strings.Replace(denyBatch, "ambit.dev/v1alpha1", "ambit.dev", 1), `apiVersion: Unsupported value: "ambit.dev"`, false},
		{"group-missing", denyBatch, strings.Replace(denyBatch, "ambit.dev/v1alpha1", "v1alpha1", 1), `apiVersion: Unsupported value: "v1alpha1"`, false},
		{"apiVersion-missing", denyBatch, strings.Replace(denyBatch, "apiVersion: ambit.dev/v1alpha1\n", "", 1), `apiVersion: Unsupported value: ""`, false},
		{"kind-missing", denyBatch, strings.Replace(denyBatch, "kind: AuthorizationPolicy\n", "", 1), `kind: Unsupported value: ""`, false},
		{"typed-list", denyBatch, "apiVersion: ambit.dev/v1alpha1\nkind: AuthorisationPolicyList\nitems:\n- " +
			strings.ReplaceAll(strings.SplitN(denyBatch, "\n", 3)[2], "\n", "\n  "), `kind: Unsupported value: "AuthorisationPolicy"`, false},
		{"istio-kind", istioDeny, strings.Replace(istioDeny, "kind: AuthorizationPolicy", "kind: AuthorizationPolicies", 1), `kind: Unsupported value: "AuthorizationPolicies"`, false},
		{"istio-version", istioDeny, strings.Replace(istioDeny, "security.istio.io/v1", "security.istio.io/v2", 1), `apiVersion: Unsupported value: "security.istio.io/v2"`, false},
		{"root", strings.Replace(denyBatch, "namespace: shop", "namespace: ambit-system", 1),
			strings.Replace(strings.Replace(denyBatch, "namespace: shop", "namespace: ambit-system", 1), "kind: AuthorizationPolicy", "kind: AuthorizationPolicyy", 1),
			`kind: Unsupported value: "AuthorizationPolicyy"`, true},
		{"istio-root", strings.Replace(istioDeny, "namespace: shop", "namespace: istio-system", 1),
			strings.Replace(strings.Replace(istioDeny, "namespace: shop", "namespace: istio-system", 1), "security.istio.io/v1", "security.istio.io/v1beta2", 1),
			`apiVersion: Unsupported value: "security.istio.io/v1beta2"`, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			write(t, dir, "p.yaml", c.good)
			e := policy.New(policy.Options{Logger: quiet()})
			s := New(dir, e, quiet())
			if p := s.Load(); len(p) != 0 {
				t.Fatal(p)
			}
			if allowed(e, batch) || !allowed(e, ui) || !allowedTo(e, batch, bankDB) {
				t.Fatalf("the good policy is not in force as meant")
			}
			write(t, dir, "p.yaml", c.bad)
			problems := s.Load()
			if allowed(e, batch) {
				t.Fatal("the mistyped DENY was dropped: batch allowed")
			}
			if allowed(e, ui) || allowed(e, "") {
				t.Error("the rest of its namespace is still allowed (want deny-all of the namespace)")
			}
			if got := allowedTo(e, ui, bankDB); got == c.meshWide {
				t.Errorf("another namespace allowed = %v, want %v", got, !c.meshWide)
			}
			scope := "every workload of its namespace"
			if c.meshWide {
				scope = "every workload in the mesh"
			}
			all := problemText(problems)
			for _, want := range []string{"p.yaml", "deny-batch", "Invalid", c.field, "enforced as deny-all for " + scope} {
				if !strings.Contains(all, want) {
					t.Errorf("problems do not mention %q:\n%s", want, all)
				}
			}
			// Fixed: back to the policy as written.
			write(t, dir, "p.yaml", c.good)
			if p := s.Load(); len(p) != 0 || allowed(e, batch) || !allowed(e, ui) {
				t.Fatalf("not back to normal once fixed: %v", p)
			}
		})
	}
}

// TestMistypedWithoutNamespace: a mistyped document naming no namespace
// is treated as today's policies without a namespace are: reported
// invalid, not enforced (a file has no default namespace to confine it
// to). The report used to claim it was enforced.
func TestMistypedWithoutNamespace(t *testing.T) {
	for _, doc := range []string{
		strings.Replace(strings.Replace(denyBatch, "namespace: shop, ", "", 1), "kind: AuthorizationPolicy", "kind: AuthorisationPolicy", 1),
		strings.Replace(denyBatch, "namespace: shop, ", "", 1),
	} {
		dir := t.TempDir()
		write(t, dir, "p.yaml", doc)
		e := policy.New(policy.Options{Logger: quiet()})
		problems := New(dir, e, quiet()).Load()
		all := problemText(problems)
		if !strings.Contains(all, "deny-batch") || !strings.Contains(all, "metadata.namespace: Required value") ||
			!strings.Contains(all, "not enforced: it names no namespace") || strings.Contains(all, "enforced as deny-all") {
			t.Errorf("problems = %s", all)
		}
		if !allowed(e, ui) {
			t.Error("a policy without a namespace is enforced somewhere")
		}
	}
}

// TestOtherGroupsSkipped: documents not meant for Ambit (another group,
// an Istio kind with no L4 meaning, no type at all) are skipped and
// reported; they deny nothing.
func TestOtherGroupsSkipped(t *testing.T) {
	dir := t.TempDir()
	write(t, dir, "a.yaml", `apiVersion: v1
kind: ConfigMap
metadata: {namespace: shop, name: settings}
data: {a: b}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {namespace: shop, name: vs}
spec: {hosts: [web]}
---
apiVersion: policy.linkerd.io/v1alpha1
kind: AuthorizationPolicy
metadata: {namespace: shop, name: linkerd}
spec: {targetRef: {kind: Namespace, name: shop}}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {namespace: shop, name: jwt}
spec: {jwtRules: [{issuer: x}]}
---
apiVersion: security.istio.io/v1beta1
kind: RequestAuthentication
metadata: {namespace: shop, name: jwt-old}
---
nodes: [{name: n1}]
---
just some words
`)
	e := policy.New(policy.Options{Logger: quiet()})
	problems := New(dir, e, quiet()).Load()
	if !allowed(e, ui) || !allowed(e, batch) || !allowed(e, "") {
		t.Fatal("a document not meant for Ambit denied something")
	}
	all := problemText(problems)
	for _, want := range []string{
		"document 1: unsupported kind v1 ConfigMap",
		"document 2: unsupported kind networking.istio.io/v1 VirtualService",
		"document 3: unsupported kind policy.linkerd.io/v1alpha1 AuthorizationPolicy",
		"document 4: security.istio.io/v1 RequestAuthentication is not enforced by Ambit: JWT",
		"document 5: security.istio.io/v1beta1 RequestAuthentication is not enforced by Ambit",
		"document 6: apiVersion and kind are required",
		"document 7: not an object",
	} {
		if !strings.Contains(all, want+"") {
			t.Errorf("problems do not contain %q:\n%s", want, all)
		}
	}
	if n := strings.Count(all, "(document skipped)"); n != 7 {
		t.Errorf("%d documents reported skipped, want 7:\n%s", n, all)
	}
}

// TestNeverParsedFailsClosed: a file that is not YAML and never parsed
// (the agent started on a half-saved edit) may hold a DENY, like a file
// never read: every connection is denied until it parses. Before,
// nothing from it was in force and everything was allowed. Once it has
// parsed, a broken edit keeps the last good version as before.
func TestNeverParsedFailsClosed(t *testing.T) {
	dir := t.TempDir()
	write(t, dir, "10-allow.yaml", allowUI)
	write(t, dir, "20-deny.yaml", denyBatch+"  - from: {principals: [\"unterminated]\n")
	e := policy.New(policy.Options{Logger: quiet()})
	s := New(dir, e, quiet())
	problems := s.Load()
	if allowed(e, ui) || allowedTo(e, ui, bankDB) {
		t.Fatal("connection allowed while a policy file never parsed")
	}
	if all := problemText(problems); !strings.Contains(all, "20-deny.yaml") || !strings.Contains(all, "not valid YAML") ||
		!strings.Contains(all, "every connection in the mesh is denied until the file parses") {
		t.Errorf("problems = %s", all)
	}
	write(t, dir, "20-deny.yaml", denyBatch)
	if p := s.Load(); len(p) != 0 || !allowed(e, ui) || allowed(e, batch) {
		t.Fatalf("not back to the policies once the file parses: %v", p)
	}
	write(t, dir, "20-deny.yaml", "{{ broken")
	problems = s.Load()
	if !allowed(e, ui) || allowed(e, batch) {
		t.Fatal("a broken edit of a file read before did not keep its last good version")
	}
	if all := problemText(problems); !strings.Contains(all, "keeping the file's last good version") {
		t.Errorf("problems = %s", all)
	}
}

// TestRunWithoutInotify: the directory cannot be watched (the node's
// inotify instances, or watches, are exhausted by other daemons). Run
// used to return at once, an error the agent dropped: no edit was seen
// again until a restart. It now looks at the directory by polling,
// reloads only when something changed, and watches again once it can.
func TestRunWithoutInotify(t *testing.T) {
	for _, c := range []struct {
		name   string
		refuse func() (*fsnotify.Watcher, error)
	}{
		{"no instance", func() (*fsnotify.Watcher, error) {
			return nil, fmt.Errorf("couldn't initialize inotify: %w", syscall.EMFILE)
		}},
		{"no watch", func() (*fsnotify.Watcher, error) {
			// A closed watcher fails every Add, as one does when
			// max_user_watches is reached.
			w, err := fsnotify.NewWatcher()
			if err != nil {
				return nil, err
			}
			w.Close()
			return w, nil
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			var refuse atomic.Bool
			refuse.Store(true)
			var tries atomic.Int32
			// Restored after Run has stopped (cleanups run last first).
			t.Cleanup(func(f func() (*fsnotify.Watcher, error), p time.Duration) func() {
				return func() { newWatcher, unwatchedPoll = f, p }
			}(newWatcher, unwatchedPoll))
			newWatcher = func() (*fsnotify.Watcher, error) {
				tries.Add(1)
				if refuse.Load() {
					return c.refuse()
				}
				return fsnotify.NewWatcher()
			}
			unwatchedPoll = 20 * time.Millisecond

			parent := t.TempDir()
			dir := filepath.Join(parent, "policies") // made later
			e := policy.New(policy.Options{Logger: quiet()})
			logs := &testenv.Buffer{}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- New(dir, e, slog.New(slog.NewTextHandler(logs, nil))).Run(ctx) }()
			t.Cleanup(func() {
				cancel()
				if err := <-done; err != nil {
					t.Error(err)
				}
			})

			const warned, again = "cannot watch the policy directory", "watching the policy directory again"
			testenv.Eventually(t, "the watch to be given up", func() bool { return strings.Count(logs.String(), warned) == 1 })
			if err := os.Mkdir(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			write(t, dir, "p.yaml", allowUI)
			testenv.Eventually(t, "the new file to deny batch by polling", func() bool { return !allowed(e, batch) && allowed(e, ui) })
			write(t, dir, "p.yaml", strings.ReplaceAll(allowUI, "front/sa/ui", "jobs/sa/batch"))
			testenv.Eventually(t, "the edit to flip by polling", func() bool { return allowed(e, batch) && !allowed(e, ui) })
			// Five more looks (each tries the watch again) change
			// nothing: no reload for an unchanged directory, one warning
			// for the episode.
			n := tries.Load()
			testenv.Eventually(t, "five more looks", func() bool { return tries.Load() >= n+5 })
			if got := strings.Count(logs.String(), "policies loaded"); got != 3 {
				t.Errorf("%d loads, want 3 (start, new file, edit):\n%s", got, logs)
			}
			if got := strings.Count(logs.String(), warned); got != 1 {
				t.Errorf("%d warnings in one episode", got)
			}

			refuse.Store(false)
			testenv.Eventually(t, "watching again", func() bool { return strings.Count(logs.String(), again) == 1 })
			n = tries.Load()
			write(t, dir, "p.yaml", allowUI)
			testenv.Eventually(t, "the edit to flip back once watching", func() bool { return !allowed(e, batch) && allowed(e, ui) })
			if got := tries.Load(); got != n {
				t.Errorf("the watch was tried %d more times while in place", got-n)
			}
		})
	}
}
