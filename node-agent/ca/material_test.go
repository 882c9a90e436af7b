package ca_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/ambit-mesh/ambit/node-agent/ca"
)

// Two CA replicas starting at once must end up signing with one key.
func TestSecretCreateRace(t *testing.T) {
	c := fake.NewClientset()
	const n = 4
	var wg sync.WaitGroup
	got := make([]*ca.Material, n)
	created := make([]bool, n)
	errs := make([]error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got[i], created[i], errs[i] = ca.LoadOrCreateSecret(context.Background(), c, "ambit-system", "ambit-ca", td)
		}()
	}
	wg.Wait()
	winners := 0
	for i := 0; i < n; i++ {
		if errs[i] != nil {
			t.Fatalf("replica %d: %v", i, errs[i])
		}
		if created[i] {
			winners++
		}
	}
	s, err := c.CoreV1().Secrets("ambit-system").Get(context.Background(), "ambit-ca", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	stored, err := ca.MaterialFromSecret(s)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i++ {
		if !got[i].Cert.Equal(stored.Cert) {
			t.Fatalf("replica %d signs with another root than the Secret's", i)
		}
	}
	if winners != 1 {
		t.Fatalf("%d replicas think they created the Secret", winners)
	}
}

func mkCA(t *testing.T, parent *ca.Material, cn string) *ca.Material {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(48 * time.Hour),
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent.Cert, key.Public(), parent.Key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return &ca.Material{Cert: c, Key: key, Roots: parent.Roots}
}

// An intermediate from an existing PKI (the user's root stays offline):
// issued chains carry the intermediate and verify to the user's root.
func TestIntermediateFromSecret(t *testing.T) {
	root, _ := ca.GenerateRoot(td, 24*time.Hour*365)
	inter := mkCA(t, root, "ambit intermediate")
	certPEM, keyPEM, rootsPEM, err := inter.PEM()
	if err != nil {
		t.Fatal(err)
	}
	for _, layout := range []string{"native", "cert-manager"} {
		t.Run(layout, func(t *testing.T) {
			data := map[string][]byte{"ca.crt": certPEM, "ca.key": keyPEM, "root-cert.pem": rootsPEM}
			if layout == "cert-manager" {
				data = map[string][]byte{"tls.crt": certPEM, "tls.key": keyPEM, "ca.crt": rootsPEM}
			}
			c := fake.NewClientset(&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: "ambit-system", Name: "ambit-ca"}, Data: data})
			m, created, err := ca.LoadOrCreateSecret(context.Background(), c, "ambit-system", "ambit-ca", td)
			if err != nil || created {
				t.Fatalf("created=%v err=%v", created, err)
			}
			a, err := ca.NewAuthority(td, m)
			if err != nil {
				t.Fatal(err)
			}
			csr, id, err := ca.ParseCSR([]byte(csrFor(t, []string{"spiffe://cluster.local/ns/a/sa/b"}, nil)), td)
			if err != nil {
				t.Fatal(err)
			}
			chain, _, err := a.Sign(csr, id, time.Hour)
			if err != nil {
				t.Fatal(err)
			}
			if len(chain) != 2 || !chain[1].Equal(inter.Cert) {
				t.Fatalf("chain has %d certs, want leaf+intermediate", len(chain))
			}
			roots := x509.NewCertPool()
			roots.AddCert(root.Cert)
			inters := x509.NewCertPool()
			inters.AddCert(chain[1])
			if _, err := chain[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inters, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestParseMaterialRefusesMistakes(t *testing.T) {
	a, _ := ca.GenerateRoot(td, time.Hour)
	b, _ := ca.GenerateRoot(td, time.Hour)
	aCert, aKey, _, _ := a.PEM()
	_, bKey, bRoots, _ := b.PEM()
	inter := mkCA(t, a, "i")
	iCert, iKey, _, _ := inter.PEM()
	cases := map[string][3][]byte{
		"key of another root":              {aCert, bKey, nil},
		"intermediate without its root":    {iCert, iKey, nil},
		"intermediate with a foreign root": {iCert, iKey, bRoots},
		"no certificate":                   {nil, aKey, nil},
		"garbage key":                      {aCert, []byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"), nil},
	}
	for name, c := range cases {
		if _, err := ca.ParseMaterial(c[0], c[1], c[2]); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := ca.ParseMaterial(aCert, aKey, nil); err != nil {
		t.Fatalf("valid root refused: %v", err)
	}
}

func TestLocalCA(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	a1, err := ca.LoadOrCreateLocal(dir, td)
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(filepath.Join(dir, ca.LocalKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("ca.key mode %v, want 0600", st.Mode().Perm())
	}
	if st, _ := os.Stat(dir); st.Mode().Perm() != 0o700 {
		t.Fatalf("state dir mode %v", st.Mode().Perm())
	}
	a2, err := ca.LoadOrCreateLocal(dir, td)
	if err != nil {
		t.Fatal(err)
	}
	if !a1.Material().Cert.Equal(a2.Material().Cert) {
		t.Fatal("second start made a new root")
	}
	// Half a CA is reported, not silently replaced.
	if err := os.Remove(filepath.Join(dir, ca.LocalCertFile)); err != nil {
		t.Fatal(err)
	}
	if _, err := ca.LoadOrCreateLocal(dir, td); err == nil {
		t.Fatal("a key without certificate was accepted")
	}
}
