package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
)

// A real runtime loads the image made from the real binaries and runs
// both: the agent (its usage) and the plugin (CNI VERSION), i.e. they are
// static and at the paths the manifests name.
func TestPodmanLoadsAndRunsImage(t *testing.T) {
	testenv.RequireRoot(t)
	if _, err := exec.LookPath("podman"); err != nil {
		t.Fatalf("podman is required (make deps installs it): %v", err)
	}
	agent, cni := testenv.Binary(t, "ambit-agent"), testenv.Binary(t, "ambit-cni")
	b := make([]byte, 4)
	rand.Read(b)
	tag := "localhost/ambit-image-test:" + hex.EncodeToString(b)
	out := filepath.Join(t.TempDir(), "image.tar")
	if err := run(Spec{Agent: agent, CNI: cni, CACerts: "/etc/ssl/certs/ca-certificates.crt", Arch: "amd64", Version: "test"}, tag, out); err != nil {
		t.Fatal(err)
	}
	podman := func(args ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		b, err := exec.CommandContext(ctx, "podman", args...).CombinedOutput()
		return string(b), err
	}
	if o, err := podman("load", "-i", out); err != nil || !strings.Contains(o, tag) {
		t.Fatalf("podman load: %v\n%s", err, o)
	}
	t.Cleanup(func() { podman("rmi", "-f", tag) })
	// This machine's root lacks CAP_SYS_RESOURCE: set rlimits runc may set.
	runArgs := []string{"run", "--rm", "--network", "none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"}
	o, err := podman(append(runArgs, tag, "help")...)
	if err != nil || !strings.Contains(o, "usage: ambit-agent") {
		t.Fatalf("running the agent from the image: %v\n%s", err, o)
	}
	o, err = podman(append(runArgs, "-e", "CNI_COMMAND=VERSION", "--entrypoint", CNIPath, tag)...)
	if err != nil || !strings.Contains(o, `"supportedVersions"`) {
		t.Fatalf("running the plugin from the image: %v\n%s", err, o)
	}
}
