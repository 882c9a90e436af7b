package podnet

import (
	"context"
	"net"
	"net/netip"
	"testing"
)

// TestTransparentDialPorts: a dial from a plaintext client's address
// (DialLocalOwnPort) takes its source port from our range (below the clients' own ephemeral ranges,
// see transparentPortMin), another when the one drawn is taken, and
// the kernel's choice in the pod's range when every draw is taken: a
// dial never fails for our choice.
func TestTransparentDialPorts(t *testing.T) {
	n := benchNet(t, "amb-tun-tport")
	listenClosing(t, n, 9003)
	// An app's listener on every address of the pod holds its port
	// for any bind, the client's address included.
	app, err := n.Listen(20000, ListenOptions{KeepAlive: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer app.Close()
	src, dst := netip.MustParseAddr("127.0.0.2"), netip.MustParseAddrPort("127.0.0.1:9003")
	var avoid func(uint16) bool
	dial := func() uint16 {
		t.Helper()
		c, err := n.DialLocalOwnPort(context.Background(), src, dst, avoid)
		if err != nil {
			t.Fatalf("dial from %v: %v", src, err)
		}
		defer c.Close()
		local := c.LocalAddr().(*net.TCPAddr).AddrPort()
		if local.Addr().Unmap() != src {
			t.Fatalf("dial from %v: bound to %v", src, local)
		}
		return local.Port()
	}
	for i := 0; i < 50; i++ {
		if p := dial(); p < transparentPortMin || p > transparentPortMax {
			t.Fatalf("dial %d from the client's address used port %d, want one in [%d, %d]", i, p, transparentPortMin, transparentPortMax)
		}
	}
	// DialLocal (an HBONE client's) keeps the kernel's choice.
	c, err := n.DialLocal(context.Background(), src, dst)
	if err != nil {
		t.Fatal(err)
	}
	if p := c.LocalAddr().(*net.TCPAddr).Port; p < 32768 {
		t.Errorf("DialLocal from the client's address used port %d, want the kernel's choice in the pod's range (32768 and up)", p)
	}
	c.Close()
	draws := 0
	t.Cleanup(func() { pickPort = transparentPort })
	pickPort = func() uint16 {
		draws++
		if draws == 1 {
			return 20000
		}
		return 20001
	}
	if p := dial(); p != 20001 || draws != 2 {
		t.Errorf("with the first draw taken by an app: port %d after %d draws, want 20001 after 2", p, draws)
	}
	draws = 0
	pickPort = func() uint16 { draws++; return 20000 }
	if p := dial(); p < 32768 || draws != transparentTries {
		t.Errorf("with every draw taken: port %d after %d draws, want the kernel's choice in the pod's range (32768 and up) after %d", p, draws, transparentTries)
	}
	// A port the caller avoids (an app port of the pod, not listening
	// now: a restarting container) is never taken, though free.
	draws = 0
	pickPort = func() uint16 {
		draws++
		if draws == 1 {
			return 20002
		}
		return 20003
	}
	avoid = func(p uint16) bool { return p == 20002 }
	if p := dial(); p != 20003 || draws != 2 {
		t.Errorf("with the first draw an avoided port: port %d after %d draws, want 20003 after 2", p, draws)
	}
}
