package tunnel

import (
	"io"
	"net"
	"net/netip"
	"regexp"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/tunnel/internal/podtest"
)

// gateVerdict allows everything; its first call waits until open is
// closed.
type gateVerdict struct {
	first chan struct{} // closed by the first call
	open  chan struct{}
}

func (g *gateVerdict) Authorize(ConnInfo) Verdict {
	select {
	case <-g.first:
	default:
		close(g.first)
		<-g.open
	}
	return Verdict{Allow: true, Reason: "the test allows all"}
}

// TestDurationCountsAcceptQueue: a connection's duration (its
// access-log line) runs from its client's connect, not from the agent's
// handler: time spent in the listener's accept queue counts. B's 15006
// takes one connection at a time not yet established (MaxPendingConns
// 1); the first waits on the policy for 1 s, holding that slot, so the
// second waits in the kernel's accept queue meanwhile, then is served
// at once. Its line says at least that second.
//
// Before: the duration started in the handler, after the wait: the
// second connection's line said a few milliseconds.
func TestDurationCountsAcceptQueue(t *testing.T) {
	testenv.RequireRoot(t)
	const hold = time.Second
	a, b := podtest.Pair(t)
	podtest.Redirect(t, b)
	gate := &gateVerdict{first: make(chan struct{}), open: make(chan struct{})}
	wb := Workload{Namespace: "b", Name: "server-pod", IPs: []netip.Addr{b.IP4, b.IP6}, Identity: idServer, Meshed: true}
	pb, _, logs := newTestProxy(t, Config{Directory: mapDirectory{b.IP4: wb}, Certificates: testPeerCerts(t),
		Authorizer: gate, MaxPendingConns: 1})
	servePod(t, pb, b, wb, nil, 15006)
	echoApp(t, b, 8080)

	dial := func() net.Conn {
		t.Helper()
		var c net.Conn
		a.Do(t, func() (err error) {
			c, err = net.DialTimeout("tcp", netip.AddrPortFrom(b.IP4, 8080).String(), 10*time.Second)
			return
		})
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(20 * time.Second))
		return c
	}
	first := dial()
	select {
	case <-gate.first:
	case <-time.After(10 * time.Second):
		t.Fatal("the first connection never reached the policy")
	}
	// Connected (the kernel's handshake) while the only slot is taken.
	second := dial()
	connected := time.Now()
	time.Sleep(hold)
	close(gate.open)
	for _, c := range []net.Conn{first, second} {
		io.WriteString(c, "ping\n")
		got := make([]byte, 5)
		if _, err := io.ReadFull(c, got); err != nil || string(got) != "ping\n" {
			t.Fatalf("echo: %q, %v", got, err)
		}
		c.Close()
	}
	took := time.Since(connected)
	re := regexp.MustCompile(`msg="connection complete".* src=` + regexp.QuoteMeta(second.LocalAddr().String()) + ` .*duration=(\S+)`)
	var m []string
	for deadline := time.Now().Add(10 * time.Second); m == nil && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		m = re.FindStringSubmatch(logs.String())
	}
	if m == nil {
		t.Fatalf("no access-log line for the second connection (%v):\n%s", second.LocalAddr(), logs)
	}
	d, err := time.ParseDuration(m[1])
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("the second connection: duration %v, %v from its connect to its line's read", d, took)
	// The kernel's clock for it runs in jiffies: up to 10 ms short.
	if d < hold-10*time.Millisecond || d > took+10*time.Millisecond {
		t.Errorf("the second connection's duration %v, want its time since connect: at least the %v it waited for an accept slot, at most %v", d, hold, took)
	}
}

// BenchmarkConnStart is what connStart costs a connection: one
// getsockopt(TCP_INFO) on an accepted socket.
func BenchmarkConnStart(b *testing.B) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	ac, err := ln.Accept()
	if err != nil {
		b.Fatal(err)
	}
	defer ac.Close()
	tc := ac.(*net.TCPConn)
	b.ReportAllocs()
	for b.Loop() {
		connStart(tc, time.Now())
	}
}
