package main

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"debug/elf"
	"encoding/binary"
	"fmt"
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

// tinyStatic writes a stand-in for a static amd64 binary: the test is
// about the image, and building real binaries is slow on a shared machine.
func tinyStatic(t *testing.T, dir, name, msg string) string {
	return fakeELF(t, dir, name, "amd64", false, msg)
}

// singleInputs writes the stand-ins of a single-platform image's inputs
// in dir: the agent's and the plugin's binaries (distinct contents) and
// a CA bundle.
func singleInputs(t *testing.T, dir string) (agent, cni, certs string) {
	t.Helper()
	return tinyStatic(t, dir, "agent", "i am the agent"), tinyStatic(t, dir, "cni", "i am the plugin"), writeCerts(t, dir)
}

// writeCerts writes a stand-in CA bundle, dir/certs.pem: one PEM block
// is all the image's checks look at.
func writeCerts(t *testing.T, dir string) string {
	t.Helper()
	certs := filepath.Join(dir, "certs.pem")
	if err := os.WriteFile(certs, []byte("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return certs
}

// eachTarEntry calls fn for each entry of the tar stream r, with the
// entry's contents to read; a broken stream fails the test.
func eachTarEntry(t *testing.T, r io.Reader, fn func(h *tar.Header, contents io.Reader)) {
	t.Helper()
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		fn(h, tr)
	}
}

// fakeELF writes an ELF header for arch (what readStatic and a runtime
// look at), an optional PT_INTERP program header (a dynamic binary), then
// msg, so each stand-in is distinguishable by content.
func fakeELF(t *testing.T, dir, name, arch string, interp bool, msg string) string {
	t.Helper()
	a := elfArches[arch]
	h := elf.Header64{Type: uint16(elf.ET_EXEC), Machine: uint16(a.machine), Version: uint32(elf.EV_CURRENT),
		Ehsize: 64, Phentsize: 56, Shentsize: 64}
	copy(h.Ident[:], elf.ELFMAG)
	h.Ident[elf.EI_CLASS], h.Ident[elf.EI_DATA], h.Ident[elf.EI_VERSION] = byte(elf.ELFCLASS64), byte(elf.ELFDATA2LSB), byte(elf.EV_CURRENT)
	var progs []elf.Prog64
	if interp {
		h.Phoff, h.Phnum = 64, 1
		progs = append(progs, elf.Prog64{Type: uint32(elf.PT_INTERP), Off: 64 + 56, Filesz: uint64(len(msg))})
	}
	var buf bytes.Buffer
	binary.Write(&buf, binary.LittleEndian, h)
	binary.Write(&buf, binary.LittleEndian, progs)
	buf.WriteString(msg)
	out := filepath.Join(dir, name)
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(out, buf.Bytes(), 0o755); err != nil {
		t.Fatal(err)
	}
	return out
}

// The tarball loads back (as ctr, podman and docker load it), is a valid
// image, has our entrypoint, and holds the binaries byte for byte,
// executable, plus the CA bundle. Building twice gives the same digest.
func TestImageTarball(t *testing.T) {
	dir := t.TempDir()
	agent, cni, certs := singleInputs(t, dir)
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
	eachTarEntry(t, mutate.Extract(img), func(h *tar.Header, r io.Reader) {
		n := strings.TrimSuffix(h.Name, "/")
		files[n] = h
		data[n], _ = io.ReadAll(r)
	})
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
	truncated := filepath.Join(dir, "truncated")
	os.WriteFile(truncated, []byte("\x7fELF\x02\x01\x01"), 0o755)
	dynamic := tinyStatic(t, dir, "dynamic", "\x00/lib64/ld-linux-x86-64.so.2\x00")
	interp := fakeELF(t, dir, "interp", "amd64", true, "/nix/store/ld.so")
	agent := tinyStatic(t, dir, "agent", "x")
	arm := fakeELF(t, dir, "arm", "arm64", false, "x")
	for name, c := range map[string]struct {
		s    Spec
		want string
	}{
		"missing binary": {Spec{Agent: filepath.Join(dir, "nope"), CNI: agent, Arch: "amd64"}, "make build"},
		"not ELF":        {Spec{Agent: script, CNI: agent, Arch: "amd64"}, "not an ELF"},
		"truncated ELF":  {Spec{Agent: truncated, CNI: agent, Arch: "amd64"}, "ELF header"},
		"dynamic":        {Spec{Agent: agent, CNI: dynamic, Arch: "amd64"}, "dynamically linked"},
		"interpreter":    {Spec{Agent: interp, CNI: agent, Arch: "amd64"}, "interpreter"},
		"no arch":        {Spec{Agent: agent, CNI: agent}, "no architecture"},
		"unknown arch":   {Spec{Agent: agent, CNI: agent, Arch: "mips"}, "not one of"},
		"arm64 as amd64": {Spec{Agent: agent, CNI: arm, Arch: "amd64"}, "GOARCH=amd64"},
		"amd64 as arm64": {Spec{Agent: arm, CNI: agent, Arch: "arm64"}, "built for EM_X86_64"},
		"bad certs":      {Spec{Agent: agent, CNI: agent, Arch: "amd64", CACerts: script}, "PEM"},
		"missing certs":  {Spec{Agent: agent, CNI: agent, Arch: "amd64", CACerts: filepath.Join(dir, "nope.pem")}, "CA certificates"},
	} {
		_, err := Build(c.s)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: got %v, want an error saying %q", name, err, c.want)
		}
	}
	if err := run(Spec{Agent: agent, CNI: agent, Arch: "amd64"}, "Not A Valid::Tag", filepath.Join(dir, "x.tar")); err == nil {
		t.Error("bad tag accepted")
	}
}

// The single-platform docker-archive of `make image` is what it was
// before the multi-platform image came: same inputs, same digest (the
// value was computed by the hack/image of commit 5b0da7e from these
// stand-ins). The e2e suites and the docs load this image.
func TestSinglePlatformDigestUnchanged(t *testing.T) {
	dir := t.TempDir()
	agent, cni, certs := singleInputs(t, dir)
	t.Setenv("SOURCE_DATE_EPOCH", "")
	out := filepath.Join(dir, "img.tar")
	if err := run(Spec{Agent: agent, CNI: cni, CACerts: certs, Arch: "amd64", Version: "test"}, "docker.io/ambit-mesh/ambit:dev", out); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprintf("%x", sha256.Sum256(b)); got != singlePlatformTarSHA256 {
		t.Errorf("bin/ambit-image.tar changed: sha256 %s, was %s", got, singlePlatformTarSHA256)
	}
}

const singlePlatformTarSHA256 = "a47117b1a08ae0aa6c3b1bd0841c0fb756c1ec149bc5308e648882bd4ecaf3c1"

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}
