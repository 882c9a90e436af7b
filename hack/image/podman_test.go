package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/install/conflist"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

// A real runtime loads the image made from the real binaries and runs
// both: the agent (its usage) and the plugin (CNI VERSION), i.e. they are
// static and at the paths the manifests name.
func podman(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	b, err := exec.CommandContext(ctx, "podman", append(testenv.PodmanGlobalArgs(), args...)...).CombinedOutput()
	return string(b), err
}

// This machine's root lacks CAP_SYS_RESOURCE: set the rlimits runc sets.
var runArgs = []string{"run", "--rm", "--network", "none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"}

// loadedImage builds the image from the real binaries and loads it into
// podman under a unique tag, removed when the test ends.
func loadedImage(t *testing.T) string {
	t.Helper()
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
	if o, err := podman("load", "-i", out); err != nil || !strings.Contains(o, tag) {
		t.Fatalf("podman load: %v\n%s", err, o)
	}
	t.Cleanup(func() { podman("rmi", "-f", tag) })
	return tag
}

func TestPodmanLoadsAndRunsImage(t *testing.T) {
	tag := loadedImage(t)
	o, err := podman(append(runArgs, tag, "help")...)
	if err != nil || !strings.Contains(o, "usage: ambit-agent") {
		t.Fatalf("running the agent from the image: %v\n%s", err, o)
	}
	o, err = podman(append(runArgs, "-e", "CNI_COMMAND=VERSION", "--entrypoint", CNIPath, tag)...)
	if err != nil || !strings.Contains(o, `"supportedVersions"`) {
		t.Fatalf("running the plugin from the image: %v\n%s", err, o)
	}
}

