package podnet

import (
	"context"
	"io"
	"net"
	"net/netip"
	"os/exec"
	"testing"
	"time"
)

// TestTransparentDialSameTuple: a plaintext client's delivery whose
// drawn port would repeat the 4-tuple of a live delivery (the same
// client to the same app port) gets EADDRNOTAVAIL from connect and
// draws again; a drawn port whose 4-tuple is only in TIME_WAIT on our
// side is taken (the kernel reuses it: measured on 6.18, 40,000
// deliveries from one client to one app port in a few seconds drew
// 40,006 ports, none fell back to the kernel's choice). Both families,
// from addresses that are not loopback ones (the kernel's TIME_WAIT
// reuse for loopback differs).
func TestTransparentDialSameTuple(t *testing.T) {
	const name = "amb-tun-tuple"
	n := benchNet(t, name)
	for _, a := range []string{"10.77.0.1/24", "10.77.0.2/24", "fd77::1/64", "fd77::2/64"} {
		if out, err := exec.Command("ip", "-n", name, "addr", "add", a, "dev", "lo", "nodad").CombinedOutput(); err != nil {
			t.Fatalf("ip addr add %s: %v %s", a, err, out)
		}
	}
	ln, err := n.Listen(9005, ListenOptions{KeepAlive: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			// The client (our dial) closes first: its socket ends in
			// TIME_WAIT, as a delivery does when the client leaves first.
			go func() { io.Copy(io.Discard, c); c.Close() }()
		}
	}()
	t.Cleanup(func() { pickPort = transparentPort })
	for _, pair := range [][2]string{{"10.77.0.2", "10.77.0.1:9005"}, {"fd77::2", "[fd77::1]:9005"}} {
		src, dst := netip.MustParseAddr(pair[0]), netip.MustParseAddrPort(pair[1])
		var draws []uint16
		next := []uint16{20202}
		pickPort = func() uint16 {
			p := next[0]
			if len(next) > 1 {
				next = next[1:]
			}
			draws = append(draws, p)
			return p
		}
		dial := func() net.Conn {
			t.Helper()
			c, err := n.DialLocalOwnPort(context.Background(), src, dst, nil)
			if err != nil {
				t.Fatalf("%v: dial: %v", src, err)
			}
			return c
		}
		held := dial()
		next, draws = []uint16{20202, 20203}, nil
		c := dial()
		if p := uint16(c.LocalAddr().(*net.TCPAddr).Port); p != 20203 || len(draws) != 2 {
			t.Errorf("%v: with port 20202's tuple live: port %d after draws %v, want 20203 after [20202 20203]", src, p, draws)
		}
		c.Close()
		held.Close()
		// Until the app's FIN has come back, the socket is not in
		// TIME_WAIT yet.
		deadline := time.Now().Add(3 * time.Second)
		for {
			out, _ := exec.Command("ip", "netns", "exec", name, "ss", "-tanH", "state", "time-wait", "sport", "= :20202").Output()
			if len(out) > 0 {
				break
			}
			if time.Now().After(deadline) {
				// What the port's sockets are in instead says which end
				// did not close (FIN_WAIT2: the app's; none: a reset, or
				// another run's namespace under the same name).
				all, _ := exec.Command("ip", "netns", "exec", name, "ss", "-tanH", "sport", "= :20202").CombinedOutput()
				t.Fatalf("%v: no TIME_WAIT on port 20202 after closing; its sockets: %q", src, all)
			}
			time.Sleep(10 * time.Millisecond)
		}
		next, draws = []uint16{20202}, nil
		c = dial()
		if p := uint16(c.LocalAddr().(*net.TCPAddr).Port); p < transparentPortMin || p > transparentPortMax {
			t.Errorf("%v: with port 20202's tuple in TIME_WAIT: port %d, want one of our range", src, p)
		}
		t.Logf("%v: tuple in TIME_WAIT: port %d after draws %v", src, c.LocalAddr().(*net.TCPAddr).Port, draws)
		c.Close()
	}
}
