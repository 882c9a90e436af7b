package install

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

// Standalone `install` writes the conflist only once the agent socket
// accepts connections.
func TestCommandInstallWaitsForSocket(t *testing.T) {
	n := newNode(t)
	orig := fixture(t, "10-calico.conflist")
	primary := filepath.Join(n.conf, "10-calico.conflist")
	if err := os.WriteFile(primary, orig, 0o644); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "cni.sock")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- Command(ctx, "install", []string{"-cni-bin-dir", n.bin, "-cni-conf-dir", n.conf, "-cni-plugin-source", n.src, "-cni-agent-socket", sock}, Hooks{Logger: n.log})
	}()
	t.Cleanup(func() { cancel(); <-done })
	eventually(t, "binary", func() bool { _, err := os.Stat(filepath.Join(n.bin, PluginType)); return err == nil })
	time.Sleep(300 * time.Millisecond) // > one socket poll
	if b, _ := os.ReadFile(primary); !bytes.Equal(b, orig) {
		t.Fatal("conflist written while no agent listens")
	}
	l, err := cniproto.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	eventually(t, "entry once the agent listens", func() bool { return hasEntry(primary) })
	b, _ := os.ReadFile(primary)
	if !strings.Contains(string(b), sock) {
		t.Fatalf("entry does not carry the socket flag:\n%s", b)
	}
}

func TestCommandUninstallFlags(t *testing.T) {
	n := newNode(t)
	args := []string{"-cni-bin-dir", n.bin, "-cni-conf-dir", n.conf, "-cni-plugin-source", n.src}
	primary := filepath.Join(n.conf, "10-flannel.conflist")
	orig := fixture(t, "10-flannel.conflist")
	if err := os.WriteFile(primary, orig, 0o644); err != nil {
		t.Fatal(err)
	}
	c, _ := n.config().withDefaults()
	e, _ := entryOf(c.Entry)
	in := &installer{cfg: c, entry: e, m: n.m, log: n.log}
	if err := in.reconcile(); err != nil || !hasEntry(primary) {
		t.Fatalf("install: %v", err)
	}
	if err := Command(context.Background(), "uninstall", append(args, "-unenroll-all"), Hooks{}); err == nil {
		t.Fatal("--unenroll-all without agent support succeeded silently")
	}
	if b, _ := os.ReadFile(primary); !bytes.Equal(b, orig) {
		t.Fatal("unsupported --unenroll-all must still remove the entry")
	}
	called := false
	if err := Command(context.Background(), "uninstall", append(args, "-unenroll-all"), Hooks{UnenrollAll: func(context.Context) error { called = true; return nil }}); err != nil || !called {
		t.Fatalf("uninstall --unenroll-all: %v, called=%v", err, called)
	}
	// The agent's own flags (how it reaches the API server) parse with
	// ours; the hook's error (annotations not cleared) is the command's.
	var node string
	h := Hooks{
		Flags: func(cmd string, fs *flag.FlagSet) { fs.StringVar(&node, "node-name", "", "") },
		UnenrollAll: func(context.Context) error {
			return errors.New("status of " + node + "'s pods not cleared: API server unreachable")
		},
	}
	if err := Command(context.Background(), "uninstall", append(args, "-unenroll-all", "-node-name", "node-7"), h); err == nil || !strings.Contains(err.Error(), "node-7") || !strings.Contains(err.Error(), "unreachable") {
		t.Fatalf("uninstall --unenroll-all, API unreachable: %v", err)
	}
	if err := Command(context.Background(), "bogus", nil, Hooks{}); err == nil {
		t.Fatal("unknown command accepted")
	}
}
