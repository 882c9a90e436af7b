package redirect

import (
	"context"
	"io"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/plugin/internal/nstest"
	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
)

// The inbound side of the mesh: the agent, inside the pod, dials the app
// from the *client's* address (IP_TRANSPARENT, SO_MARK = Mark). The app's
// replies go to a remote address, so without the connmark rules and the
// policy route they would leave through eth0 and the handshake would never
// complete. With them, the app sees the real client IP and the agent gets
// its replies. Checked for every backend, and without rules as control.
func TestTransparentDialBack(t *testing.T) {
	testenv.RequireRoot(t)
	for _, fam := range []struct {
		name          string
		podIP, client netip.Addr
		bits          string
	}{
		{"IPv4", netip.MustParseAddr("10.237.0.2"), netip.MustParseAddr("10.237.0.1"), "/24"},
		{"IPv6", netip.MustParseAddr("fd00:237::2"), netip.MustParseAddr("fd00:237::1"), "/64"},
	} {
		for _, b := range append([]Backend{""}, backends...) {
			dialBack(t, b, fam.name, fam.podIP, fam.client, fam.bits)
		}
	}
}

func dialBack(t *testing.T, b Backend, famName string, podIP, client netip.Addr, bits string) {
	name := string(b)
	if b == "" {
		name = "no-rules"
	}
	t.Run(famName+"/"+name, func(t *testing.T) {
		pod, peer := nstest.New(t, "pod"), nstest.New(t, "peer")
		network, level, opt := "tcp4", unix.SOL_IP, unix.IP_TRANSPARENT
		if podIP.Is6() {
			network, level, opt = "tcp6", unix.SOL_IPV6, unix.IPV6_TRANSPARENT
		}
		veth := "ambv" + nstest.Name("")[len(nstest.Prefix)+1:][:6]
		nstest.Run(t, pod, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", veth)
		nstest.Run(t, pod, "ip", "link", "set", veth, "netns", peer.Path())
		nstest.Run(t, pod, "ip", "addr", "add", podIP.String()+bits, "dev", "eth0", "nodad")
		nstest.Run(t, pod, "ip", "link", "set", "eth0", "up")
		nstest.Run(t, pod, "ip", "link", "set", "lo", "up")
		nstest.Run(t, peer, "ip", "addr", "add", client.String()+bits, "dev", veth, "nodad")
		nstest.Run(t, peer, "ip", "link", "set", veth, "up")
		if b != "" {
			if _, err := Install(context.Background(), pod, b, DefaultSpec()); err != nil {
				t.Fatal(err)
			}
		}
		// The app, listening on its port in the pod.
		var app net.Listener
		pod.Do(func(ns.NetNS) error {
			var err error
			app, err = net.Listen(network, ":8080")
			return err
		})
		defer app.Close()
		seen := make(chan string, 1)
		go func() {
			c, err := app.Accept()
			if err != nil {
				return
			}
			defer c.Close()
			seen <- c.RemoteAddr().(*net.TCPAddr).IP.String()
			c.Write([]byte("hello from app"))
		}()
		// The agent's socket: transparent, marked, bound to the client.
		d := net.Dialer{
			LocalAddr: &net.TCPAddr{IP: client.AsSlice()},
			Control: func(_, _ string, c syscall.RawConn) error {
				var serr error
				c.Control(func(fd uintptr) {
					if serr = unix.SetsockoptInt(int(fd), level, opt, 1); serr == nil {
						serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, DefaultMark)
					}
				})
				return serr
			},
		}
		timeout := 3 * time.Second
		if b == "" {
			timeout = time.Second // the control only has to fail
		}
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		var conn net.Conn
		err := pod.Do(func(ns.NetNS) error {
			var err error
			conn, err = d.DialContext(ctx, network, netip.AddrPortFrom(podIP, 8080).String())
			return err
		})
		if b == "" {
			if err == nil {
				conn.Close()
				t.Fatal("without rules the spoofed dial completed; the test proves nothing")
			}
			return
		}
		if err != nil {
			t.Fatalf("agent dial from the client's address: %v", err)
		}
		defer conn.Close()
		if src := <-seen; src != client.String() {
			t.Fatalf("app saw the connection from %s, want the client %s", src, client)
		}
		conn.SetReadDeadline(time.Now().Add(3 * time.Second))
		got, err := io.ReadAll(conn)
		if err != nil || string(got) != "hello from app" {
			t.Fatalf("reply to the agent: %q, %v", got, err)
		}
	})
}
