package identity_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/node-agent/ca"
	"github.com/ambit-mesh/ambit/node-agent/ca/catest"
	"github.com/ambit-mesh/ambit/node-agent/identity"
)

// The agent talks only to a CA whose serving certificate chains to its
// bundle and names the expected host; and it re-reads the kubelet-rotated
// token file for every request.
func TestRemoteTrustAndTokenFile(t *testing.T) {
	e := newCA(t, "node-1")
	e.cluster.AddPod(t, "shop", "web-1", "web", "node-1")
	other, err := ca.GenerateRoot(td, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "token")
	rootsFile := filepath.Join(dir, "root-cert.pem")
	if err := os.WriteFile(rootsFile, ca.EncodeCerts(e.auth.Material().Roots), 0o644); err != nil {
		t.Fatal(err)
	}
	mk := func(rc identity.RemoteConfig) *identity.Manager {
		m, err := identity.NewManager(identity.Config{TrustDomain: td, Remote: &rc})
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	ctx := context.Background()

	impostor := mk(identity.RemoteConfig{URL: e.https.URL, ServerName: e.https.ServerName, TokenFile: tokenFile, Roots: other.Roots})
	if err := os.WriteFile(tokenFile, []byte(e.cluster.Token(t, "node-1", catest.TokenOptions{})+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := impostor.Certificate(ctx, webID); err == nil || !strings.Contains(err.Error(), "not trusted") {
		t.Fatalf("CA under a foreign root accepted: %v", err)
	}
	wrongName := mk(identity.RemoteConfig{URL: e.https.URL, ServerName: "someone-else.test", TokenFile: tokenFile, RootsFile: rootsFile})
	if _, err := wrongName.Certificate(ctx, webID); err == nil {
		t.Fatal("CA certificate for another name accepted")
	}

	m := mk(identity.RemoteConfig{URL: e.https.URL, ServerName: e.https.ServerName, TokenFile: tokenFile, RootsFile: rootsFile})
	if err := os.WriteFile(tokenFile, []byte(e.cluster.Token(t, "node-1", catest.TokenOptions{Lifetime: -time.Second})), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Certificate(ctx, webID); err == nil {
		t.Fatal("expired token accepted")
	}
	// The kubelet rotates the token: the next request uses the new one.
	if err := os.WriteFile(tokenFile, []byte(e.cluster.Token(t, "node-1", catest.TokenOptions{})), 0o600); err != nil {
		t.Fatal(err)
	}
	time.Sleep(250 * time.Millisecond) // past the retry gap after a failure
	if _, err := m.Certificate(ctx, webID); err != nil {
		t.Fatalf("after token rotation: %v", err)
	}
}
