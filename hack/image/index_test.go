package main

import (
	"archive/tar"
	"bytes"
	"debug/elf"
	"io"
	"log"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/google/go-containerregistry/pkg/v1/validate"
)

// multiInputs writes stand-in binaries for amd64 and arm64 where the
// Makefile puts the real ones (DIR/linux_amd64/ambit-agent, ...), each
// with its platform's ELF header, and a CA bundle.
func multiInputs(t *testing.T) (dir, certs string) {
	t.Helper()
	dir = t.TempDir()
	for _, arch := range []string{"amd64", "arm64"} {
		fakeELF(t, dir, "linux_"+arch+"/ambit-agent", arch, false, "agent for "+arch)
		fakeELF(t, dir, "linux_"+arch+"/ambit-cni", arch, false, "plugin for "+arch)
	}
	return dir, writeCerts(t, dir)
}

func multiSpec(dir, certs string) MultiSpec {
	return MultiSpec{
		Platforms: []Platform{{OS: "linux", Arch: "amd64"}, {OS: "linux", Arch: "arm64"}},
		Agent:     filepath.Join(dir, "{platform}", "ambit-agent"),
		CNI:       filepath.Join(dir, "{platform}", "ambit-cni"),
		CACerts:   certs,
		Version:   "test",
	}
}

// untar unpacks an OCI layout archive as a runtime would.
func untar(t *testing.T, archive string) string {
	t.Helper()
	f, err := os.Open(archive)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dir := t.TempDir()
	eachTarEntry(t, f, func(h *tar.Header, r io.Reader) {
		if strings.Contains(h.Name, "..") || filepath.IsAbs(h.Name) {
			t.Fatalf("unsafe path %q in the archive", h.Name)
		}
		p := filepath.Join(dir, h.Name)
		if h.Typeflag == tar.TypeDir {
			os.MkdirAll(p, 0o755)
			return
		}
		b, _ := io.ReadAll(r)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
	})
	return dir
}

// imageFiles reads the files of an image's (single) layer.
func imageFiles(t *testing.T, img v1.Image) map[string][]byte {
	t.Helper()
	files := map[string][]byte{}
	eachTarEntry(t, mutate.Extract(img), func(h *tar.Header, r io.Reader) {
		files["/"+strings.TrimSuffix(h.Name, "/")], _ = io.ReadAll(r)
	})
	return files
}

// checkBinaries asserts that both binaries in img are the ones built for
// arch: the ELF machine a node's kernel checks, and the bytes.
func checkBinaries(t *testing.T, img v1.Image, dir, arch string) {
	t.Helper()
	files := imageFiles(t, img)
	for path, src := range map[string]string{AgentPath: "ambit-agent", CNIPath: "ambit-cni"} {
		b, ok := files[path]
		if !ok {
			t.Fatalf("%s: %s missing", arch, path)
		}
		f, err := elf.NewFile(bytes.NewReader(b))
		if err != nil {
			t.Fatalf("%s: %s: %v", arch, path, err)
		}
		if f.Machine != elfArches[arch].machine {
			t.Errorf("%s image holds a %s %s", arch, f.Machine, path)
		}
		if want, _ := os.ReadFile(filepath.Join(dir, "linux_"+arch, src)); !bytes.Equal(b, want) {
			t.Errorf("%s: %s is not linux_%s/%s", arch, path, arch, src)
		}
	}
}

