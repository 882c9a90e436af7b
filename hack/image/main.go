package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

func main() {
	var s Spec
	var tag, out string
	flag.StringVar(&s.Agent, "agent", "bin/ambit-agent", "static ambit-agent binary")
	flag.StringVar(&s.CNI, "cni", "bin/ambit-cni", "static ambit-cni binary")
	flag.StringVar(&s.CACerts, "ca-certs", "/etc/ssl/certs/ca-certificates.crt", "PEM bundle of CA certificates to include (\"\" for none)")
	flag.StringVar(&s.Arch, "arch", runtime.GOARCH, "image architecture (must match the binaries)")
	flag.StringVar(&s.Version, "version", "dev", "image version label")
	flag.StringVar(&tag, "tag", "docker.io/ambit-mesh/ambit:dev", "image reference recorded in the tarball (fully qualified, so podman and CRI-O load it under the name the kubelet asks for)")
	flag.StringVar(&out, "o", "bin/ambit-image.tar", "output tarball")
	flag.Parse()
	if err := run(s, tag, out); err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
}

func run(s Spec, tag, out string) error {
	s.Created = time.Unix(0, 0)
	if v := os.Getenv("SOURCE_DATE_EPOCH"); v != "" {
		sec, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return fmt.Errorf("SOURCE_DATE_EPOCH %q: %w", v, err)
		}
		s.Created = time.Unix(sec, 0)
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
