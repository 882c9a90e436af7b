package admin

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestListenRefusesAPlantedSymlink: an admin directory that is a
// symbolic link (planted, or left by hand) is refused. Followed, the
// agent (root) made whatever it names 0700 and put its socket there.
func TestListenRefusesAPlantedSymlink(t *testing.T) {
	src, _, _ := sources(t)
	dir := shortDir(t)
	elsewhere := shortDir(t)
	if err := os.Chmod(elsewhere, 0o755); err != nil {
		t.Fatal(err)
	}
	// A dead agent's socket name there: Prune must not reach it either.
	bystander := filepath.Join(elsewhere, "00000000000000000000-dead.sock")
	if err := os.WriteFile(bystander, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(elsewhere, filepath.Join(dir, SocketDir)); err != nil {
		t.Fatal(err)
	}
	Prune(dir, func(string) bool { return false })
	if _, err := os.Stat(bystander); err != nil {
		t.Fatalf("Prune followed the symlink and removed %s: %v", bystander, err)
	}
	s, err := Listen(SocketPath(dir, "00000000000000000001-abcd"), src, nil)
	if err == nil {
		s.Close()
	}
	fi, _ := os.Stat(elsewhere)
	ents, _ := os.ReadDir(elsewhere)
	if err == nil || fi.Mode().Perm() != 0o755 || len(ents) != 1 {
		t.Fatalf("Listen through a symlinked admin dir: err %v; the target's mode now %v, %d entries (want refused, 0755, 1)", err, fi.Mode().Perm(), len(ents))
	}
	if !strings.Contains(err.Error(), "symbolic link") {
		t.Fatalf("error does not say why: %v", err)
	}
}

// TestListenRefusesAForeignAdminDir: an admin directory owned by another
// user is refused: its owner could replace the socket with one of its
// own and answer the operator's `status`, whatever mode the agent sets.
func TestListenRefusesAForeignAdminDir(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: gives the directory to another user (SKIPPED: not root)")
	}
	src, _, _ := sources(t)
	dir := shortDir(t)
	adm := filepath.Join(dir, SocketDir)
	if err := os.Mkdir(adm, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(adm, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	s, err := Listen(SocketPath(dir, "00000000000000000001-abcd"), src, nil)
	if err == nil {
		s.Close()
		t.Fatal("Listen served in a directory owned by uid 65534")
	}
	if !strings.Contains(err.Error(), "owned by uid 65534") {
		t.Fatalf("error does not say why: %v", err)
	}
}

// TestListenAfterKill: a socket left by a killed agent (no unlink) in a
// directory left 0755 does not stop the next start, which makes the
// directory 0700 again.
func TestListenAfterKill(t *testing.T) {
	src, _, _ := sources(t)
	dir := shortDir(t)
	path := SocketPath(dir, "00000000000000000001-abcd")
	os.MkdirAll(filepath.Dir(path), 0o755)
	os.Chmod(filepath.Dir(path), 0o755)
	l, err := listenUnix(path)
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	s, err := Listen(path, src, nil)
	if err != nil {
		t.Fatalf("start after a kill: %v", err)
	}
	defer s.Close()
	if fi, _ := os.Stat(filepath.Dir(path)); fi.Mode().Perm() != 0o700 {
		t.Fatalf("admin dir mode %v, want 0700", fi.Mode().Perm())
	}
}

func listenUnix(path string) (*net.UnixListener, error) {
	return net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
}
