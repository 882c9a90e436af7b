package ca_test

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambit-mesh/ambit/node-agent/ca"
	"github.com/ambit-mesh/ambit/node-agent/ca/catest"
	"github.com/ambit-mesh/ambit/node-agent/identity"
)

// An intermediate renewed in the Secret (same subject and key, a later
// NotAfter; the signing certificate and the roots unchanged, as when
// cert-manager renews the issuer above the CA) must be taken at the next
// reload: leaves are cut at the chain's end, and a CA keeping the old
// intermediate cuts them at its expiry, then refuses to sign at all.
func TestReloadTakesRenewedIntermediate(t *testing.T) {
	root, err := ca.GenerateRoot(td, 365*24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	soon := time.Now().Add(2 * time.Hour)
	inter := caUntil(t, root, "intermediate", soon)
	signing := caUntil(t, inter, "signing", time.Now().Add(30*24*time.Hour))
	renewed := *inter.Cert
	renewed.NotAfter = time.Now().Add(90 * 24 * time.Hour)
	der, err := x509.CreateCertificate(rand.Reader, &renewed, root.Cert, inter.Key.Public(), root.Key)
	if err != nil {
		t.Fatal(err)
	}
	renewedCert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	secret := func(i *x509.Certificate) map[string][]byte {
		m := &ca.Material{Cert: signing.Cert, Key: signing.Key, Intermediates: []*x509.Certificate{i}, Roots: root.Roots}
		certPEM, keyPEM, rootsPEM, err := m.PEM()
		if err != nil {
			t.Fatal(err)
		}
		return map[string][]byte{ca.SecretCertKey: certPEM, ca.SecretKeyKey: keyPEM, ca.SecretRootsKey: rootsPEM}
	}

	cl := catest.NewCluster()
	cl.AddAgent(t, "node-1")
	cl.AddPod(t, "shop", "web-1", "web", "node-1")
	sec := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: "ambit-system", Name: "ambit-ca"}, Data: secret(inter.Cert)}
	if _, err := cl.Client.CoreV1().Secrets("ambit-system").Create(context.Background(), sec, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ctx, a := runCA(t, ca.Config{Client: cl.Client, ReloadInterval: 20 * time.Millisecond})
	tok := cl.Token(t, "node-1", catest.TokenOptions{})
	leafEnd := func() time.Time {
		t.Helper()
		m, err := identity.NewManager(identity.Config{Remote: &identity.RemoteConfig{
			URL: "https://" + a.String(), ServerName: "ambit-ca.ambit-system.svc", Roots: root.Roots,
			Token: func() (string, error) { return tok, nil }}})
		if err != nil {
			t.Fatal(err)
		}
		c, err := m.Certificate(ctx, "spiffe://cluster.local/ns/shop/sa/web")
		if err != nil {
			t.Fatal(err)
		}
		return c.Leaf.NotAfter
	}
	if end := leafEnd(); end.After(soon) {
		t.Fatalf("leaf valid until %s, past the intermediate's end %s", end.UTC(), soon.UTC())
	}

	sec.Data = secret(renewedCert)
	if _, err := cl.Client.CoreV1().Secrets("ambit-system").Update(ctx, sec, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		end := leafEnd()
		if end.After(soon) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after the intermediate's renewal, leaves still end with the old one (%s)", end.UTC())
		}
		time.Sleep(50 * time.Millisecond)
	}
}
