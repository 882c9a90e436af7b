package tunnel_test

// Authorization end to end: the policy engine (node-agent/policy) as the
// tunnel's Authorizer in real network namespaces. Owned by the policy
// engineer; lives here because it needs the tunnel's internal mesh
// harness.

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/policy"
	"github.com/ambit-mesh/ambit/tunnel"
	"github.com/ambit-mesh/ambit/tunnel/hbone"
	"github.com/ambit-mesh/ambit/tunnel/internal/meshtest"
)

type policyMesh struct {
	*meshtest.Mesh
	e   *policy.Engine
	reg *prometheus.Registry
}

func newPolicyMesh(t *testing.T) *policyMesh {
	m := newMesh(t) // B's app echoes on 8080
	go peerEcho(m.B.Listen(t, "[::]:8081"))
	reg := prometheus.NewRegistry()
	e := policy.New(policy.Options{Registerer: reg})
	e.OnChange(m.B.Proxy.Reauthorize)
	e.OnChange(m.A.Proxy.Reauthorize)
	m.Auth.Set(e.Authorize)
	return &policyMesh{m, e, reg}
}

func (pm *policyMesh) apply(t *testing.T, docs string) {
	t.Helper()
	set, errs := policy.Decode(strings.NewReader(docs))
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	for _, r := range pm.e.Update("test", set) {
		if !r.Accepted {
			t.Fatalf("%s %s/%s not accepted: %s", r.Kind, r.Namespace, r.Name, r.Message)
		}
	}
}

// reached: A's app connects to B:port over HBONE and B's app answers.
func (pm *policyMesh) reached(t *testing.T, port uint16) bool {
	t.Helper()
	c, err := pm.A.Dial(netip.AddrPortFrom(pm.B.Pod.IP4, port))
	if err != nil {
		return false
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "who\n")
	c.(*net.TCPConn).CloseWrite()
	b, _ := io.ReadAll(c)
	return strings.TrimSpace(string(b)) == pm.A.Pod.IP4.String()
}

// plaintextReached: a client outside the mesh (agent-marked socket in
// A, not captured) reaches B's app on 15006.
func (pm *policyMesh) plaintextReached(t *testing.T) bool {
	t.Helper()
	c, err := pm.A.Net.Dial(context.Background(), netip.Addr{}, netip.AddrPortFrom(pm.B.Pod.IP4, 8080))
	if err != nil {
		return false
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "who\n")
	c.(*net.TCPConn).CloseWrite()
	b, _ := io.ReadAll(c)
	return strings.TrimSpace(string(b)) != ""
}

