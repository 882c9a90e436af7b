package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

func main() {
	var s Spec
	var tag, out, platforms, push string
	flag.StringVar(&s.Agent, "agent", "bin/ambit-agent", "static ambit-agent binary (with -platforms: a path with {platform}, e.g. bin/{platform}/ambit-agent)")
	flag.StringVar(&s.CNI, "cni", "bin/ambit-cni", "static ambit-cni binary (with -platforms: a path with {platform})")
	flag.StringVar(&s.CACerts, "ca-certs", "/etc/ssl/certs/ca-certificates.crt", "PEM bundle of CA certificates to include (\"\" for none)")
	flag.StringVar(&s.Arch, "arch", runtime.GOARCH, "image architecture (must match the binaries)")
	flag.StringVar(&s.Version, "version", "dev", "image version label")
	flag.StringVar(&tag, "tag", "docker.io/ambit-mesh/ambit:dev", "image reference recorded in the tarball (fully qualified, so podman and CRI-O load it under the name the kubelet asks for)")
	flag.StringVar(&out, "o", "bin/ambit-image.tar", "output tarball (with -platforms: an OCI layout archive, default bin/ambit-image-multiarch.tar; \"\" for none)")
	flag.StringVar(&platforms, "platforms", "", "build a multi-platform image (OCI image index) for these platforms, e.g. \"linux/amd64 linux/arm64\"; {platform} in -agent and -cni becomes linux_amd64, linux_arm64")
	flag.StringVar(&push, "push", "", "with -platforms: also push the index to this registry reference (credentials from the Docker config, as crane and docker use)")
	flag.Parse()
	set := map[string]bool{}
	flag.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var err error
	switch {
	case platforms == "" && push != "":
		err = fmt.Errorf("-push needs -platforms (push the single-platform tarball with crane push)")
	case platforms == "":
		err = run(s, tag, out)
	case set["arch"]:
		err = fmt.Errorf("-arch and -platforms exclude each other")
	default:
		if !set["o"] {
			out = "bin/ambit-image-multiarch.tar"
		}
		var ps []Platform
		if ps, err = ParsePlatforms(platforms); err == nil {
			err = runIndex(MultiSpec{Platforms: ps, Agent: s.Agent, CNI: s.CNI, CACerts: s.CACerts, Version: s.Version}, tag, out, push)
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
}

// created is the images' creation time and the files' times:
// SOURCE_DATE_EPOCH, default 0, so the same inputs give the same digest.
func created() (time.Time, error) {
	v := os.Getenv("SOURCE_DATE_EPOCH")
	if v == "" {
		return time.Unix(0, 0), nil
	}
	sec, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		return time.Time{}, fmt.Errorf("SOURCE_DATE_EPOCH %q: %w", v, err)
	}
	return time.Unix(sec, 0), nil
}

func run(s Spec, tag, out string) error {
	var err error
	if s.Created, err = created(); err != nil {
		return err
	}
	ref, err := name.NewTag(tag)
	if err != nil {
		return fmt.Errorf("tag %q: %w", tag, err)
	}
	img, err := Build(s)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return err
	}
	tmp := out + ".tmp"
	if err := tarball.WriteToFile(tmp, ref, img); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, out); err != nil {
		return err
	}
	d, _ := img.Digest()
	fmt.Printf("%s: %s (%s)\n", out, ref.Name(), d)
	return nil
}

// runIndex builds the multi-platform image and writes it to out (an OCI
// layout archive) and/or pushes it to the registry reference push.
func runIndex(m MultiSpec, tag, out, push string) error {
	var err error
	if m.Created, err = created(); err != nil {
		return err
	}
	ref, err := name.NewTag(tag)
	if err != nil {
		return fmt.Errorf("tag %q: %w", tag, err)
	}
	var pushRef name.Tag
	if push != "" {
		if pushRef, err = name.NewTag(push); err != nil {
			return fmt.Errorf("push reference %q: %w", push, err)
		}
	}
	if out == "" && push == "" {
		return fmt.Errorf("nothing to do: neither -o nor -push given")
	}
	idx, err := BuildIndex(m)
	if err != nil {
		return err
	}
	d, err := idx.Digest()
	if err != nil {
		return err
	}
	if out != "" {
		if err := writeOCIArchive(out, ref, idx, m.Created); err != nil {
			return err
		}
		fmt.Printf("%s: %s (index %s)\n", out, refName(ref), d)
	}
	if push != "" {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		if err := remote.WriteIndex(pushRef, idx, remote.WithContext(ctx), remote.WithAuthFromKeychain(authn.DefaultKeychain)); err != nil {
			return fmt.Errorf("push %s: %w", pushRef, err)
		}
		fmt.Printf("pushed %s (index %s)\n", pushRef, d)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		return err
	}
	for _, desc := range im.Manifests {
		fmt.Printf("  %s: %s\n", desc.Platform, desc.Digest)
	}
	return nil
}
