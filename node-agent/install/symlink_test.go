package install

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/node-agent/install/conflist"
)

// Some primary CNIs keep their conflist elsewhere and link it into the
// config directory, and distributions manage /etc/cni/net.d as links. The
// runtime reads through the link; the link's owner updates the target.
// So the installer chains by editing the target and keeps the link:
// replacing the link with a regular file froze the primary's config at
// install time (its later rewrites of the target never reached the
// runtime), and uninstall then left a file where the link was. Uninstall
// gives back the link and the target's bytes.
func TestSymlinkedPrimary(t *testing.T) {
	for _, tc := range []struct {
		name string
		// where the target lives, relative to the config directory's
		// parent, and whether the link is relative
		dir      string
		relative bool
	}{
		{"absolute link outside the directory", "calico-store", false},
		{"relative link into a subdirectory", "net.d/..data", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := newNode(t)
			// No resync: the owner's rewrite must be seen by
			// watching the target's directory.
			cfg := n.config()
			cfg.Resync = time.Hour
			store := filepath.Join(filepath.Dir(n.conf), tc.dir)
			if err := os.MkdirAll(store, 0o755); err != nil {
				t.Fatal(err)
			}
			orig := fixture(t, "10-calico.conflist")
			target := filepath.Join(store, "10-calico.conflist")
			if err := os.WriteFile(target, orig, 0o640); err != nil {
				t.Fatal(err)
			}
			link := filepath.Join(n.conf, "10-calico.conflist")
			dest := target
			if tc.relative {
				dest, _ = filepath.Rel(n.conf, target)
			}
			if err := os.Symlink(dest, link); err != nil {
				t.Fatal(err)
			}
			isLink := func(what string) {
				t.Helper()
				got, err := os.Readlink(link)
				if err != nil || got != dest {
					fi, _ := os.Lstat(link)
					t.Fatalf("%s: %s is no longer a link to %s (readlink %q, %v; mode %v)", what, link, dest, got, err, fi.Mode())
				}
			}
			stop := run(t, cfg)
			eventually(t, "install", func() bool { return hasEntry(link) })
			isLink("after install")
			if !hasEntry(target) {
				t.Fatal("the target does not hold our entry")
			}
			if fi, _ := os.Stat(target); fi.Mode().Perm() != 0o640 {
				t.Fatalf("target mode %v, want 0640", fi.Mode().Perm())
			}

			// The owner rewrites its file (atomically, in its own
			// directory): the runtime sees the new config, with us.
			updated := bytes.Replace(orig, []byte(`"mtu": 0`), []byte(`"mtu": 1410`), 1)
			if bytes.Equal(updated, orig) {
				t.Fatal("fixture changed: no mtu to update")
			}
			tmp := target + ".new"
			os.WriteFile(tmp, updated, 0o640)
			if err := os.Rename(tmp, target); err != nil {
				t.Fatal(err)
			}
			eventually(t, "re-assert after the owner's rewrite", func() bool {
				b, _ := os.ReadFile(link)
				return hasEntry(link) && strings.Contains(string(b), `"mtu": 1410`)
			})
			isLink("after the owner's rewrite")
			stop()

			if err := Uninstall(context.Background(), n.config()); err != nil {
				t.Fatal(err)
			}
			isLink("after uninstall")
			if got, _ := os.ReadFile(target); !bytes.Equal(got, updated) {
				t.Fatalf("target not restored byte for byte:\n%s", got)
			}
		})
	}
}

// A link the installer cannot follow (in the agent's container only the
// CNI directory is mounted, so an absolute link out of it dangles there)
// is reported, not passed over in silence: the runtime on the host may
// use it while we chain into the next file.
func TestDanglingLinkIsReported(t *testing.T) {
	n := newNode(t)
	link := filepath.Join(n.conf, "05-cilium.conflist")
	if err := os.Symlink("/nonexistent/ambit-test/05-cilium.conflist", link); err != nil {
		t.Fatal(err)
	}
	p, skipped, err := conflist.FindPrimary(n.conf)
	if err != conflist.ErrNoPrimary || p != nil {
		t.Fatalf("FindPrimary = %v, %v", p, err)
	}
	if len(skipped) != 1 || skipped[0].Path != link || !strings.Contains(skipped[0].Reason.Error(), "cannot be followed") {
		t.Fatalf("skipped = %v, want the link reported", skipped)
	}
}
