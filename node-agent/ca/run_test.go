package ca_test

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambit-mesh/ambit/node-agent/ca"
	"github.com/ambit-mesh/ambit/node-agent/ca/catest"
	"github.com/ambit-mesh/ambit/node-agent/identity"
)

// The CA service as `ambit-agent ca` runs it: creates its Secret, publishes
// the bundle into the ConfigMap, and an agent bootstrapped from that
// ConfigMap gets its pods' certificates and nothing else.
func TestRunServesAgents(t *testing.T) {
	cl := catest.NewCluster()
	cl.AddAgent(t, "node-1")
	cl.AddPod(t, "shop", "web-1", "web", "node-1")
	cl.AddPod(t, "shop", "db-1", "db", "node-2")
	ctx, a := runCA(t, ca.Config{Client: cl.Client})
	cm, err := cl.Client.CoreV1().ConfigMaps("ambit-system").Get(ctx, "ambit-ca-root", metav1.GetOptions{})
	if err != nil {
		t.Fatalf("trust bundle not published: %v", err)
	}
	roots, err := ca.ParseCerts([]byte(cm.Data[ca.RootsConfigMapKey]))
	if err != nil || len(roots) != 1 {
		t.Fatalf("published bundle: %v", err)
	}
	tok := cl.Token(t, "node-1", catest.TokenOptions{})
	m, err := identity.NewManager(identity.Config{Remote: &identity.RemoteConfig{
		URL: "https://" + a.String(), ServerName: "ambit-ca.ambit-system.svc", Roots: roots,
		Token: func() (string, error) { return tok, nil }}})
	if err != nil {
		t.Fatal(err)
	}
	c, err := m.Certificate(ctx, "spiffe://cluster.local/ns/shop/sa/web")
	if err != nil {
		t.Fatal(err)
	}
	if c.Leaf.CheckSignatureFrom(roots[0]) != nil {
		t.Fatal("not signed by the published root")
	}
	if _, err := m.Certificate(ctx, "spiffe://cluster.local/ns/shop/sa/db"); err == nil {
		t.Fatal("node-1 obtained db, which runs on node-2")
	}
}

// runCA runs the CA service (ca.Run) with cfg, on a loopback port and
// without a metrics listener, until the test ends (its context
// cancelled, then Run's error checked), and returns that context and
// the CA's address once it serves.
func runCA(t *testing.T, cfg ca.Config) (context.Context, net.Addr) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cfg.Listen, cfg.MetricsListen, cfg.Registerer = "127.0.0.1:0", "-", prometheus.NewRegistry()
	addr := make(chan net.Addr, 1)
	cfg.Started = func(a net.Addr) { addr <- a }
	done := make(chan error, 1)
	go func() { done <- ca.Run(ctx, cfg) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	select {
	case a := <-addr:
		return ctx, a
	case err := <-done:
		t.Fatalf("Run ended: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("CA did not start")
	}
	return ctx, nil
}
