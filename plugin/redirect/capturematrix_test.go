package redirect

import (
	"context"
	"io"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/plugin/internal/nstest"
	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
)

// TestCaptureMatrix: what the in-pod rules capture, seen by real
// connections rather than by rule text, for every backend. The pod has
// two interfaces (eth0, and net1 as Multus adds one), both families,
// the agent's three ports and an app on 8080; a peer holds the probe
// SNAT sources. Each listener names itself, so the test sees where a
// connection landed. What a migration from Istio ambient expects:
// outbound TCP of either family on either interface → 15001; inbound
// TCP to any port but 15008 (15001 included) → 15006, on either
// interface; 15008 direct; the agent's marked sockets and kubelet probes
// (IPv4 and IPv6 SNAT sources) straight through; loopback and self-calls
// to the pod's own addresses straight to the app; an app mark outside
// the mask captured, one equal to the connmark routed locally (no
// plaintext leaves). A rule change that moves any cell fails here.
func TestCaptureMatrix(t *testing.T) {
	testenv.RequireRoot(t)
	for _, b := range backends {
		t.Run(string(b), func(t *testing.T) {
			pod, peer := nstest.New(t, "pod"), nstest.New(t, "peer")
			suffix := nstest.Name("")[len(nstest.Prefix)+1:][:6]
			run := func(n ns.NetNS, args ...string) { t.Helper(); nstest.Run(t, n, args...) }
			for _, l := range []struct{ pod, peer, v4, v6 string }{
				{"eth0", "ambm" + suffix, "10.239.0", "fd00:239:"},
				{"net1", "ambn" + suffix, "10.240.0", "fd00:240:"},
			} {
				run(pod, "ip", "link", "add", l.pod, "type", "veth", "peer", "name", l.peer)
				run(pod, "ip", "link", "set", l.peer, "netns", peer.Path())
				run(pod, "ip", "addr", "add", l.v4+".2/24", "dev", l.pod)
				run(pod, "ip", "addr", "add", l.v6+":2/64", "dev", l.pod, "nodad")
				run(pod, "ip", "link", "set", l.pod, "up")
				run(peer, "ip", "addr", "add", l.v4+".1/24", "dev", l.peer)
				run(peer, "ip", "addr", "add", l.v6+":1/64", "dev", l.peer, "nodad")
				run(peer, "ip", "link", "set", l.peer, "up")
			}
			run(pod, "ip", "link", "set", "lo", "up")
			run(peer, "ip", "addr", "add", "169.254.7.127/32", "dev", "ambm"+suffix)
			run(peer, "ip", "addr", "add", "fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128", "dev", "ambm"+suffix, "nodad")
			run(pod, "ip", "route", "add", "169.254.7.127/32", "via", "10.239.0.1")
			run(pod, "ip", "route", "add", "fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128", "via", "fd00:239::1")
			if _, err := Install(context.Background(), pod, b, DefaultSpec()); err != nil {
				t.Fatal(err)
			}
			for _, l := range []struct{ port, name string }{{"15001", "outbound"}, {"15006", "inbound"}, {"15008", "hbone"}, {"8080", "app"}} {
				nameListener(t, pod, ":"+l.port, l.name)
			}
			nameListener(t, peer, ":80", "peer")
			cases := []struct {
				name         string
				from         ns.NetNS
				laddr, raddr string
				mark         int
				want         string
			}{
				{"out v4", pod, "", "10.239.0.1:80", 0, "outbound"},
				{"out v6", pod, "", "[fd00:239::1]:80", 0, "outbound"},
				{"out v4 net1", pod, "", "10.240.0.1:80", 0, "outbound"},
				{"out v6 net1", pod, "", "[fd00:240::1]:80", 0, "outbound"},
				{"out agent-marked", pod, "", "10.239.0.1:80", DefaultMark, "peer"},
				{"out app mark outside the mask", pod, "", "10.239.0.1:80", 0x10000, "outbound"},
				{"out app mark = connmark", pod, "", "10.239.0.1:80", DefaultConnMark, "ERR"},
				{"self v4", pod, "", "10.239.0.2:8080", 0, "app"},
				{"self v6", pod, "", "[fd00:239::2]:8080", 0, "app"},
				{"self net1", pod, "", "10.240.0.2:8080", 0, "app"},
				{"loopback", pod, "", "127.0.0.1:8080", 0, "app"},
				{"in v4", peer, "", "10.239.0.2:8080", 0, "inbound"},
				{"in v6", peer, "", "[fd00:239::2]:8080", 0, "inbound"},
				{"in v4 net1", peer, "", "10.240.0.2:8080", 0, "inbound"},
				{"in v6 net1", peer, "", "[fd00:240::2]:8080", 0, "inbound"},
				{"in to 15001", peer, "", "10.239.0.2:15001", 0, "inbound"},
				{"in to 15008", peer, "", "10.239.0.2:15008", 0, "hbone"},
				{"in to 15008 v6", peer, "", "[fd00:239::2]:15008", 0, "hbone"},
				{"probe v4", peer, "169.254.7.127:0", "10.239.0.2:8080", 0, "app"},
				{"probe v6", peer, "[fd16:9254:7127:1337:ffff:ffff:ffff:ffff]:0", "[fd00:239::2]:8080", 0, "app"},
			}
			for _, c := range cases {
				if got := landedOn(c.from, c.laddr, c.raddr, c.mark); !strings.HasPrefix(got, c.want) {
					t.Errorf("%s (%s): landed on %q, want %s", c.name, c.raddr, got, c.want)
				}
			}
		})
	}
}

// nameListener accepts on addr in n and writes name to every connection.
// Transparent, so a redirected connection is accepted whatever its
// destination, as the agent's listeners do.
func nameListener(t *testing.T, n ns.NetNS, addr, name string) {
	t.Helper()
	var l net.Listener
	if err := n.Do(func(ns.NetNS) error {
		lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
			var serr error
			c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1) })
			return serr
		}}
		var err error
		l, err = lc.Listen(context.Background(), "tcp", addr)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Write([]byte(name))
			c.Close()
		}
	}()
}

// landedOn dials raddr from n (bound to laddr, with SO_MARK mark when
// non-zero) and returns the name the listener wrote, or "ERR ...".
func landedOn(n ns.NetNS, laddr, raddr string, mark int) string {
	out := ""
	n.Do(func(ns.NetNS) error {
		d := net.Dialer{Timeout: 3 * time.Second, Control: func(_, _ string, c syscall.RawConn) error {
			var serr error
			if mark != 0 {
				c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, mark) })
			}
			return serr
		}}
		if laddr != "" {
			a, err := net.ResolveTCPAddr("tcp", laddr)
			if err != nil {
				out = "ERR " + err.Error()
				return nil
			}
			d.LocalAddr = a
		}
		c, err := d.Dial("tcp", raddr)
		if err != nil {
			out = "ERR " + err.Error()
			return nil
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		b, err := io.ReadAll(c)
		if err != nil {
			out = "ERR " + err.Error()
			return nil
		}
		out = string(b)
		return nil
	})
	return out
}
