package ca

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// Local CA files inside a state directory.
const (
	LocalCertFile  = "ca.crt"
	LocalKeyFile   = "ca.key"
	LocalRootsFile = "root-cert.pem" // optional bundle (root rotation, intermediate)
)

// RootValidity is the lifetime of a generated root.
const RootValidity = 10 * 365 * 24 * time.Hour

// LoadOrCreateLocal opens the file-backed CA in dir (static mode, no
// Kubernetes): ca.crt + ca.key (+ optional root-cert.pem). When neither
// exists it generates a root and writes the files (key 0600, directory
// 0700). A lock file serializes two processes starting at once, and the
// files are written to temporaries and renamed, so a crash never leaves a
// half-written CA. A key without a certificate (or the reverse) is an
// error rather than silently replaced: replacing it would change the
// mesh's root under every running workload.
func LoadOrCreateLocal(dir, trustDomain string) (*Authority, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("local ca: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("local ca: %w", err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return nil, fmt.Errorf("local ca: lock: %w", err)
	}
	defer unix.Flock(int(lock.Fd()), unix.LOCK_UN) //nolint:errcheck

	certPath, keyPath := filepath.Join(dir, LocalCertFile), filepath.Join(dir, LocalKeyFile)
	certPEM, cerr := os.ReadFile(certPath)
	keyPEM, kerr := os.ReadFile(keyPath)
	switch {
	case cerr == nil && kerr == nil:
		rootsPEM, err := os.ReadFile(filepath.Join(dir, LocalRootsFile))
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("local ca: %w", err)
		}
		m, err := ParseMaterial(certPEM, keyPEM, rootsPEM)
		if err != nil {
			return nil, fmt.Errorf("local ca in %s: %w", dir, err)
		}
		return NewAuthority(trustDomain, m)
	case errors.Is(cerr, fs.ErrNotExist) && errors.Is(kerr, fs.ErrNotExist):
	case cerr != nil && !errors.Is(cerr, fs.ErrNotExist):
		return nil, fmt.Errorf("local ca: %w", cerr)
	case kerr != nil && !errors.Is(kerr, fs.ErrNotExist):
		return nil, fmt.Errorf("local ca: %w", kerr)
	default:
		return nil, fmt.Errorf("local ca in %s: only one of %s and %s exists; restore the other or remove both to start a new root", dir, LocalCertFile, LocalKeyFile)
	}
	m, err := GenerateRoot(trustDomain, RootValidity)
	if err != nil {
		return nil, err
	}
	c, k, _, err := m.PEM()
	if err != nil {
		return nil, err
	}
	// Key first: a crash between the two renames leaves only a key, which
	// the next start reports instead of issuing from a fresh root.
	if err := writeFileAtomic(keyPath, k, 0o600); err != nil {
		return nil, fmt.Errorf("local ca: %w", err)
	}
	if err := writeFileAtomic(certPath, c, 0o644); err != nil {
		return nil, fmt.Errorf("local ca: %w", err)
	}
	return NewAuthority(trustDomain, m)
}

func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
