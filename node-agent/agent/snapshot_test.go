package agent

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/admin"
	"github.com/ambit-mesh/ambit/node-agent/cluster"
	"github.com/ambit-mesh/ambit/node-agent/identity"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
	"github.com/ambit-mesh/ambit/plugin/redirect"
	"github.com/ambit-mesh/ambit/tunnel"
)

// statusNode is an agent serving its admin socket as `ambit-agent run`
// does: real tunnel, real certificates from a local CA in the state
// directory, rule checks every 200 ms.
type statusNode struct {
	h     *harness
	ids   *identity.Manager
	proxy *tunnel.Proxy
	sock  string
}

func startStatusNode(t testing.TB) *statusNode {
	t.Helper()
	dir := agentDir(t)
	s := &statusNode{}
	var err error
	s.ids, err = identity.NewManager(identity.Config{TrustDomain: "cluster.local", LocalCADir: filepath.Join(dir, "ca"), Logger: quietLogger()})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go s.ids.Run(ctx)
	s.h = startAgent(t, dir, invAmbient, func(o *Options) {
		p, err := tunnel.New(tunnel.Config{Directory: o.View, Certificates: s.ids, Logger: quietLogger()})
		if err != nil {
			t.Fatal(err)
		}
		s.proxy = p
		o.Tunnel = ProxyTunnel{Proxy: p}
		o.Certs = s.ids
		o.Config.RuleCheckInterval.Duration = 200 * time.Millisecond
	})
	pol := s.h.a.Policy()
	s.h.inv.SetMeshed(func(p cluster.Pod, ns *cluster.Namespace) bool { return pol.Decide(p, ns).Enroll })
	s.sock = admin.SocketPath(dir, "00000000000000000001-test")
	srv, err := admin.Listen(s.sock, admin.Sources{
		Agent: func() admin.Agent {
			return admin.Agent{Instance: "00000000000000000001-test", Node: "node-a", Ready: true}
		},
		Pods:         s.h.a.AdminPods,
		Certificates: s.ids.Certificates,
		Roots:        s.ids.RootCertificates,
		Connections:  s.proxy.Connections,
	}, quietLogger())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return s
}

