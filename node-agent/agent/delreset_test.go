package agent

import (
	"context"
	"io"
	"net"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambit-mesh/ambit/e2e/lab"
	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/cluster"
	"github.com/ambit-mesh/ambit/tunnel"
)

// delBound is how soon after a DEL's answer a peer must have learned
// that its connection to the deleted pod ended, and the pod's namespace
// be empty of sockets: what the DEL does is done before it answers, so
// this is scheduling slack on a loaded machine. A drain holds them for
// drainTimeout (30 s here, the default), and a peer of a pod whose
// interface is gone learns only from its keepalive (~30 s).
const delBound = 3 * time.Second

// delNode is a lab node whose CNI chain (the CNI 1.1.0 plugin set, then
// ambit-cni) asks an agent serving with the real tunnel, drainTimeout
// at its default, 30 s: a DEL that drained would hold its pod's
// connections far past delBound.
type delNode struct {
	h    *harness
	node *lab.Node
	reg  *prometheus.Registry
	cni  *libcni.CNIConfig
}

func newDelNode(t *testing.T, cidr string, opts ...func(*Options)) *delNode {
	t.Helper()
	return newDelNodeOn(t, cidr, "", opts...)
}

// newDelNodeOn is newDelNode whose pods' rules are backend's (the
// conflist's ruleBackend; "" leaves the plugin's default).
func newDelNodeOn(t *testing.T, cidr, backend string, opts ...func(*Options)) *delNode {
	t.Helper()
	testenv.RequireRoot(t)
	bin := testenv.Binary(t, "ambit-cni")
	set := testenv.PluginSets(t)[1]
	reg := prometheus.NewRegistry()
	h := startAgent(t, "", invAmbient, func(o *Options) {
		o.Config.DrainTimeout.Duration = 30 * time.Second
		serveByRealTunnel(t, o, reg)
		for _, fn := range opts {
			fn(o)
		}
	})
	pol := h.a.Policy()
	h.inv.SetMeshed(func(p cluster.Pod, ns *cluster.Namespace) bool { return pol.Decide(p, ns).Enroll })
	node := labNode(t, h, set, bin, netip.MustParsePrefix(cidr), func(o *lab.NodeOptions) {
		o.PluginStderr = io.Discard
		if backend != "" {
			o.Ambit["ruleBackend"] = backend
		}
	})
	exe := &invoke.DefaultExec{RawExec: &invoke.RawExec{Stderr: io.Discard}}
	return &delNode{h: h, node: node, reg: reg,
		cni: libcni.NewCNIConfigWithCacheDir(node.Opts.PluginDirs, filepath.Join(node.Opts.Dir, "cache"), exe)}
}

func (d *delNode) add(t *testing.T, name string) (*lab.Pod, *lab.App) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p, err := d.node.AddPod(ctx, "apps", name)
	if err != nil {
		t.Fatal(err)
	}
	app, err := p.ServeApp(name, 8080)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(app.Close)
	return p, app
}

// del runs the CNI DEL of p through the node's whole chain, as the
// runtime does (ambit-cni first, then the primary plugin, which removes
// the pod's interface), and leaves its namespace for the test to look
// into (the node's Close removes it). It returns how long the chain
// took.
func (d *delNode) del(t *testing.T, p *lab.Pod) time.Duration {
	t.Helper()
	rt := &libcni.RuntimeConf{ContainerID: p.ContainerID, NetNS: p.Path, IfName: "eth0", Args: [][2]string{
		{"IgnoreUnknown", "true"}, {"K8S_POD_NAMESPACE", p.Namespace}, {"K8S_POD_NAME", p.Name},
		{"K8S_POD_INFRA_CONTAINER_ID", p.ContainerID}, {"K8S_POD_UID", p.UID}}}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	start := time.Now()
	err := d.node.NetNS.Do(func(ns.NetNS) error { return d.cni.DelNetworkList(ctx, d.node.Conf, rt) })
	took := time.Since(start)
	if err != nil {
		t.Fatalf("CNI DEL of %s: %v", p.Name, err)
	}
	return took
}

