package main

import (
	"archive/tar"
	"bytes"
	"debug/elf"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Spec is what goes into the image.
type Spec struct {
	Agent, CNI string // paths of the static binaries
	CACerts    string // PEM bundle for /etc/ssl/certs/ca-certificates.crt; "" = none
	Arch       string // GOARCH, e.g. amd64
	Variant    string // CPU variant (v7 for arm); "" = none, as in today's image
	Created    time.Time
	Version    string // org.opencontainers.image.version label
	// OCI selects OCI media types for the manifest, config and layer.
	// An OCI image index must not mix in Docker schema 2 manifests, while
	// the docker-archive of `make image` keeps Docker's so its digest
	// stays what it was.
	OCI bool
}

// Paths inside the image (the manifests and the installer rely on them).
const (
	AgentPath = "/usr/local/bin/ambit-agent"
	CNIPath   = "/usr/local/bin/ambit-cni"
	CertsPath = "/etc/ssl/certs/ca-certificates.crt"
)

type entry struct {
	name string
	mode int64
	dir  bool
	data []byte
}

// Build returns the image described by s.
func Build(s Spec) (v1.Image, error) {
	if s.Arch == "" {
		return nil, fmt.Errorf("no architecture given")
	}
	agent, err := readStatic(s.Agent, s.Arch)
	if err != nil {
		return nil, err
	}
	cni, err := readStatic(s.CNI, s.Arch)
	if err != nil {
		return nil, err
	}
	ents := []entry{
		{name: "etc/", dir: true, mode: 0o755},
		{name: "etc/passwd", mode: 0o644, data: []byte("root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n")},
		{name: "etc/group", mode: 0o644, data: []byte("root:x:0:\nnonroot:x:65532:\n")},
		{name: "etc/ssl/", dir: true, mode: 0o755},
		{name: "etc/ssl/certs/", dir: true, mode: 0o755},
		{name: "tmp/", dir: true, mode: 0o1777},
		{name: "usr/", dir: true, mode: 0o755},
		{name: "usr/local/", dir: true, mode: 0o755},
		{name: "usr/local/bin/", dir: true, mode: 0o755},
		{name: AgentPath[1:], mode: 0o755, data: agent},
		{name: CNIPath[1:], mode: 0o755, data: cni},
	}
	if s.CACerts != "" {
		certs, err := os.ReadFile(s.CACerts)
		if err != nil {
			return nil, fmt.Errorf("CA certificates: %w", err)
		}
		if !bytes.Contains(certs, []byte("-----BEGIN CERTIFICATE-----")) {
			return nil, fmt.Errorf("CA certificates %s hold no PEM certificate", s.CACerts)
		}
		ents = append(ents, entry{name: CertsPath[1:], mode: 0o644, data: certs})
	}
	layerTar, err := tarOf(ents, s.Created)
	if err != nil {
		return nil, err
	}
	var layerOpts []tarball.LayerOption
	if s.OCI {
		layerOpts = append(layerOpts, tarball.WithMediaType(types.OCILayer))
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	}, layerOpts...)
	if err != nil {
		return nil, err
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture, cf.Variant = "linux", s.Arch, s.Variant
	cf.Created = v1.Time{Time: s.Created.UTC()}
	cf.Config.Entrypoint = []string{AgentPath}
	cf.Config.Cmd = []string{"run"}
	cf.Config.Env = []string{"PATH=/usr/local/bin", "SSL_CERT_FILE=" + CertsPath}
	cf.Config.WorkingDir = "/"
	cf.Config.Labels = map[string]string{
		"org.opencontainers.image.title":       "ambit",
		"org.opencontainers.image.description": "Ambit node agent, CNI plugin and CA: sidecarless mTLS for Kubernetes",
		"org.opencontainers.image.version":     s.Version,
	}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil || !s.OCI {
		return img, err
	}
	return mutate.ConfigMediaType(mutate.MediaType(img, types.OCIManifestSchema1), types.OCIConfigJSON), nil
}

// elfArch is what a Go binary for a GOARCH says in its ELF header.
type elfArch struct {
	machine elf.Machine
	class   elf.Class
	data    elf.Data
}

var elfArches = map[string]elfArch{
	"amd64":   {elf.EM_X86_64, elf.ELFCLASS64, elf.ELFDATA2LSB},
	"arm64":   {elf.EM_AARCH64, elf.ELFCLASS64, elf.ELFDATA2LSB},
	"386":     {elf.EM_386, elf.ELFCLASS32, elf.ELFDATA2LSB},
	"arm":     {elf.EM_ARM, elf.ELFCLASS32, elf.ELFDATA2LSB},
	"ppc64le": {elf.EM_PPC64, elf.ELFCLASS64, elf.ELFDATA2LSB},
	"riscv64": {elf.EM_RISCV, elf.ELFCLASS64, elf.ELFDATA2LSB},
	"s390x":   {elf.EM_S390, elf.ELFCLASS64, elf.ELFDATA2MSB},
}

// readStatic reads a binary and refuses what cannot run in an image with
// no libc (anything that is not a static ELF executable) and what cannot
// run on the image's architecture: a runtime picks the image by the
// platform it claims, so an amd64 binary under an arm64 label would only
// fail on the node, with "exec format error", leaving its pods unmeshed.
func readStatic(p, arch string) ([]byte, error) {
	want, ok := elfArches[arch]
	if !ok {
		return nil, fmt.Errorf("architecture %q: not one of %s", arch, knownArches())
	}
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, fmt.Errorf("binary: %w (run `make build` first)", err)
	}
	if len(b) < 4 || string(b[:4]) != "\x7fELF" {
		return nil, fmt.Errorf("%s is not an ELF executable", p)
	}
	f, err := elf.NewFile(bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("%s: unreadable ELF header: %w", p, err)
	}
	if f.Machine != want.machine || f.Class != want.class || f.Data != want.data {
		return nil, fmt.Errorf("%s is built for %s (%s, %s), not %s: build it with GOARCH=%s", p, f.Machine, f.Class, f.Data, arch, arch)
	}
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			return nil, fmt.Errorf("%s is dynamically linked (it names an ELF interpreter); build with CGO_ENABLED=0 (the image has no libc)", p)
		}
	}
	if bytes.Contains(b, []byte("/lib64/ld-linux")) || bytes.Contains(b, []byte("/lib/ld-linux")) || bytes.Contains(b, []byte("/lib/ld-musl")) {
		return nil, fmt.Errorf("%s is dynamically linked; build with CGO_ENABLED=0 (the image has no libc)", p)
	}
	return b, nil
}

func knownArches() string {
	var names []string
	for a := range elfArches {
		names = append(names, a)
	}
	sort.Strings(names)
	return strings.Join(names, ", ")
}

func tarOf(ents []entry, mtime time.Time) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range ents {
		h := &tar.Header{Name: e.name, Mode: e.mode, ModTime: mtime, Uname: "root", Gname: "root", Format: tar.FormatPAX}
		if e.dir {
			h.Typeflag = tar.TypeDir
		} else {
			h.Typeflag = tar.TypeReg
			h.Size = int64(len(e.data))
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if _, err := tw.Write(e.data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