// status asks the agent through its socket, as `ambit-agent status`.
func (s *statusNode) status(t testing.TB) *admin.Status {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := admin.Fetch(ctx, s.sock)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func podOf(st *admin.Status, name string) *admin.Pod {
	for i := range st.Pods {
		if st.Pods[i].Namespace == "apps" && st.Pods[i].Name == name {
			return &st.Pods[i]
		}
	}
	return nil
}

// TestStatusShowsWhatTheAgentServes asks a real agent, through its admin
// socket, what a platform engineer asks ztunnel's config_dump: each
// enrolled pod with its IP, listeners, rule check and certificate; a pod
// whose enrollment failed, with why; a pod still to come; connection
// counts going up while a connection crosses the mesh and down after;
// the certificate and trust bundle the agent really uses. And never a
// private key.
func TestStatusShowsWhatTheAgentServes(t *testing.T) {
	testenv.RequireRoot(t)
	s := startStatusNode(t)
	client, server := newPair(t, "10.91.0.2", "10.91.0.3")
	enrollLikePlugin(t, s.h, "client", client, "10.91.0.2/24")
	enrollLikePlugin(t, s.h, "server", server, "10.91.0.3/24")

	// A pod whose app already holds 15006: its ADD fails.
	broken := newNetns(t, "10.91.1.2/24")
	var hold net.Listener
	inNetns(t, broken, func() (err error) { hold, err = net.Listen("tcp", "0.0.0.0:15006"); return err })
	defer hold.Close()
	if resp, err := s.h.call(cniproto.OpAdd, "apps", "broken", "cid-broken", broken, "10.91.1.2/24"); err != nil || resp.Error == "" {
		t.Fatalf("ADD of a pod holding 15006: %+v %v, want an error", resp, err)
	}

	st := s.status(t)
	for _, name := range []string{"client", "server"} {
		p := podOf(st, name)
		if p == nil {
			t.Fatalf("%s not in the status: %+v", name, st.Pods)
		}
		ip := map[string]string{"client": "10.91.0.2", "server": "10.91.0.3"}[name]
		if p.State != admin.StateEnrolled || len(p.IPs) != 1 || p.IPs[0] != netip.MustParseAddr(ip) || p.ContainerID != "cid-"+name {
			t.Fatalf("%s: %+v, want enrolled with IP %s", name, p, ip)
		}
		if fmt.Sprint(p.Listeners) != "[15001 15006 15008]" || p.Backend != string(redirect.Nftables) {
			t.Fatalf("%s: listeners %v backend %q", name, p.Listeners, p.Backend)
		}
		if p.Rules == nil || p.Rules.Result != admin.RulesOK || time.Since(p.Rules.At) > time.Minute {
			t.Fatalf("%s: rules %+v, want a recent ok", name, p.Rules)
		}
		if p.Identity != "spiffe://cluster.local/ns/apps/sa/default" || p.Connections == nil {
			t.Fatalf("%s: identity %q, connections %+v", name, p.Identity, p.Connections)
		}
	}
	b := podOf(st, "broken")
	if b == nil || b.State != admin.StateFailed || b.Reason != eventPortInUse || !strings.Contains(b.Message, "15006") ||
		len(b.IPs) != 1 || b.IPs[0] != netip.MustParseAddr("10.91.1.2") {
		t.Fatalf("broken pod: %+v, want failed (%s) naming port 15006, with its IP", b, eventPortInUse)
	}
	// In the inventory, never started here: pending.
	if w := podOf(st, "web"); w == nil || w.State != admin.StatePending || w.Reason != "NoIP" {
		t.Fatalf("web: %+v, want pending (NoIP)", w)
	}

	// The certificate shown is the one the tunnel presents.
	id := "spiffe://cluster.local/ns/apps/sa/default"
	real, err := s.ids.Certificate(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	st = s.status(t)
	if len(st.Certificates) != 1 {
		t.Fatalf("certificates: %+v", st.Certificates)
	}
	c := st.Certificates[0]
	if c.Identity != id || c.Serial != real.Leaf.SerialNumber.Text(16) || !c.NotAfter.Equal(real.Leaf.NotAfter) ||
		c.Issuer != real.Leaf.Issuer.String() || c.Pods != 2 {
		t.Fatalf("certificate %+v, the tunnel's: serial %s not after %v issuer %s (2 pods)", c, real.Leaf.SerialNumber.Text(16), real.Leaf.NotAfter, real.Leaf.Issuer)
	}
	if p := podOf(st, "client"); !p.CertNotAfter.Equal(real.Leaf.NotAfter) {
		t.Fatalf("client's CERT EXPIRES %v, its certificate's %v", p.CertNotAfter, real.Leaf.NotAfter)
	}
	roots := s.ids.RootCertificates()
	if len(st.TrustBundle) != 1 || len(roots) != 1 {
		t.Fatalf("trust bundle %+v (agent: %d roots)", st.TrustBundle, len(roots))
	}
	sum := sha256.Sum256(roots[0].Raw)
	if st.TrustBundle[0].SHA256 != hex.EncodeToString(sum[:]) || real.Leaf.CheckSignatureFrom(roots[0]) != nil {
		t.Fatalf("trust bundle %+v is not the root that signed the pods' certificate", st.TrustBundle[0])
	}

	// A connection from client to server's app, across the mesh: the
	// client's outbound HBONE and the server's inbound HBONE count it
	// while it is open.
	before := s.status(t)
	conn, line, err := dialFrom(t, client, "10.91.0.3:8080")
	if err != nil || line != "plain" {
		t.Fatalf("client → server through the mesh: %q %v", line, err)
	}
	var during *admin.Status
	eventually(t, "the open connection counted on both sides", func() bool {
		during = s.status(t)
		cl, sv := podOf(during, "client").Connections, podOf(during, "server").Connections
		return cl.OutboundHBONE == 1 && cl.HBONEConnectionsOut == 1 && sv.InboundHBONE == 1 && sv.HBONEConnectionsIn == 1
	})
	if got := during.Connections; got.Pods.OutboundHBONE != 1 || got.Pods.InboundHBONE != 1 || got.Held < 2 ||
		got.Pods.In() != before.Connections.Pods.In()+1 {
		t.Fatalf("totals while open: %+v (before %+v)", got, before.Connections)
	}
	fmt.Fprintf(conn, "ping\n")
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if l, err := bufio.NewReader(conn).ReadString('\n'); err != nil || l != "ping\n" {
		t.Fatalf("echo: %q %v", l, err)
	}
	conn.Close()
	eventually(t, "the closed connection no longer counted", func() bool {
		st := s.status(t)
		cl, sv := podOf(st, "client").Connections, podOf(st, "server").Connections
		return cl.OutboundHBONE == 0 && sv.InboundHBONE == 0 && cl.Held == 0 && sv.Held == 0
	})

	// Someone flushes the server's rules: the next check finds it, the
	// agent repairs, and status says what it found.
	if out, err := exec.Command("ip", "netns", "exec", server.name, "nft", "flush", "chain", "inet", redirect.TableName, "nat-prerouting").CombinedOutput(); err != nil {
		t.Fatalf("nft flush: %v %s", err, out)
	}
	eventually(t, "the repair in the status", func() bool {
		r := podOf(s.status(t), "server").Rules
		return r != nil && r.Result == admin.RulesRepaired && r.Problem != ""
	})

	// Nothing secret in any form of the answer.
	var all strings.Builder
	raw, _ := json.Marshal(s.status(t))
	all.Write(raw)
	for _, v := range []string{admin.ViewPods, admin.ViewCerts, admin.ViewConns} {
		admin.Render(&all, s.status(t), v)
	}
	out := all.String()
	keyDER, err := x509.MarshalPKCS8PrivateKey(real.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	secrets := []string{"PRIVATE KEY", "BEGIN ", base64.StdEncoding.EncodeToString(keyDER)[:40], hex.EncodeToString(keyDER)[:40]}
	caFiles, _ := filepath.Glob(filepath.Join(s.h.dir, "ca", "*"))
	for _, f := range caFiles {
		b, _ := os.ReadFile(f)
		for _, l := range strings.Split(string(b), "\n") {
			if len(l) >= 40 && !strings.HasPrefix(l, "-----") {
				secrets = append(secrets, l) // key and certificate bodies alike: none belongs in the answer
			}
		}
	}
	for _, sec := range secrets {
		if strings.Contains(out, sec) {
			t.Fatalf("status output contains %q", sec)
		}
	}
	if strings.Contains(strings.ToLower(out), "token") {
		t.Fatalf("status output mentions a token:\n%s", out)
	}
}

// TestStatusWhileStopping asks an agent again and again while it shuts
// down, its pod draining a connection: the shutdown lets pods go without
// their locks, and status then reads their records only (the race
// detector watches the rest), answering each as enrolled and draining.
func TestStatusWhileStopping(t *testing.T) {
	testenv.RequireRoot(t)
	h := startAgent(t, "", invAmbient)
	n := newNetns(t, "10.93.0.2/24")
	enrollLikePlugin(t, h, "web", n, "10.93.0.2/24")
	c, line, err := dialFrom(t, n, "127.0.0.1:15001")
	if err != nil || !strings.HasPrefix(line, "captured:") {
		t.Fatalf("captured connection: %q %v", line, err)
	}
	defer c.Close()
	if p := h.a.AdminPods(context.Background()); len(p) != 1 || p[0].State != admin.StateEnrolled || p[0].Reason != "" || len(p[0].Listeners) != 3 {
		t.Fatalf("before the stop: %+v", p)
	}
	h.cancel()
	h.cancel = nil
	draining := 0
	for done := false; !done; {
		select {
		case err := <-h.done:
			if err != nil {
				t.Fatal(err)
			}
			done = true
		default:
			for _, p := range h.a.AdminPods(context.Background()) {
				if p.Name == "web" && p.Reason == "Draining" {
					if p.State != admin.StateEnrolled || len(p.Listeners) != 0 {
						t.Fatalf("while stopping: %+v", p)
					}
					draining++
				}
			}
		}
	}
	if draining == 0 {
		t.Fatal("no answer while the agent drained showed the pod draining")
	}
}

// BenchmarkAdminStatus is one `ambit-agent status` answer (GET over the
// socket, JSON decoded) from an agent serving 100 pods with the real
// tunnel and certificates: what an operator's call costs the agent.
func BenchmarkAdminStatus(b *testing.B) {
	testenv.RequireRoot(b)
	s := startStatusNode(b)
	const n = 100
	for i := range n {
		ip := fmt.Sprintf("10.92.%d.%d/16", i/200, i%200+2)
		enrollLikePlugin(b, s.h, fmt.Sprintf("web-%d", i), newNetns(b, ip), ip)
	}
	st := s.status(b)
	raw, _ := json.Marshal(st)
	if len(st.Pods) < n {
		b.Fatalf("%d pods in the status, want %d", len(st.Pods), n)
	}
	b.ResetTimer()
	for b.Loop() {
		s.status(b)
	}
	b.ReportMetric(float64(len(raw))/float64(len(st.Pods)), "B/pod")
}
