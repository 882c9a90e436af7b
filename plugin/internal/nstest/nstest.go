// Package nstest creates the throw-away network namespaces the plugin's
// privileged tests run in: named with the plugin's prefix (amb-plg-) plus
// a random suffix so parallel engineers and runs never collide, and
// deleted when the test ends.
package nstest

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netns"
)

// Prefix starts the name of every namespace these tests create.
const Prefix = "amb-plg-"

// Name returns a fresh namespace name for role ("pod", "node", …).
func Name(role string) string {
	b := make([]byte, 4)
	rand.Read(b)
	return Prefix + role + "-" + hex.EncodeToString(b)
}

// New creates a named network namespace (visible to `ip netns`) and
// returns it open; the test's cleanup closes and deletes it.
func New(t testing.TB, role string) ns.NetNS {
	t.Helper()
	name := Name(role)
	n, err := Create(name)
	if err != nil {
		t.Fatalf("creating netns %s: %v", name, err)
	}
	t.Cleanup(func() { Delete(n, name) })
	return n
}

// Run runs a command inside n (ip, nft, sysctl: set-up the test needs)
// and fails the test with its output when it fails.
func Run(t testing.TB, n ns.NetNS, args ...string) {
	t.Helper()
	if err := n.Do(func(ns.NetNS) error {
		out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("%v: %v: %s", args, err, out)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// Create makes a named netns without touching the caller's namespace.
func Create(name string) (ns.NetNS, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		return nil, err
	}
	defer orig.Close()
	h, err := netns.NewNamed(name)
	if serr := netns.Set(orig); serr != nil {
		// The thread is in the wrong namespace; never reuse it.
		panic("nstest: cannot return to the original netns: " + serr.Error())
	}
	if err != nil {
		return nil, err
	}
	h.Close()
	return ns.GetNS(Path(name))
}

// Path is where a named namespace is bound.
func Path(name string) string { return filepath.Join("/var/run/netns", name) }

// Delete closes n and removes its name, so the kernel frees it once no
// process uses it.
func Delete(n ns.NetNS, name string) {
	if n != nil {
		n.Close()
	}
	if err := netns.DeleteNamed(name); err != nil && !os.IsNotExist(err) {
		_ = os.Remove(Path(name))
	}
}
