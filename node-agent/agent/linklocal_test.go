package agent

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/cluster"
	"github.com/ambit-mesh/ambit/tunnel"
)

// linkLocal6 waits for n's IPv6 link-local address on its veth to be
// usable (DAD done) and returns it with its zone, the link's index in n:
// a name would be resolved through Go's process-wide zone cache, filled
// from whichever namespace last listed its interfaces.
func linkLocal6(t *testing.T, n *testNetns) string {
	t.Helper()
	var addr string
	eventually(t, "a usable IPv6 link-local address in "+n.name, func() bool {
		inNetns(t, n, func() error {
			ifs, err := net.Interfaces()
			if err != nil {
				return err
			}
			for _, ifc := range ifs {
				if ifc.Flags&net.FlagLoopback != 0 {
					continue
				}
				as, _ := ifc.Addrs()
				for _, a := range as {
					ip := a.(*net.IPNet).IP
					if ip.To4() == nil && ip.IsLinkLocalUnicast() {
						addr = ip.String() + "%" + strconv.Itoa(ifc.Index)
					}
				}
			}
			return nil
		})
		if addr == "" {
			return false
		}
		// Tentative until DAD ends: a bind to it fails until then.
		ok := false
		inNetns(t, n, func() error {
			l, err := net.Listen("tcp", "["+addr+"]:0")
			if err == nil {
				ok = true
				l.Close()
			}
			return nil
		})
		return ok
	})
	return addr
}

// TestLinkLocalIPv6IsCaptured: two enrolled pods whose addresses (the
// ADD's, as an IPv4-only cluster gives them) are IPv4 only still have
// IPv6 link-local addresses on their shared link, as pods on a bridge
// (flannel's cni0, the bridge plugin) do unless IPv6 is turned off in
// the pod. An app listening on the wildcard (Go's, Java's, most
// servers' default: dual-stack [::]) is reachable there. The server's
// mode is strict: plaintext is refused. Before the fix the pods got
// IPv4 rules only, so a TCP connection from one pod to the other's
// fe80:: address was captured by neither side's rules: the client's
// bytes crossed the link in plaintext and reached the strict server's
// app, and neither agent counted anything.
func TestLinkLocalIPv6IsCaptured(t *testing.T) {
	testenv.RequireRoot(t)
	reg := prometheus.NewRegistry()
	h := startAgent(t, "", invAmbient, func(o *Options) {
		p, err := tunnel.New(tunnel.Config{Directory: o.View, Certificates: newTestCA(t), Logger: quietLogger(), Registerer: reg,
			Authorizer: strictAuthorizer{}})
		if err != nil {
			t.Fatal(err)
		}
		o.Tunnel = ProxyTunnel{Proxy: p}
	})
	pol := h.a.Policy()
	h.inv.SetMeshed(func(p cluster.Pod, ns *cluster.Namespace) bool { return pol.Decide(p, ns).Enroll })
	client, server := newPair(t, "10.91.0.2", "10.91.0.3")
	// The app on the wildcard, both families.
	serveLines(t, server, "[::]:8081", "app")
	enrollLikePlugin(t, h, "server", server, "10.91.0.3/24")
	// The server's link-local address as the client dials it: through
	// the client's own link (zone). That address is the dial's source:
	// tentative (DAD) it gives EADDRNOTAVAIL, "cannot assign requested
	// address" (seen under load), so it is waited for too.
	srv, cli := linkLocal6(t, server), linkLocal6(t, client)
	ll := srv[:strings.Index(srv, "%")] + cli[strings.Index(cli, "%"):]

	// A client outside the mesh: the strict server's inbound capture
	// alone must refuse it, on IPv4 as on IPv6 link-local.
	for _, addr := range []string{"10.91.0.3:8081", "[" + ll + "]:8081"} {
		plaintextRefused(t, client, addr, "unenrolled client")
	}

	// Both enrolled: the mesh works over IPv4, and the link-local path
	// is still no way around it.
	enrollLikePlugin(t, h, "client", client, "10.91.0.2/24")
	c, line, err := dialFrom(t, client, "10.91.0.3:8081")
	if err != nil || line != "app" {
		t.Fatalf("client → server app over IPv4 through the mesh: %q %v", line, err)
	}
	c.Close()
	// Refused at once in the client's pod: the captured SYN cannot reach
	// the agent (no route to ::1 from a socket bound to the link), and
	// before session 17 the connect timed out (i/o timeout here, the
	// kernel's retries for two minutes).
	if err := plaintextRefused(t, client, "["+ll+"]:8081", "enrolled client"); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("enrolled client → server's link-local address: %v, want connection refused", err)
	}
}

// plaintextRefused fails t if an app in client reaches the (strict)
// server's app at addr; it returns the dial's error.
func plaintextRefused(t *testing.T, client *testNetns, addr, who string) error {
	t.Helper()
	c, line, err := dialFrom(t, client, addr)
	if err == nil {
		secret := "top-secret-over-link-local"
		c.SetDeadline(time.Now().Add(3 * time.Second))
		fmt.Fprintf(c, "%s\n", secret)
		got, rerr := bufio.NewReader(c).ReadString('\n')
		c.Close()
		t.Fatalf("%s → strict server's app at %s: got %q, echo %q (%v): plaintext past the strict mode",
			who, addr, line, strings.TrimSpace(got), rerr)
	}
	t.Logf("%s → %s refused: %v", who, addr, err)
	return err
}

// strictAuthorizer refuses every plaintext connection (PeerAuthentication
// STRICT) and allows every authenticated one.
type strictAuthorizer struct{}

func (strictAuthorizer) Authorize(c tunnel.ConnInfo) tunnel.Verdict {
	if c.Plaintext {
		return tunnel.Verdict{Allow: false, Policy: "strict", Reason: "plaintext refused"}
	}
	return tunnel.Verdict{Allow: true}
}
