package tunnel

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// TestNilRootsTrustNothing: a Certificates whose Roots is nil (no bundle
// yet, an embedder's bug) makes every peer untrusted. crypto/x509 reads
// a nil pool as "the system's roots", so a peer whose chain went to any
// CA the node trusts (a corporate root in /etc/ssl/certs, which may sign
// a spiffe:// URI SAN) passed as a mesh identity. The system roots are
// loaded once per process, so the check runs in a child process whose
// system roots are a root of the test's (SSL_CERT_FILE).
func TestNilRootsTrustNothing(t *testing.T) {
	if leafFile := os.Getenv("AMBIT_TEST_NILROOTS_LEAF"); leafFile != "" {
		nilRootsChild(t, leafFile)
		return
	}
	root := mint(t, caTmpl("system root"), nil)
	leaf := mint(t, leafTmpl(t, idServer), root)
	dir := t.TempDir()
	rootFile, leafFile := filepath.Join(dir, "root.pem"), filepath.Join(dir, "leaf.der")
	if err := os.WriteFile(rootFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: root.cert.Raw}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(leafFile, leaf.cert.Raw, 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestNilRootsTrustNothing$", "-test.count=1", "-test.v")
	cmd.Env = append(os.Environ(), "AMBIT_TEST_NILROOTS_LEAF="+leafFile,
		"SSL_CERT_FILE="+rootFile, "SSL_CERT_DIR="+filepath.Join(dir, "none"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Errorf("child: %v\n%s", err, out)
	}
}

func nilRootsChild(t *testing.T, leafFile string) {
	raw, err := os.ReadFile(leafFile)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(raw)
	if err != nil {
		t.Fatal(err)
	}
	// The case holds: the test's root is this process's system root.
	if _, err := leaf.Verify(x509.VerifyOptions{KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		t.Fatalf("the test's root is not this process's system root: %v", err)
	}
	certs := newTestCerts()
	certs.roots.Store(nil)
	p, _, _ := newTestProxy(t, Config{Directory: noDirectory{}, Certificates: certs})
	id, _, err := p.verifyPeer([][]byte{raw}, idServer, x509.ExtKeyUsageServerAuth, certs.Roots())
	var pe *PeerError
	if !errors.As(err, &pe) || pe.Reason != "untrusted" {
		t.Errorf("a peer verified against a nil bundle: identity %q, error %v; want refused, untrusted", id, err)
	}
	// recheck's check of our own chain too.
	if err := chainsTo([][]byte{raw}, nil, x509.ExtKeyUsageServerAuth); err == nil {
		t.Error("our own chain verified against a nil bundle")
	}
}
