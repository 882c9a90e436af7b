// Package testenv holds what every privileged test of the project needs:
// the root check (skipping loudly when not root), the repository root, the
// built binaries and the reference CNI plugin sets to test against.
package testenv

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// RequireRoot skips t, loudly, when the test cannot create network
// namespaces and firewall rules. CI runs as root, so nothing is skipped there.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("SKIPPED: needs root (network namespaces, nftables/iptables); CI runs as root")
	}
}

// OpenFDs counts this process's open descriptors (/proc/self/fd): a
// socket or namespace file that a component running in the test process
// failed to close shows here.
func OpenFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// RepoRoot is the top of the repository.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

var buildOnce sync.Map // binary name -> *onceResult

type onceResult struct {
	once sync.Once
	path string
	err  error
}

// Binary builds (once per test process) and returns bin/<name> from its
// package: "ambit-cni" from ./plugin, "ambit-agent" from ./node-agent.
func Binary(t testing.TB, name string) string {
	t.Helper()
	pkgs := map[string]string{"ambit-cni": "./plugin", "ambit-agent": "./node-agent"}
	pkg, ok := pkgs[name]
	if !ok {
		t.Fatalf("testenv: unknown binary %q", name)
	}
	// AMBIT_BIN_DIR points at binaries already built (`make build` puts
	// them in bin/), for iterating on tests without relinking.
	if dir := os.Getenv("AMBIT_BIN_DIR"); dir != "" {
		p := filepath.Join(dir, name)
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("testenv: AMBIT_BIN_DIR=%s: %v", dir, err)
		}
		return p
	}
	v, _ := buildOnce.LoadOrStore(name, &onceResult{})
	r := v.(*onceResult)
	r.once.Do(func() {
		root := RepoRoot()
		// A private copy per test process: make may rebuild bin/ meanwhile.
		dir, err := binDir()
		if err != nil {
			r.err = err
			return
		}
		out := filepath.Join(dir, name)
		// Same flags as `make build`, so the build cache is shared with it.
		cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", out, pkg)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if b, err := cmd.CombinedOutput(); err != nil {
			r.err = &buildError{name: name, out: string(b), err: err}
			return
		}
		r.path = out
	})
	if r.err != nil {
		t.Fatalf("testenv: %v", r.err)
	}
	return r.path
}

// Main runs the tests of a package that builds binaries and then removes
// them: every test process used to leave its copies (4 MB of ambit-cni,
// 34 MB of ambit-agent) in the temp dir, hundreds of them after a day of
// test runs. Use it as the package's TestMain:
//
//	func TestMain(m *testing.M) { os.Exit(testenv.Main(m)) }
func Main(m *testing.M) int {
	code := m.Run()
	RemoveBinaries()
	return code
}

// RemoveBinaries removes the binaries this process built (for a TestMain
// of its own; see Main). Binary must not be called afterwards.
func RemoveBinaries() {
	binMu.Lock()
	defer binMu.Unlock()
	if binLock != nil {
		os.RemoveAll(binLock.Name())
		binLock.Close()
		binLock = nil
	}
}

// binPrefix names the directories of built binaries in the temp dir.
const binPrefix = "ambit-bin-p-"

var (
	binMu   sync.Mutex
	binLock *os.File // this process's binary directory, flock'ed while it lives
)

// binDir returns this process's directory for built binaries, made on
// first use and held with flock(2) for the life of the process, so a
// later test process recognises the directory of one that died without
// removing it (killed at its timeout, a package without Main) and
// removes it, whatever became of its PID.
func binDir() (string, error) {
	binMu.Lock()
	defer binMu.Unlock()
	if binLock != nil {
		return binLock.Name(), nil
	}
	sweepBinDirs()
	dir, err := os.MkdirTemp("", binPrefix)
	if err != nil {
		return "", err
	}
	f, err := os.Open(dir)
	if err == nil {
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
	}
	if err != nil {
		if f != nil {
			f.Close()
		}
		os.RemoveAll(dir)
		return "", err
	}
	binLock = f
	return dir, nil
}

// sweepBinDirs removes the binary directories of test processes that are
// gone: those nobody holds a lock on. A directory younger than a minute
// may be one another process made and is about to lock: left alone.
func sweepBinDirs() {
	tmp := os.TempDir()
	ents, err := os.ReadDir(tmp)
	if err != nil {
		return
	}
	for _, e := range ents {
		if !e.IsDir() || !strings.HasPrefix(e.Name(), binPrefix) {
			continue
		}
		if fi, err := e.Info(); err != nil || time.Since(fi.ModTime()) < time.Minute {
			continue
		}
		dir := filepath.Join(tmp, e.Name())
		f, err := os.Open(dir)
		if err != nil {
			continue
		}
		if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
			f.Close()
			continue // its process lives
		}
		os.RemoveAll(dir)
		f.Close()
	}
}

type buildError struct {
	name, out string
	err       error
}

func (e *buildError) Error() string {
	return "building " + e.name + ": " + e.err.Error() + "\n" + e.out
}

// PluginSet is one set of reference CNI plugins (bridge, host-local,
// portmap, loopback) to run our plugin behind.
type PluginSet struct {
	Name string // "debian-1.1.1" or "v1.10.0"
	Dir  string
	// MaxCNIVersion is the newest spec version the set accepts.
	MaxCNIVersion string
}

// PluginSets returns the sets present on this machine: Debian's package
// (spec ≤ 1.0.0) and the current release built by hack/deps.sh (1.1.0).
// A missing set fails the test: `make test` installs both.
func PluginSets(t testing.TB) []PluginSet {
	t.Helper()
	sets := []PluginSet{
		{Name: "debian-1.1.1", Dir: "/usr/lib/cni", MaxCNIVersion: "1.0.0"},
		{Name: "v1.10.0", Dir: filepath.Join(RepoRoot(), ".cache", "cni-plugins", "v1.10.0"), MaxCNIVersion: "1.1.0"},
	}
	if d := os.Getenv("CNI_PLUGINS_DIR"); d != "" {
		sets[1].Dir = d
	}
	for _, s := range sets {
		if _, err := os.Stat(filepath.Join(s.Dir, "bridge")); err != nil {
			t.Fatalf("testenv: reference CNI plugins %s missing in %s (run hack/deps.sh): %v", s.Name, s.Dir, err)
		}
	}
	return sets
}
