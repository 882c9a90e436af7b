package main

import (
	"archive/tar"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
)

// Platform is one os/arch[/variant] of a multi-platform image.
type Platform struct{ OS, Arch, Variant string }

func (p Platform) String() string {
	if p.Variant != "" {
		return p.OS + "/" + p.Arch + "/" + p.Variant
	}
	return p.OS + "/" + p.Arch
}

// Dir is the {platform} of a binary path template: linux_arm64,
// linux_arm_v7 (the Makefile builds each platform's binaries there).
func (p Platform) Dir() string { return strings.ReplaceAll(p.String(), "/", "_") }

var variantRE = regexp.MustCompile(`^v[0-9]+$`)

// ParsePlatforms reads a list such as "linux/amd64 linux/arm64" (spaces or
// commas between entries, as docker buildx and the Makefile write them).
func ParsePlatforms(s string) ([]Platform, error) {
	var out []Platform
	seen := map[string]bool{}
	for _, f := range strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' || r == '\t' || r == '\n' }) {
		parts := strings.Split(f, "/")
		if len(parts) < 2 || len(parts) > 3 {
			return nil, fmt.Errorf("platform %q: want os/arch or os/arch/variant", f)
		}
		p := Platform{OS: parts[0], Arch: parts[1]}
		if len(parts) == 3 {
			p.Variant = parts[2]
			if !variantRE.MatchString(p.Variant) {
				return nil, fmt.Errorf("platform %q: variant %q is not of the form v7", f, p.Variant)
			}
		}
		// The image is Linux only: static Linux binaries, /etc/passwd.
		if p.OS != "linux" {
			return nil, fmt.Errorf("platform %q: only linux is supported", f)
		}
		if _, ok := elfArches[p.Arch]; !ok {
			return nil, fmt.Errorf("platform %q: architecture not one of %s", f, knownArches())
		}
		// Two entries for one platform: a runtime would take the first and
		// silently ignore the other.
		key := p.OS + "/" + p.Arch
		if seen[key] {
			return nil, fmt.Errorf("platform %s given twice", key)
		}
		seen[key] = true
		out = append(out, p)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no platform given")
	}
	return out, nil
}

// MultiSpec is what goes into a multi-platform image: one image per
// platform, each as Build makes it, under one OCI image index.
type MultiSpec struct {
	Platforms []Platform
	// Paths of the static binaries; "{platform}" stands for Platform.Dir.
	Agent, CNI string
	CACerts    string
	Created    time.Time
	Version    string
}

// BuildIndex returns the image index described by m.
func BuildIndex(m MultiSpec) (v1.ImageIndex, error) {
	if len(m.Platforms) == 0 {
		return nil, fmt.Errorf("no platform given")
	}
	if len(m.Platforms) > 1 && (!strings.Contains(m.Agent, "{platform}") || !strings.Contains(m.CNI, "{platform}")) {
		return nil, fmt.Errorf("binary paths %q and %q must contain {platform}: one path for every platform would put the same binary under each", m.Agent, m.CNI)
	}
	var adds []mutate.IndexAddendum
	for _, p := range m.Platforms {
		img, err := Build(Spec{
			Agent:   strings.ReplaceAll(m.Agent, "{platform}", p.Dir()),
			CNI:     strings.ReplaceAll(m.CNI, "{platform}", p.Dir()),
			CACerts: m.CACerts,
			Arch:    p.Arch,
			Variant: p.Variant,
			Created: m.Created,
			Version: m.Version,
			OCI:     true,
		})
		if err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
		adds = append(adds, mutate.IndexAddendum{
			Add:        img,
			Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: p.OS, Architecture: p.Arch, Variant: p.Variant}},
		})
	}
	return mutate.AppendManifests(empty.Index, adds...), nil
}

// refName is the reference as containerd stores it (docker.io, not
// go-containerregistry's index.docker.io; library/ for official images),
// the name the kubelet asks the runtime for.
func refName(t name.Tag) string {
	reg := t.RegistryStr()
	if reg == name.DefaultRegistry {
		reg = "docker.io"
	}
	return reg + "/" + t.RepositoryStr() + ":" + t.TagStr()
}

// writeOCIArchive writes idx as an OCI image layout in a tar archive:
// index.json names one descriptor, the image index, under the tag (both
// annotations: containerd's ctr import reads io.containerd.image.name,
// podman load reads org.opencontainers.image.ref.name).
//
// The archive is reproducible: entries sorted, every time set to mtime,
// owners and modes fixed.
func writeOCIArchive(out string, tag name.Tag, idx v1.ImageIndex, mtime time.Time) error {
	dir, err := os.MkdirTemp("", "ambit-oci-layout-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return err
	}
	ref := refName(tag)
	if err := p.AppendIndex(idx, layout.WithAnnotations(map[string]string{
		"io.containerd.image.name":          ref,
		"org.opencontainers.image.ref.name": ref,
	})); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return err
	}
	tmp := out + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return err
	}
	err = tarDir(f, dir, mtime)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	return os.Rename(tmp, out)
}

func tarDir(w io.Writer, dir string, mtime time.Time) error {
	tw := tar.NewWriter(w)
	// WalkDir visits entries in lexical order, so the archive's order does
	// not depend on the file system's.
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || path == dir {
			return err
		}
		rel, err := filepath.Rel(dir, path)
		if err != nil {
			return err
		}
		h := &tar.Header{Name: filepath.ToSlash(rel), ModTime: mtime, Uname: "root", Gname: "root", Format: tar.FormatPAX}
		if d.IsDir() {
			h.Typeflag, h.Name, h.Mode = tar.TypeDir, h.Name+"/", 0o755
			return tw.WriteHeader(h)
		}
		if !d.Type().IsRegular() {
			return fmt.Errorf("%s: not a regular file in the layout", rel)
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		h.Typeflag, h.Mode, h.Size = tar.TypeReg, 0o644, fi.Size()
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		src, err := os.Open(path)
		if err != nil {
			return err
		}
		defer src.Close()
		_, err = io.Copy(tw, src)
		return err
	})
	if err != nil {
		return err
	}
	return tw.Close()
}