// The installer as the DaemonSet runs it, from the image, with the host
// directories mounted where the manifests mount them: it copies the
// plugin to the host's bin dir, waits for the agent's socket, chains the
// entry into the host's conflist; `uninstall` from the image restores the
// conflist byte for byte and removes the binary.
func TestPodmanInstallerFromImage(t *testing.T) {
	tag := loadedImage(t)
	host := t.TempDir()
	bin, netd, run := filepath.Join(host, "opt-cni-bin"), filepath.Join(host, "net.d"), filepath.Join(host, "run-ambit")
	for _, d := range []string{bin, netd, run} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	orig := []byte("{\n  \"cniVersion\": \"1.0.0\",\n  \"name\": \"k8s-pod-network\",\n  \"plugins\": [\n    {\"type\": \"calico\", \"ipam\": {\"type\": \"calico-ipam\"}},\n    {\"type\": \"portmap\", \"capabilities\": {\"portMappings\": true}}\n  ]\n}\n")
	primary := filepath.Join(netd, "10-calico.conflist")
	if err := os.WriteFile(primary, orig, 0o644); err != nil {
		t.Fatal(err)
	}
	// The agent's socket, served from the host as the agent container
	// would serve it on the shared /var/run/ambit.
	l, err := cniproto.Listen(filepath.Join(run, "cni.sock"))
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
	mounts := []string{"-v", bin + ":/host/opt/cni/bin", "-v", netd + ":/host/etc/cni/net.d", "-v", run + ":/var/run/ambit"}
	name := "ambit-install-" + filepath.Base(host)
	args := append(append(append([]string{}, runArgs...), "-d", "--name", name), mounts...)
	if o, err := podman(append(args, tag, "install")...); err != nil {
		t.Fatalf("podman run install: %v\n%s", err, o)
	}
	t.Cleanup(func() { podman("rm", "-f", "-t", "0", name) })
	deadline := time.Now().Add(60 * time.Second)
	for {
		b, _ := os.ReadFile(primary)
		if conflist.Has(b, "ambit-cni") {
			if !strings.Contains(string(b), `/var/run/ambit/cni.sock`) {
				t.Fatalf("entry without the agent socket:\n%s", b)
			}
			break
		}
		if time.Now().After(deadline) {
			logs, _ := podman("logs", name)
			t.Fatalf("installer in the image did not chain the entry:\n%s\nlogs:\n%s", b, logs)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if fi, err := os.Stat(filepath.Join(bin, "ambit-cni")); err != nil || fi.Mode().Perm() != 0o755 {
		t.Fatalf("plugin binary on the host: %v %v", fi, err)
	}
	if o, err := podman("rm", "-f", "-t", "5", name); err != nil {
		t.Fatalf("stopping the installer: %v\n%s", err, o)
	}
	if b, _ := os.ReadFile(primary); !strings.Contains(string(b), "ambit-cni") {
		t.Fatal("stopping the agent removed the entry; it must stay (upgrades, restarts)")
	}
	if o, err := podman(append(append(append([]string{}, runArgs...), mounts...), tag, "uninstall")...); err != nil {
		t.Fatalf("uninstall from the image: %v\n%s", err, o)
	}
	if b, _ := os.ReadFile(primary); string(b) != string(orig) {
		t.Fatalf("uninstall did not restore the conflist byte for byte:\n%s", b)
	}
	if _, err := os.Stat(filepath.Join(bin, "ambit-cni")); !os.IsNotExist(err) {
		t.Fatalf("plugin binary left on the host: %v", err)
	}
}

// The multi-platform archive loads where users load images: `podman load`
// takes the host's platform from the index, under the tag, and runs the
// real agent and plugin from it; `podman pull --platform` takes the other
// one. The host's binaries are real; the other platform's are stand-ins
// with its ELF header (this machine cannot run them; the registry test
// and TestMultiPlatformArchive check what each platform holds).
func TestPodmanLoadsMultiPlatformImage(t *testing.T) {
	testenv.RequireRoot(t)
	if _, err := exec.LookPath("podman"); err != nil {
		t.Fatalf("podman is required (make deps installs it): %v", err)
	}
	other := map[string]string{"amd64": "arm64"}[runtime.GOARCH]
	if other == "" {
		other = "amd64"
	}
	dir := t.TempDir()
	for _, bin := range []string{"ambit-agent", "ambit-cni"} {
		os.MkdirAll(filepath.Join(dir, "linux_"+runtime.GOARCH), 0o755)
		if err := os.Symlink(testenv.Binary(t, bin), filepath.Join(dir, "linux_"+runtime.GOARCH, bin)); err != nil {
			t.Fatal(err)
		}
		fakeELF(t, dir, "linux_"+other+"/"+bin, other, false, bin+" for "+other)
	}
	b := make([]byte, 4)
	rand.Read(b)
	tag := "localhost/ambit-image-test:multi-" + hex.EncodeToString(b)
	out := filepath.Join(t.TempDir(), "multi.tar")
	m := MultiSpec{
		Platforms: []Platform{{OS: "linux", Arch: "amd64"}, {OS: "linux", Arch: "arm64"}},
		Agent:     filepath.Join(dir, "{platform}", "ambit-agent"),
		CNI:       filepath.Join(dir, "{platform}", "ambit-cni"),
		CACerts:   "/etc/ssl/certs/ca-certificates.crt",
		Version:   "test",
	}
	err := runIndex(m, tag, out, "")
	if err != nil {
		t.Fatal(err)
	}
	// runIndex dated the images from SOURCE_DATE_EPOCH, as this does.
	if m.Created, err = created(); err != nil {
		t.Fatal(err)
	}
	idx, err := BuildIndex(m)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := idx.Digest()
	t.Cleanup(func() { podman("rmi", "-f", tag) })
	if o, err := podman("load", "-i", out); err != nil || !strings.Contains(o, "Loaded image: "+tag) {
		t.Fatalf("podman load: %v\n%s", err, o)
	}
	o, err := podman("image", "inspect", "--format", "{{.Os}}/{{.Architecture}} {{.Digest}}", tag)
	if err != nil || strings.TrimSpace(o) != "linux/"+runtime.GOARCH+" "+want.String() {
		t.Fatalf("loaded image: %v %q, want linux/%s %s", err, o, runtime.GOARCH, want)
	}
	o, err = podman(append(runArgs, tag, "help")...)
	if err != nil || !strings.Contains(o, "usage: ambit-agent") {
		t.Fatalf("running the agent from the multi-platform image: %v\n%s", err, o)
	}
	o, err = podman(append(runArgs, "-e", "CNI_COMMAND=VERSION", "--entrypoint", CNIPath, tag)...)
	if err != nil || !strings.Contains(o, `"supportedVersions"`) {
		t.Fatalf("running the plugin from the multi-platform image: %v\n%s", err, o)
	}
	if o, err := podman("rmi", "-f", tag); err != nil {
		t.Fatalf("podman rmi: %v\n%s", err, o)
	}
	if o, err := podman("pull", "--platform", "linux/"+other, "oci-archive:"+out); err != nil {
		t.Fatalf("podman pull --platform linux/%s: %v\n%s", other, err, o)
	}
	o, err = podman("image", "inspect", "--format", "{{.Os}}/{{.Architecture}}", tag)
	if err != nil || strings.TrimSpace(o) != "linux/"+other {
		t.Fatalf("pulled for linux/%s: %v %q", other, err, o)
	}
}