// hboneStatus opens an HBONE stream to B as A's identity and returns the
// CONNECT response status.
func (pm *policyMesh) hboneStatus(t *testing.T, port uint16) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cert, err := pm.Certs.Certificate(ctx, pm.A.Workload.Identity)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := pm.A.Net.Dial(ctx, netip.Addr{}, netip.AddrPortFrom(pm.B.Pod.IP4, 15008))
	if err != nil {
		t.Fatal(err)
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS13, NextProtos: []string{"h2"}, InsecureSkipVerify: true,
		Certificates: []tls.Certificate{*cert}}
	hc, err := hbone.Client(ctx, raw, cfg, hbone.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer hc.Close()
	s, err := hc.OpenStream(netip.AddrPortFrom(pm.B.Pod.IP4, port).String(), nil)
	if err != nil {
		t.Fatal(err)
	}
	st, _, err := s.Response(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

const (
	policyHead = "apiVersion: ambit.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {namespace: b, name: "
	modeHead   = "apiVersion: ambit.dev/v1alpha1\nkind: InboundMode\nmetadata: {namespace: b, name: "
)

// TestPolicyIdentities: B admits A's identity when a policy allows it
// and refuses it (HBONE 401, app never sees the connection) when only
// another identity is allowed; the denial is counted by policy.
func TestPolicyIdentities(t *testing.T) {
	pm := newPolicyMesh(t)
	pm.apply(t, policyHead+"allow-a}\nspec:\n  rules:\n  - from: {principals: [\"cluster.local/ns/a/sa/client\"]}\n")
	if !pm.reached(t, 8080) {
		t.Fatal("allowed identity refused")
	}
	if st := pm.hboneStatus(t, 8080); st != 200 {
		t.Fatalf("allowed identity: CONNECT answered %d", st)
	}
	pm.apply(t, policyHead+"allow-x}\nspec:\n  rules:\n  - from: {principals: [\"cluster.local/ns/x/sa/other\"]}\n")
	if pm.reached(t, 8080) {
		t.Fatal("denied identity reached B's app")
	}
	if st := pm.hboneStatus(t, 8080); st != 401 {
		t.Fatalf("denied identity: CONNECT answered %d, want 401", st)
	}
	// A DENY on the port beats an ALLOW of the identity.
	pm.apply(t, policyHead+"allow-a}\nspec:\n  rules:\n  - from: {namespaces: [a]}\n---\n"+
		policyHead+"no-8081}\nspec:\n  action: DENY\n  rules:\n  - to: {ports: [8081]}\n")
	if !pm.reached(t, 8080) || pm.reached(t, 8081) {
		t.Fatal("want 8080 allowed and 8081 denied")
	}
	if n := denials(t, pm.reg, "b/no-8081"); n < 1 {
		t.Errorf("denials of b/no-8081 counted %v", n)
	}
}

// TestPolicyStrictRefusesPlaintext: under STRICT a plaintext client is
// refused while HBONE still gets in; a port override re-opens one port.
func TestPolicyStrictRefusesPlaintext(t *testing.T) {
	pm := newPolicyMesh(t)
	if !pm.plaintextReached(t) {
		t.Fatal("permissive by default: plaintext refused")
	}
	pm.apply(t, modeHead+"strict}\nspec: {mode: STRICT}\n")
	if pm.plaintextReached(t) {
		t.Fatal("STRICT: plaintext client reached B's app")
	}
	if !pm.reached(t, 8080) {
		t.Fatal("STRICT: HBONE client refused")
	}
	pm.apply(t, modeHead+"strict}\nspec: {mode: STRICT, ports: [{port: 8080, mode: PERMISSIVE}]}\n")
	if !pm.plaintextReached(t) {
		t.Fatal("port 8080 PERMISSIVE: plaintext refused")
	}
	// Permissive plaintext still meets AuthorizationPolicy: it has no
	// identity, so an identity-based ALLOW keeps it out.
	pm.apply(t, modeHead+"strict}\nspec: {mode: PERMISSIVE}\n---\n"+
		policyHead+"mtls-only}\nspec:\n  rules:\n  - from: {principals: [\"*\"]}\n")
	if pm.plaintextReached(t) {
		t.Fatal("plaintext passed an ALLOW that needs an identity")
	}
	if !pm.reached(t, 8080) {
		t.Fatal("HBONE refused by principals: [*]")
	}
}

// TestPolicyChangeClosesOnlyDeniedLiveConnections: two live connections
// from A to B (ports 8080 and 8081); a policy change that denies 8081
// closes that one within seconds and leaves 8080 working.
func TestPolicyChangeClosesOnlyDeniedLiveConnections(t *testing.T) {
	pm := newPolicyMesh(t)
	pm.apply(t, policyHead+"allow-a}\nspec:\n  rules:\n  - from: {namespaces: [a]}\n")
	open := func(port uint16) net.Conn {
		c, err := pm.A.Dial(netip.AddrPortFrom(pm.B.Pod.IP4, port))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		fmt.Fprintf(c, "echo\n")
		return c
	}
	roundTrip := func(c net.Conn) error {
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Write([]byte("ping")); err != nil {
			return err
		}
		buf := make([]byte, 4)
		_, err := io.ReadFull(c, buf)
		return err
	}
	keep, cut := open(8080), open(8081)
	for _, c := range []net.Conn{keep, cut} {
		if err := roundTrip(c); err != nil {
			t.Fatal(err)
		}
	}
	start := time.Now()
	pm.apply(t, policyHead+"allow-a}\nspec:\n  rules:\n  - from: {namespaces: [a]}\n    to: {ports: [8080]}\n")
	cut.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := cut.Read(make([]byte, 1))
	if err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("now-denied connection still open after the change (read: %v)", err)
	}
	t.Logf("now-denied connection closed %v after the policy change", time.Since(start).Round(time.Millisecond))
	if err := roundTrip(keep); err != nil {
		t.Fatalf("still-allowed connection broken by the change: %v", err)
	}
	if pm.reached(t, 8081) {
		t.Fatal("new connection to the denied port got through")
	}
}

// denials reads ambit_policy_denials_total for one policy.
func denials(t *testing.T, reg *prometheus.Registry, pol string) float64 {
	t.Helper()
	return testenv.Metric(t, reg, "ambit_policy_denials_total", map[string]string{"policy": pol})
}

var _ tunnel.Authorizer = (*policy.Engine)(nil)
