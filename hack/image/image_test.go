package main

import (
	"archive/tar"
	"bytes"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/validate"
)

// tinyStatic writes a stand-in for a static binary: the test is about
// the image, and building real binaries is slow on a shared machine.
func tinyStatic(t *testing.T, dir, name, msg string) string {
	t.Helper()
	out := filepath.Join(dir, name)
	if err := os.WriteFile(out, append([]byte("\x7fELF\x02\x01\x01"), msg...), 0o755); err != nil {
		t.Fatal(err)
	}
	return out
}

// The tarball loads back (as ctr, podman and docker load it), is a valid
// image, has our entrypoint, and holds the binaries byte for byte,
// executable, plus the CA bundle. Building twice gives the same digest.
func TestImageTarball(t *testing.T) {
	dir := t.TempDir()
	agent := tinyStatic(t, dir, "agent", "i am the agent")
	cni := tinyStatic(t, dir, "cni", "i am the plugin")
	certs := filepath.Join(dir, "certs.pem")
	if err := os.WriteFile(certs, []byte("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "img.tar")
	s := Spec{Agent: agent, CNI: cni, CACerts: certs, Arch: "amd64", Version: "test"}
	if err := run(s, "ambit-mesh/ambit:test", out); err != nil {
		t.Fatal(err)
	}
	tag, _ := name.NewTag("ambit-mesh/ambit:test")
	img, err := tarball.ImageFromPath(out, &tag)
	if err != nil {
		t.Fatalf("tarball does not load: %v", err)
	}
	if err := validate.Image(img); err != nil {
		t.Fatalf("invalid image: %v", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if len(cf.Config.Entrypoint) != 1 || cf.Config.Entrypoint[0] != AgentPath || cf.OS != "linux" || cf.Architecture != "amd64" {
		t.Fatalf("config: entrypoint %v os %s arch %s", cf.Config.Entrypoint, cf.OS, cf.Architecture)
	}
	files := map[string]*tar.Header{}
	data := map[string][]byte{}
	tr := tar.NewReader(mutate.Extract(img))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		n := strings.TrimSuffix(h.Name, "/")
		files[n] = h
		data[n], _ = io.ReadAll(tr)
	}
	for path, src := range map[string]string{AgentPath: agent, CNIPath: cni, CertsPath: certs} {
		want, _ := os.ReadFile(src)
		h, ok := files[path[1:]]
		if !ok {
			t.Fatalf("%s missing from the image; have %v", path, keys(files))
		}
		if !bytes.Equal(data[path[1:]], want) {
			t.Errorf("%s differs from its source", path)
		}
		if path != CertsPath && h.Mode&0o111 == 0 {
			t.Errorf("%s is not executable (%o)", path, h.Mode)
		}
	}
	if h := files["tmp"]; h == nil || h.Typeflag != tar.TypeDir || h.Mode&0o1777 != 0o1777 {
		t.Errorf("no world-writable sticky /tmp: %+v", h)
	}
	d1, _ := img.Digest()
	out2 := filepath.Join(dir, "img2.tar")
	if err := run(s, "ambit-mesh/ambit:test", out2); err != nil {
		t.Fatal(err)
	}
	img2, err := tarball.ImageFromPath(out2, &tag)
	if err != nil {
		t.Fatal(err)
	}
	if d2, _ := img2.Digest(); d1 != d2 {
		t.Errorf("not reproducible: %s vs %s", d1, d2)
	}
}

func TestImageRefusesBadInput(t *testing.T) {
	dir := t.TempDir()
	script := filepath.Join(dir, "script")
	os.WriteFile(script, []byte("#!/bin/sh\n"), 0o755)
	dynamic := tinyStatic(t, dir, "dynamic", "\x00/lib64/ld-linux-x86-64.so.2\x00")
	agent := tinyStatic(t, dir, "agent", "x")
	for name, s := range map[string]Spec{
		"missing binary": {Agent: filepath.Join(dir, "nope"), CNI: agent, Arch: "amd64"},
		"not ELF":        {Agent: script, CNI: agent, Arch: "amd64"},
		"dynamic":        {Agent: agent, CNI: dynamic, Arch: "amd64"},
		"no arch":        {Agent: agent, CNI: agent},
		"bad certs":      {Agent: agent, CNI: agent, Arch: "amd64", CACerts: script},
	} {
		if _, err := Build(s); err == nil {
			t.Errorf("%s: built anyway", name)
		}
	}
	if err := run(Spec{Agent: agent, CNI: agent, Arch: "amd64"}, "Not A Valid::Tag", filepath.Join(dir, "x.tar")); err == nil {
		t.Error("bad tag accepted")
	}
}

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}
