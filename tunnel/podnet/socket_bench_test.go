package podnet

import (
	"context"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"testing"
)

// BenchmarkDial: what a connection opened inside a pod netns costs (dial,
// accept, close both ends), against the same through net.Dialer in our
// own namespace; the ratio is what entering the pod adds.
func BenchmarkDial(b *testing.B) {
	n := benchNet(b, "amb-tun-bench")
	run := func(b *testing.B, ln net.Listener, dial func() (net.Conn, error)) {
		defer ln.Close()
		go closeEach(ln)
		for i := 0; i < b.N; i++ {
			c, err := dial()
			if err != nil {
				b.Fatal(err)
			}
			c.Close()
		}
	}
	b.Run("pod", func(b *testing.B) {
		ln, err := n.Listen(9000, ListenOptions{KeepAlive: -1})
		if err != nil {
			b.Fatal(err)
		}
		dst := netip.MustParseAddrPort("127.0.0.1:9000")
		run(b, ln, func() (net.Conn, error) { return n.DialLocal(context.Background(), netip.Addr{}, dst) })
	})
	b.Run("own", func(b *testing.B) {
		ln, err := (&net.ListenConfig{KeepAlive: -1}).Listen(context.Background(), "tcp4", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		d := net.Dialer{KeepAlive: -1}
		run(b, ln, func() (net.Conn, error) { return d.Dial("tcp4", ln.Addr().String()) })
	})
}

// BenchmarkDialTransparent: a dial from a client's address (the agent
// reaching the app as the client) with a source port of our own range
// ("own-port", DialLocalOwnPort: a plaintext client's connection)
// against the kernel's choice in the pod's ephemeral range
// ("kernel-port", DialLocal: an HBONE client's, and every dial before
// session 16). (The
// kernel cannot choose in our range: IP_LOCAL_PORT_RANGE only narrows
// the pod's.) The client address is
// one of lo's, so no redirection is needed for the replies; the sockets
// and system calls are those of a pod.
func BenchmarkDialTransparent(b *testing.B) {
	n := benchNet(b, "amb-tun-tbench")
	listenClosing(b, n, 9002)
	src, dst := netip.MustParseAddr("127.0.0.2"), netip.MustParseAddrPort("127.0.0.1:9002")
	for _, c := range []struct {
		name string
		dial func() (net.Conn, error)
	}{
		{"own-port", func() (net.Conn, error) { return n.DialLocalOwnPort(context.Background(), src, dst, nil) }},
		{"kernel-port", func() (net.Conn, error) { return n.DialLocal(context.Background(), src, dst) }},
	} {
		b.Run(c.name, func(b *testing.B) {
			for b.Loop() {
				conn, err := c.dial()
				if err != nil {
					b.Fatal(err)
				}
				conn.Close()
			}
		})
	}
}

// BenchmarkListen: what the port checks add to a listener (an enrollment
// makes three). "listen" is Listen with exclusiveListeners on (owned by
// ListenerUID: two setfsuid around socket(), no dump since the group is
// ours alone); "before" the socket as agents made it before session 10
// (the process's own uid), which is also Listen with the switch off at
// a CNI ADD (Fresh: no app runs yet, no dump); "dumped" the same plus
// the sock_diag dump Listen does after a bind in a root-owned group (the
// switch off at a live enrollment or re-adoption, an older agent's
// group). Each opens and closes one listener in a pod.
func BenchmarkListen(b *testing.B) {
	n := benchNet(b, "amb-tun-lbench")
	for _, c := range []struct {
		name string
		open func() (net.Listener, error)
	}{
		{"listen", func() (net.Listener, error) { return n.Listen(9001, ListenOptions{}) }},
		{"before", func() (net.Listener, error) { return n.listenAs(-1, 9001, n.mark, ListenOptions{}) }},
		{"dumped", func() (net.Listener, error) {
			ln, err := n.listenAs(-1, 9001, n.mark, ListenOptions{})
			if err == nil {
				_, err = n.Holders(9001)
			}
			return ln, err
		}},
	} {
		b.Run(c.name, func(b *testing.B) {
			for b.Loop() {
				ln, err := c.open()
				if err != nil {
					b.Fatal(err)
				}
				ln.Close()
			}
		})
	}
}

// benchNet is a fresh network namespace called name (loopback up) opened
// as a Net, both removed when b ends.
func benchNet(b testing.TB, name string) *Net {
	b.Helper()
	if os.Geteuid() != 0 {
		b.Skip("SKIPPED: needs root")
	}
	exec.Command("ip", "netns", "del", name).Run()
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		b.Fatalf("ip netns add: %v %s", err, out)
	}
	b.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	if out, err := exec.Command("ip", "-n", name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		b.Fatalf("lo up: %v %s", err, out)
	}
	f, err := os.Open("/var/run/netns/" + name)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	n, err := Open(f)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { n.Close() })
	return n
}

// listenClosing opens a listener on port in n whose connections are
// each accepted and closed at once, for dials that only need to connect;
// tb's cleanup closes it.
func listenClosing(tb testing.TB, n *Net, port uint16) net.Listener {
	tb.Helper()
	ln, err := n.Listen(port, ListenOptions{KeepAlive: -1})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { ln.Close() })
	go closeEach(ln)
	return ln
}

// closeEach accepts and closes ln's connections until ln is closed.
func closeEach(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		c.Close()
	}
}
