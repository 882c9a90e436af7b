package redirect

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/plugin/internal/nstest"
)

// TestLinkLocalOutboundRefused: an app in an enrolled pod connects to a
// peer's IPv6 link-local address on their shared link. The outbound
// capture cannot take it to the agent (a socket connected to a scoped
// fe80:: address is bound to its interface, and the REDIRECT to ::1
// finds no route from there), and plaintext must not leave: the connect
// is refused at once and the peer's app sees nothing. Before, the SYN
// was dropped at the redirect and the connect timed out (i/o timeout
// after the dial's 3 s, the kernel's own retries for two minutes).
// Without rules (control) the same dial reaches the peer.
func TestLinkLocalOutboundRefused(t *testing.T) {
	testenv.RequireRoot(t)
	for _, b := range append([]Backend{""}, backends...) {
		name := string(b)
		if b == "" {
			name = "no-rules"
		}
		t.Run(name, func(t *testing.T) {
			pod, peer := nstest.New(t, "pod"), nstest.New(t, "peer")
			veth := "ambl" + nstest.Name("")[len(nstest.Prefix)+1:][:6]
			nstest.Run(t, pod, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", veth)
			nstest.Run(t, pod, "ip", "link", "set", veth, "netns", peer.Path())
			// Link-local addresses of our own, without DAD, so the test
			// does not wait for the kernel's.
			nstest.Run(t, pod, "ip", "addr", "add", "fe80::a:1/64", "dev", "eth0", "nodad")
			nstest.Run(t, pod, "ip", "addr", "add", "10.238.0.2/24", "dev", "eth0")
			nstest.Run(t, pod, "ip", "link", "set", "eth0", "up")
			nstest.Run(t, pod, "ip", "link", "set", "lo", "up")
			nstest.Run(t, peer, "ip", "addr", "add", "fe80::a:2/64", "dev", veth, "nodad")
			nstest.Run(t, peer, "ip", "link", "set", veth, "up")
			if b != "" {
				if _, err := Install(context.Background(), pod, b, DefaultSpec()); err != nil {
					t.Fatal(err)
				}
			}
			var app net.Listener
			peer.Do(func(ns.NetNS) error {
				var err error
				app, err = net.Listen("tcp", "[::]:8080")
				return err
			})
			defer app.Close()
			var accepted atomic.Int32
			go func() {
				for {
					c, err := app.Accept()
					if err != nil {
						return
					}
					accepted.Add(1)
					c.Close()
				}
			}()
			var err error
			pod.Do(func(ns.NetNS) error {
				// The zone by index: Go caches interface names process-wide,
				// and each subtest's eth0 is another netns's.
				ifc, ierr := net.InterfaceByName("eth0")
				if ierr != nil {
					err = ierr
					return nil
				}
				var c net.Conn
				if c, err = net.DialTimeout("tcp", fmt.Sprintf("[fe80::a:2%%%d]:8080", ifc.Index), 3*time.Second); err == nil {
					c.Close()
				}
				return nil
			})
			if b == "" {
				if err != nil {
					t.Fatalf("without rules the link-local dial failed (%v); the test proves nothing", err)
				}
				return
			}
			if !errors.Is(err, syscall.ECONNREFUSED) {
				t.Errorf("link-local dial from the enrolled pod: %v, want connection refused", err)
			}
			if n := accepted.Load(); n != 0 {
				t.Errorf("the peer's app accepted %d connections from the enrolled pod over link-local", n)
			}
		})
	}
}