// The multi-platform archive is an OCI layout whose index.json names
// one image index under the tag; the index has one manifest per
// platform, each holding that platform's binaries, with the same layout,
// entrypoint, labels and layer contents as the single-platform image of
// `make image`; OCI media types throughout; SOURCE_DATE_EPOCH sets every
// time; building twice gives the same bytes.
func TestMultiPlatformArchive(t *testing.T) {
	dir, certs := multiInputs(t)
	m := multiSpec(dir, certs)
	t.Setenv("SOURCE_DATE_EPOCH", "1700000000")
	epoch := time.Unix(1700000000, 0)
	out := filepath.Join(t.TempDir(), "multi.tar")
	if err := runIndex(m, "docker.io/ambit-mesh/ambit:dev", out, ""); err != nil {
		t.Fatal(err)
	}
	f, _ := os.Open(out)
	eachTarEntry(t, f, func(h *tar.Header, _ io.Reader) {
		if !h.ModTime.Equal(epoch) || h.Uid != 0 || h.Gid != 0 {
			t.Errorf("archive entry %s: time %v uid %d gid %d", h.Name, h.ModTime, h.Uid, h.Gid)
		}
	})
	f.Close()

	lp, err := layout.FromPath(untar(t, out))
	if err != nil {
		t.Fatalf("not an OCI layout: %v", err)
	}
	top, err := lp.ImageIndex()
	if err != nil {
		t.Fatal(err)
	}
	tm, err := top.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(tm.Manifests) != 1 || tm.Manifests[0].MediaType != types.OCIImageIndex {
		t.Fatalf("index.json should name one image index: %+v", tm.Manifests)
	}
	for _, k := range []string{"io.containerd.image.name", "org.opencontainers.image.ref.name"} {
		if got := tm.Manifests[0].Annotations[k]; got != "docker.io/ambit-mesh/ambit:dev" {
			t.Errorf("index.json annotation %s = %q, want the name the kubelet asks for", k, got)
		}
	}
	idx, err := top.ImageIndex(tm.Manifests[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	if err := validate.Index(idx); err != nil {
		t.Fatalf("invalid index: %v", err)
	}
	im, _ := idx.IndexManifest()
	if len(im.Manifests) != 2 {
		t.Fatalf("want 2 manifests, have %d", len(im.Manifests))
	}
	for i, arch := range []string{"amd64", "arm64"} {
		desc := im.Manifests[i]
		if desc.Platform == nil || desc.Platform.OS != "linux" || desc.Platform.Architecture != arch {
			t.Fatalf("manifest %d: platform %v, want linux/%s", i, desc.Platform, arch)
		}
		if desc.MediaType != types.OCIManifestSchema1 {
			t.Errorf("%s: manifest media type %s", arch, desc.MediaType)
		}
		img, err := idx.Image(desc.Digest)
		if err != nil {
			t.Fatal(err)
		}
		mf, _ := img.Manifest()
		if mf.Config.MediaType != types.OCIConfigJSON || len(mf.Layers) != 1 || mf.Layers[0].MediaType != types.OCILayer {
			t.Errorf("%s: config %s layers %+v: want OCI media types", arch, mf.Config.MediaType, mf.Layers)
		}
		cf, _ := img.ConfigFile()
		if cf.OS != "linux" || cf.Architecture != arch || !cf.Created.Time.Equal(epoch) {
			t.Errorf("%s: config os %s arch %s created %v", arch, cf.OS, cf.Architecture, cf.Created)
		}
		checkBinaries(t, img, dir, arch)

		// The same platform as `make image` builds it on a machine of
		// that architecture.
		single, err := Build(Spec{Agent: filepath.Join(dir, "linux_"+arch, "ambit-agent"), CNI: filepath.Join(dir, "linux_"+arch, "ambit-cni"),
			CACerts: certs, Arch: arch, Version: "test", Created: epoch})
		if err != nil {
			t.Fatal(err)
		}
		scf, _ := single.ConfigFile()
		if !reflect.DeepEqual(cf.Config, scf.Config) {
			t.Errorf("%s: config differs from the single-platform image's:\n%+v\n%+v", arch, cf.Config, scf.Config)
		}
		if !reflect.DeepEqual(cf.RootFS.DiffIDs, scf.RootFS.DiffIDs) {
			t.Errorf("%s: layer contents differ from the single-platform image's", arch)
		}
	}

	out2 := filepath.Join(t.TempDir(), "multi.tar")
	if err := runIndex(m, "docker.io/ambit-mesh/ambit:dev", out2, ""); err != nil {
		t.Fatal(err)
	}
	b1, _ := os.ReadFile(out)
	b2, _ := os.ReadFile(out2)
	if !bytes.Equal(b1, b2) {
		t.Error("not reproducible: two builds from the same inputs differ")
	}
}

func TestMultiPlatformRefusesBadInput(t *testing.T) {
	for _, s := range []string{"", " , ", "linux", "linux/", "/amd64", "windows/amd64", "linux/sparc", "linux/amd64 linux/amd64",
		"linux/arm64/v8/x", "linux/arm/seven"} {
		if ps, err := ParsePlatforms(s); err == nil {
			t.Errorf("ParsePlatforms(%q) = %v, want an error", s, ps)
		}
	}
	ps, err := ParsePlatforms("linux/amd64,linux/arm64 linux/arm/v7")
	if err != nil || len(ps) != 3 || ps[2] != (Platform{"linux", "arm", "v7"}) || ps[2].Dir() != "linux_arm_v7" {
		t.Errorf("ParsePlatforms: %v %v", ps, err)
	}

	dir, certs := multiInputs(t)
	m := multiSpec(dir, certs)
	swapped := m
	swapped.Agent = filepath.Join(dir, "linux_amd64", "ambit-agent")
	if _, err := BuildIndex(swapped); err == nil || !strings.Contains(err.Error(), "{platform}") {
		t.Errorf("one agent path for two platforms: %v", err)
	}
	// An amd64 agent where the arm64 one belongs: refused, naming the
	// platform, instead of an arm64 manifest that fails on the node.
	amd, _ := os.ReadFile(filepath.Join(dir, "linux_amd64", "ambit-agent"))
	if err := os.WriteFile(filepath.Join(dir, "linux_arm64", "ambit-agent"), amd, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := BuildIndex(m); err == nil || !strings.Contains(err.Error(), "linux/arm64") || !strings.Contains(err.Error(), "EM_X86_64") {
		t.Errorf("amd64 binary in the arm64 image: %v", err)
	}
	os.Remove(filepath.Join(dir, "linux_arm64", "ambit-agent"))
	if _, err := BuildIndex(m); err == nil || !strings.Contains(err.Error(), "make build") {
		t.Errorf("missing binary: %v", err)
	}
	if _, err := BuildIndex(MultiSpec{Agent: m.Agent, CNI: m.CNI}); err == nil {
		t.Error("no platform accepted")
	}
	if err := runIndex(multiSpec(multiInputs(t)), "Not A Valid::Tag", filepath.Join(dir, "x.tar"), ""); err == nil {
		t.Error("bad tag accepted")
	}
	if err := runIndex(multiSpec(multiInputs(t)), "ambit-mesh/ambit:dev", "", ""); err == nil {
		t.Error("neither output nor push: accepted")
	}
}

// A registry gets the index as `-push` writes it: a client asking for
// each platform receives that platform's manifest (the digest the index
// names) with that platform's binaries, and the index's digest is the
// one the archive carries.
func TestPushIndexToRegistry(t *testing.T) {
	t.Setenv("DOCKER_CONFIG", t.TempDir()) // no credentials of this machine's
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	defer srv.Close()
	dir, certs := multiInputs(t)
	m := multiSpec(dir, certs)
	ref := strings.TrimPrefix(srv.URL, "http://") + "/ambit-mesh/ambit:v0.1.0"
	out := filepath.Join(t.TempDir(), "multi.tar")
	if err := runIndex(m, "docker.io/ambit-mesh/ambit:dev", out, ref); err != nil {
		t.Fatal(err)
	}
	lp, err := layout.FromPath(untar(t, out))
	if err != nil {
		t.Fatal(err)
	}
	top, _ := lp.ImageIndex()
	tm, _ := top.IndexManifest()
	tag, _ := name.NewTag(ref)
	pulled, err := remote.Index(tag)
	if err != nil {
		t.Fatalf("pulling the index: %v", err)
	}
	if d, _ := pulled.Digest(); d != tm.Manifests[0].Digest {
		t.Errorf("registry's index %s, archive's %s", d, tm.Manifests[0].Digest)
	}
	im, _ := pulled.IndexManifest()
	for _, desc := range im.Manifests {
		arch := desc.Platform.Architecture
		img, err := remote.Image(tag, remote.WithPlatform(v1.Platform{OS: "linux", Architecture: arch}))
		if err != nil {
			t.Fatalf("pulling %s: %v", arch, err)
		}
		if d, _ := img.Digest(); d != desc.Digest {
			t.Errorf("%s: pulled %s, index names %s", arch, d, desc.Digest)
		}
		if err := validate.Image(img); err != nil {
			t.Errorf("%s: %v", arch, err)
		}
		checkBinaries(t, img, dir, arch)
	}
	if _, err := remote.Image(tag, remote.WithPlatform(v1.Platform{OS: "linux", Architecture: "s390x"})); err == nil {
		t.Error("a platform the index lacks resolved to an image")
	}
}