// held opens a connection from p to dst's app that stays open, after one
// round trip.
func held(t *testing.T, p *lab.Pod, dst netip.Addr) net.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := p.Dial(ctx, netip.AddrPortFrom(dst, 8080))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := lab.AskOn(c, "held"); err != nil {
		t.Fatalf("%s → %v:8080: %v", p.Name, dst, err)
	}
	return c
}

// anchored adds two pods, anchor and name (in that order), and holds a
// connection from name's app to anchor's: the stream a DEL or an
// unenrollment of name finds in use.
func (d *delNode) anchored(t *testing.T, name string) (anchor, p *lab.Pod, c net.Conn) {
	t.Helper()
	anchor, _ = d.add(t, "anchor")
	p, _ = d.add(t, name)
	return anchor, p, held(t, p, anchor.IP)
}

// endsSoon fails t unless c reads an end (a reset or EOF) within
// delBound.
func endsSoon(t *testing.T, c net.Conn, who string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(delBound))
	_, err := c.Read(make([]byte, 1))
	if ne, ok := err.(net.Error); err == nil || ok && ne.Timeout() {
		t.Fatalf("%s: still open %v after the DEL was answered (read: %v)", who, delBound, err)
	}
	t.Logf("%s ended: %v", who, err)
}

// socketsIn lists p's TCP sockets but listeners (those involving only,
// if set, the address only).
func socketsIn(t *testing.T, p *lab.Pod, only netip.Addr) string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "exec", p.NetnsName, "ss", "-tanH", "exclude", "listening").CombinedOutput()
	if err != nil {
		t.Fatalf("ss in %s: %v\n%s", p.Name, err, out)
	}
	var left []string
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if l != "" && (!only.IsValid() || strings.Contains(l, only.String()+":")) {
			left = append(left, l)
		}
	}
	return strings.Join(left, "\n")
}

