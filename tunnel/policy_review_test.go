package tunnel_test

// Data-path cases of the policy security review (session 9): the
// destination's labels changing under live connections, and a policy
// change that lands while a connection is still dialling the app.

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// liveEcho opens a connection to B:port through dial and checks it
// echoes: the connection is established and allowed.
func liveEcho(t *testing.T, dial func() (net.Conn, error)) net.Conn {
	t.Helper()
	c, err := dial()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	fmt.Fprintf(c, "echo\n")
	if err := echoes(c); err != nil {
		t.Fatalf("new connection does not echo: %v", err)
	}
	return c
}

func echoes(c net.Conn) error {
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte("ping")); err != nil {
		return err
	}
	_, err := io.ReadFull(c, make([]byte, 4))
	return err
}

// cut waits for c to be closed by the other end; it fails if c is still
// open after 10 s.
func cut(t *testing.T, what string, c net.Conn) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := c.Read(make([]byte, 1))
	if err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("%s: still open (read: %v)", what, err)
	}
}

// TestPolicyRelabelledPod: B is relabelled so that a DENY selects it.
// Its live connections (HBONE and plaintext) are closed and new ones
// refused; relabelled back, it admits again. Before, the tunnel judged a
// pod by the labels it was enrolled with, for its whole life.
func TestPolicyRelabelledPod(t *testing.T) {
	pm := newPolicyMesh(t)
	pm.apply(t, policyHead+"quarantine}\nspec:\n  selector: {matchLabels: {quarantine: \"true\"}}\n  action: DENY\n  rules: [{}]\n")
	hb := liveEcho(t, func() (net.Conn, error) { return pm.A.Dial(netip.AddrPortFrom(pm.B.Pod.IP4, 8080)) })
	pt := liveEcho(t, func() (net.Conn, error) {
		return pm.A.Net.Dial(t.Context(), netip.Addr{}, netip.AddrPortFrom(pm.B.Pod.IP4, 8080))
	})

	pm.B.Serving.SetLabels(map[string]string{"quarantine": "true"})
	cut(t, "live HBONE connection to the relabelled pod", hb)
	cut(t, "live plaintext connection to the relabelled pod", pt)
	if pm.reached(t, 8080) || pm.plaintextReached(t) {
		t.Fatal("new connection reached the quarantined pod")
	}
	if n := denials(t, pm.reg, "b/quarantine"); n < 4 {
		t.Errorf("denials of b/quarantine: %v, want at least 4", n)
	}

	pm.B.Serving.SetLabels(map[string]string{"quarantine": "false"})
	if !pm.reached(t, 8080) || !pm.plaintextReached(t) {
		t.Fatal("pod relabelled back: still refused")
	}
}

// TestPolicyChangeWhileDialingApp: the policy changes after a connection
// was authorized but before its app dial completes (B's first SYN to the
// app is dropped, so the dial takes the 1 s retransmission). The
// connection must not come up under the policy that now refuses it.
// Before, the re-check of live connections ran while it was not yet
// registered and it lived on.
func TestPolicyChangeWhileDialingApp(t *testing.T) {
	for _, mode := range []string{"hbone", "plaintext"} {
		t.Run(mode, func(t *testing.T) {
			pm := newPolicyMesh(t)
			go peerEcho(pm.B.Listen(t, "[::]:8082"))
			pm.B.Pod.Run(t, "nft", "add table inet review")
			pm.B.Pod.Run(t, "nft", "add chain inet review in { type filter hook input priority -300 ; }")
			pm.B.Pod.Run(t, "nft", "add rule inet review in tcp dport 8082 tcp flags & (syn|ack) == syn counter drop")

			dst := netip.AddrPortFrom(pm.B.Pod.IP4, 8082)
			var c net.Conn
			var err error
			if mode == "hbone" {
				c, err = pm.A.Dial(dst)
			} else {
				c, err = pm.A.Net.Dial(t.Context(), netip.Addr{}, dst)
			}
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			fmt.Fprintf(c, "who\n")

			// B's agent is now dialling the app: its SYN was dropped.
			counter := regexp.MustCompile(`packets (\d+)`)
			deadline := time.Now().Add(10 * time.Second)
			for {
				m := counter.FindStringSubmatch(pm.B.Pod.Run(t, "nft", "list chain inet review in"))
				if n, _ := strconv.Atoi(m[1]); n > 0 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("B's agent never dialled the app")
				}
				time.Sleep(5 * time.Millisecond)
			}
			pm.apply(t, policyHead+"no-8082}\nspec:\n  action: DENY\n  rules: [{to: {ports: [8082]}}]\n")
			pm.B.Pod.Run(t, "nft", "delete table inet review")

			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			line, err := bufio.NewReader(c).ReadString('\n')
			if err == nil || strings.TrimSpace(line) != "" {
				t.Fatalf("connection set up during the policy change came up under a DENY: read %q, %v", line, err)
			}
			if n := denials(t, pm.reg, "b/no-8082"); n < 1 {
				t.Errorf("denials of b/no-8082: %v", n)
			}
		})
	}
}
