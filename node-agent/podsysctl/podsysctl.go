package podsysctl

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// Writer sets sysctls inside network namespaces. Safe for concurrent use;
// calls are served one at a time by the Writer's thread.
type Writer struct {
	once  sync.Once
	reqs  chan request
	start error  // why the private /proc could not be set up, if not
	proc  string // "private procfs" or "the process's /proc", for logs
}

type request struct {
	netns *os.File
	key   string // the file under /proc/sys (keyPath of the dotted name)
	value string
	done  chan error
}

// Set writes value to sysctl key (dotted, e.g. "net.ipv4.tcp_migrate_req")
// inside the network namespace netns refers to.
func (w *Writer) Set(netns *os.File, key, value string) error {
	path, err := keyPath(key)
	if err != nil {
		return err
	}
	w.once.Do(w.startThread)
	r := request{netns: netns, key: path, value: value, done: make(chan error, 1)}
	w.reqs <- r
	return <-r.done
}

// Mode says how the Writer reaches /proc/sys: "private procfs" or, when
// that could not be set up, "the process's /proc" and why.
func (w *Writer) Mode() string {
	w.once.Do(w.startThread)
	if w.start != nil {
		return w.proc + " (" + w.start.Error() + ")"
	}
	return w.proc
}

// keyPath turns a dotted sysctl name into its path under /proc/sys,
// refusing anything that could leave the net subtree.
func keyPath(key string) (string, error) {
	if !strings.HasPrefix(key, "net.") || strings.Contains(key, "/") || strings.Contains(key, "..") {
		return "", fmt.Errorf("podsysctl: %q is not a network sysctl", key)
	}
	return filepath.Join("/proc/sys", strings.ReplaceAll(key, ".", "/")), nil
}

func (w *Writer) startThread() {
	w.reqs = make(chan request)
	ready := make(chan struct{})
	go w.thread(ready)
	<-ready
}

// thread is the Writer's OS thread. It never unlocks: its mount and
// network namespaces are not the process's, so the runtime must not hand
// it to other goroutines; when it returns, the runtime ends the thread.
// ready is closed once the mode is known (nil for a replacement thread).
func (w *Writer) thread(ready chan<- struct{}) {
	runtime.LockOSThread()
	home, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
	if err == nil {
		defer home.Close()
		err = privateProc()
	}
	if ready != nil {
		w.start, w.proc = err, "private procfs"
		if err != nil {
			w.proc = "the process's /proc"
		}
		close(ready)
	}
	for r := range w.reqs {
		err := write(r, home)
		r.done <- err
		if errors.Is(err, errStranded) {
			// This thread is stuck in a pod's namespace: it ends with
			// this goroutine, a fresh one serves the rest.
			go w.thread(nil)
			return
		}
	}
}

// privateProc moves this thread into a mount namespace of its own and
// mounts a fresh procfs over /proc there.
func privateProc() error {
	if err := unix.Unshare(unix.CLONE_NEWNS); err != nil {
		return fmt.Errorf("unshare mount namespace: %w", err)
	}
	// Private first: a shared /proc mount would otherwise carry the new
	// mount back to the container (and maybe the host).
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("making mounts private: %w", err)
	}
	if err := unix.Mount("proc", "/proc", "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("mounting procfs: %w", err)
	}
	return nil
}

var errStranded = errors.New("podsysctl: could not return to the agent's network namespace")

func write(r request, home *os.File) error {
	if home == nil {
		return errors.New("podsysctl: the agent's own network namespace is not known")
	}
	if err := unix.Setns(int(r.netns.Fd()), unix.CLONE_NEWNET); err != nil {
		return fmt.Errorf("podsysctl: entering the pod's network namespace: %w", err)
	}
	werr := os.WriteFile(r.key, []byte(r.value), 0)
	if err := unix.Setns(int(home.Fd()), unix.CLONE_NEWNET); err != nil {
		return errStranded
	}
	if werr != nil {
		return fmt.Errorf("podsysctl: %w", werr)
	}
	return nil
}