// noSocketsSoon fails t unless p holds no TCP socket but listeners (of
// only, if set) within delBound.
func noSocketsSoon(t *testing.T, p *lab.Pod, only netip.Addr, why string) {
	t.Helper()
	deadline := time.Now().Add(delBound)
	for {
		left := socketsIn(t, p, only)
		if left == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %v after the DEL was answered, %s holds:\n%s", why, delBound, p.Name, left)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestDelResetsInboundStreams: a client pod of the node (its agent is
// the same, its HBONE connection a real one over the node's bridge)
// holds a stream to srv's app when srv gets a CNI DEL, its app still
// running (a runtime that deletes a live container's network; under a
// kubelet it has stopped). The client's app connection must end at once,
// and srv's namespace hold no socket after: before, the DEL answered
// after closing srv's idle pooled connections only, the stream drained
// for drainTimeout, the primary plugin removed srv's interface meanwhile,
// and the client learned nothing until its keepalive.
func TestDelResetsInboundStreams(t *testing.T) {
	d := newDelNode(t, "10.98.0.0/24")
	cli, _ := d.add(t, "client")
	srv, _ := d.add(t, "srv")
	c := held(t, cli, srv.IP)

	t.Logf("CNI DEL of the chain took %v", d.del(t, srv).Round(time.Microsecond))
	endsSoon(t, c, "the client's app connection to srv's app")
	noSocketsSoon(t, srv, netip.Addr{}, "srv's connections outlived its DEL")
}

// TestDelResetsPooledStreams: the pod that gets the DEL is the client,
// its pooled HBONE connection to a resident pod carrying a stream (so
// not idle). The resident pod's agent must learn at once: its server end
// of that connection and its delivery to its app gone, nothing left
// pooled, and nothing left in the deleted pod's namespace. Before, only
// idle pooled connections closed before the answer; this one closed
// after the drain, into a removed interface, and its server end stayed.
func TestDelResetsPooledStreams(t *testing.T) {
	d := newDelNode(t, "10.98.1.0/24")
	anchor, cli, c := d.anchored(t, "client")
	if n := testenv.Metric(t, d.reg, "ambit_tunnel_hbone_pool_connections", nil); n != 1 {
		t.Fatalf("%v pooled HBONE connections, want the client's 1", n)
	}

	t.Logf("CNI DEL of the chain took %v", d.del(t, cli).Round(time.Microsecond))
	noSocketsSoon(t, anchor, cli.IP, "the resident pod still holds its end of the deleted client's connection")
	noSocketsSoon(t, cli, netip.Addr{}, "the client's connections outlived its DEL")
	if n := testenv.Metric(t, d.reg, "ambit_tunnel_hbone_pool_connections", nil); n != 0 {
		t.Errorf("%v pooled HBONE connections after the DEL, want 0", n)
	}
	endsSoon(t, c, "the deleted client's app connection")
}

// TestUnenrollDrainsThenDelResets: an unenrolled pod (its network stays)
// keeps its app's connection through the agent, drained as before; when
// the pod's DEL comes during that drain, the drain is cut at once: its
// network goes. Before, the DEL found the pod no longer served and left
// the drain to run out (drainTimeout) past the pod's interface. (The
// connection is the unenrolled pod's outbound one; inbound ones drain
// too, through the drain guard's reply path, and a DEL cuts them the
// same way: TestUnenrollDrainsInboundStreams.)
func TestUnenrollDrainsThenDelResets(t *testing.T) {
	d := newDelNode(t, "10.98.2.0/24")
	anchor, web, c := d.anchored(t, "web") // the inventory's workload: its labels are the test's

	d.unenroll(t, "web")
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if r, err := lab.AskOn(c, "drained"); err != nil || r.App != "anchor" {
		t.Fatalf("web's connection after its unenrollment: %+v %v (cut, not drained)", r, err)
	}

	t.Logf("CNI DEL of the chain took %v", d.del(t, web).Round(time.Microsecond))
	noSocketsSoon(t, anchor, web.IP, "the resident pod still holds its end of web's drained connection")
	noSocketsSoon(t, web, netip.Addr{}, "web's drained connections outlived its DEL")
	endsSoon(t, c, "web's app connection drained by the agent")
}

// TestDelAbortsOnce: a DEL with its netns resets the pod's connections
// before the rules' removal, and the release after it finds nothing left
// to reset: Abort runs once. It ran again in the release, so a DEL whose
// pod's handlers outlasted Abort's bound (500 ms) waited for it twice
// before it answered, and said so twice.
func TestDelAbortsOnce(t *testing.T) {
	var aborts atomic.Int32
	d := newDelNode(t, "10.98.3.0/24", func(o *Options) { o.Tunnel = abortCounter{o.Tunnel, &aborts} })
	cli, _ := d.add(t, "client")
	srv, _ := d.add(t, "srv")
	c := held(t, cli, srv.IP)

	d.del(t, srv)
	endsSoon(t, c, "the client's app connection to srv's app")
	if n := aborts.Load(); n != 1 {
		t.Errorf("srv's DEL aborted its serving %d times, want 1", n)
	}
}

// abortCounter is a Tunnel whose servings (the real tunnel's) count the
// calls of their Abort.
type abortCounter struct {
	Tunnel
	n *atomic.Int32
}

func (c abortCounter) Serve(pod tunnel.Pod) (Serving, error) {
	s, err := c.Tunnel.Serve(pod)
	if err != nil {
		return nil, err
	}
	return countedAborts{s.(*tunnel.Serving), c.n}, nil
}

type countedAborts struct {
	*tunnel.Serving
	n *atomic.Int32
}

func (s countedAborts) Abort(ctx context.Context) error {
	s.n.Add(1)
	return s.Serving.Abort(ctx)
}
