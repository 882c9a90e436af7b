package tunnel

import (
	"bytes"
	"errors"
	"io"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/tunnel/hbone"
	"github.com/ambit-mesh/ambit/tunnel/internal/panicpoint"
)

var errTestStreamPanic = errors.New("test: the stream's own code panics")

// TestHBONEStreamPanicCountedOnce: a panic hbone recovers on a goroutine
// that serves one stream alone (its drain, writing received bytes to
// the spliced app; OnResponse, the agent's callback, run on the pooled
// connection's read loop) is counted once: one
// failed_total{reason="internal_error"} with the connection's direction
// and identities, one error line with the stack, and, for a connection
// that was open, one close whose access-log line says
// reason=internal_error. Nothing else of the agent's books moves: no
// second failure (hbone_stream), no "unknown" series; the pooled
// connection goes on.
//
// Before: hbone told Config.OnPanic, which counted
// failed_total{direction="unknown"}; the drain's connection was then
// counted closed as if nothing had happened (its line without a
// reason), and OnResponse's panic closed the whole pooled connection
// and its stream was counted a second time, as hbone_stream.
//
// Real pods (root): A's app calls B's apps through A's 15001 and B's
// 15008; B's echo on 8080, and on 8081 an app that never reads.
func TestHBONEStreamPanicCountedOnce(t *testing.T) {
	testenv.RequireRoot(t)
	// Set before the agents start and cleared after they stop (cleanups
	// run last first): their goroutines read them.
	var at panicpoint.Point
	var clientSide atomic.Bool // the drain armed is A's (else B's)
	var inResponse atomic.Bool
	hook := func(s any) {
		if (s.(*hbone.Stream).Request == nil) == clientSide.Load() {
			at.Check(errTestStreamPanic)
		}
	}
	panicpoint.StreamHook.Store(&hook)
	t.Cleanup(func() { panicpoint.StreamHook.Store(nil); testHookResponse = nil })
	testHookResponse = func(*record, int) {
		buf := make([]byte, 16<<10)
		if bytes.Contains(buf[:runtime.Stack(buf, false)], []byte("hbone.(*Conn).readLoop")) && inResponse.CompareAndSwap(true, false) {
			panic(errTestStreamPanic)
		}
	}

	a, b, wa, wb, dir := meshedPair(t)
	// B answers after 50 ms: A hears it on its pooled connection's read
	// loop, its handler splicing by then.
	cfg := Config{Directory: dir, Certificates: testPeerCerts(t),
		Authorizer: slowVerdict{allow: true}, PoolIdleTimeout: time.Hour, HBONEIdleTimeout: time.Hour}
	pa, regA, logsA := newTestProxy(t, cfg)
	pb, regB, logsB := newTestProxy(t, cfg)
	sva := servePod(t, pa, a, wa, nil, 15001)
	servePod(t, pb, b, wb, nil, 15008)

	echoApp(t, b, 8080)
	// 8081 takes connections and never reads: what A's app sends waits
	// in B's stream, for a drain goroutine.
	var sink net.Listener
	b.Do(t, func() (err error) { sink, err = net.Listen("tcp", "[::]:8081"); return })
	t.Cleanup(func() { sink.Close() })
	go func() {
		for {
			c, err := sink.Accept()
			if err != nil {
				return
			}
			c.(*net.TCPConn).SetReadBuffer(4 << 10)
			t.Cleanup(func() { c.Close() })
		}
	}()

	dial := func(port uint16) *net.TCPConn {
		t.Helper()
		var c net.Conn
		a.Do(t, func() (err error) {
			c, err = net.DialTimeout("tcp", netip.AddrPortFrom(b.IP4, port).String(), 10*time.Second)
			return
		})
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(20 * time.Second))
		return c.(*net.TCPConn)
	}
	echo := func(c net.Conn) {
		t.Helper()
		io.WriteString(c, "ping\n")
		got := make([]byte, 5)
		if _, err := io.ReadFull(c, got); err != nil || string(got) != "ping\n" {
			t.Fatalf("echo: %q, %v", got, err)
		}
	}
	pooled := func() []*hbone.Conn {
		sva.pool.mu.Lock()
		defer sva.pool.mu.Unlock()
		var cs []*hbone.Conn
		for _, e := range sva.pool.m {
			for _, pc := range e.conns {
				cs = append(cs, pc.Conn)
			}
		}
		return cs
	}
	type books struct {
		failed, labelled, unknown, closed float64
		reasonLines, panicLines           int
	}
	read := func(reg *prometheus.Registry, logs *testenv.Buffer, dir string) books {
		var bk books
		m := func(name string, match map[string]string) float64 { return testenv.Metric(t, reg, name, match) }
		bk.failed = m("ambit_tunnel_connections_failed_total", nil)
		bk.labelled = m("ambit_tunnel_connections_failed_total", map[string]string{"direction": dir,
			"reason": "internal_error", "src_identity": idClient, "dst_identity": idServer})
		bk.unknown = m("ambit_tunnel_connections_failed_total", map[string]string{"direction": "unknown"})
		bk.closed = m("ambit_tunnel_connections_closed_total", map[string]string{"direction": dir})
		for _, l := range strings.Split(logs.String(), "\n") {
			if strings.Contains(l, `msg="connection complete"`) && strings.Contains(l, "reason=internal_error") {
				bk.reasonLines++
			}
			if strings.Contains(l, "level=ERROR") && strings.Contains(l, errTestStreamPanic.Error()) {
				bk.panicLines++
			}
		}
		return bk
	}

	// quiet waits until neither agent counts a connection active, and
	// returns what they count.
	quiet := func() float64 {
		return pollUntil(0, func() float64 {
			return testenv.Metric(t, regA, "ambit_tunnel_active_connections", nil) +
				testenv.Metric(t, regB, "ambit_tunnel_active_connections", nil)
		})
	}

	// A first connection pools A's HBONE connection to B.
	c := dial(8080)
	echo(c)
	c.Close()
	for _, n := range []struct {
		reg *prometheus.Registry
		dir string
	}{{regA, "outbound"}, {regB, "inbound"}} {
		if got := pollUntil(1, func() float64 {
			return testenv.Metric(t, n.reg, "ambit_tunnel_connections_closed_total", map[string]string{"direction": n.dir})
		}); got != 1 {
			t.Fatalf("the first connection's close on the %s side: %v", n.dir, got)
		}
	}
	first := pooled()
	if len(first) != 1 {
		t.Fatalf("%d pooled connections after the first connection, want 1", len(first))
	}

	for _, tc := range []struct {
		name     string
		reg      *prometheus.Registry
		logs     *testenv.Buffer
		dir      string
		open     bool // established when it panics: a close is counted too
		start    func()
		port     uint16
		flood    bool // A's app sends 16 MiB
		peerRegs *prometheus.Registry
	}{
		// A's stream writes B's echo to A's app, which does not read.
		{name: "A's drain", reg: regA, logs: logsA, dir: "outbound", open: true, port: 8080, flood: true, peerRegs: regB,
			start: func() { clientSide.Store(true); at.Arm("hbone.(*Stream).drain") }},
		// B's stream writes A's app's bytes to B's app, which does not
		// read.
		{name: "B's drain", reg: regB, logs: logsB, dir: "inbound", open: true, port: 8081, flood: true, peerRegs: regA,
			start: func() { clientSide.Store(false); at.Arm("hbone.(*Stream).drain") }},
		// A's OnResponse, on its pooled connection's read loop.
		{name: "A's OnResponse", reg: regA, logs: logsA, dir: "outbound", port: 8080, peerRegs: regB,
			start: func() { inResponse.Store(true) }},
	} {
		// The last connection's close counted (before the gauge goes
		// down) on both sides.
		if n := quiet(); n != 0 {
			t.Fatalf("before %s: active_connections %v with nothing open", tc.name, n)
		}
		before := read(tc.reg, tc.logs, tc.dir)
		peerFailed := testenv.Metric(t, tc.peerRegs, "ambit_tunnel_connections_failed_total", nil)
		c := dial(tc.port)
		tc.start()
		if tc.flood {
			c.SetReadBuffer(4 << 10)
			go func() {
				chunk := make([]byte, 64<<10)
				for i := 0; i < 256; i++ { // 16 MiB, past every window
					if _, err := c.Write(chunk); err != nil {
						return
					}
				}
			}()
		} else {
			io.WriteString(c, "ping\n")
		}
		if tc.flood && tc.dir == "outbound" {
			// A's app reads only once its stream's drain has run: before,
			// the stream's bytes go straight to the app's socket.
			if pollUntil(false, at.Armed) {
				t.Fatalf("%s: no drain within 10 s", tc.name)
			}
		}
		// The panic's reset reaches A's app (after what it had
		// received, for the drains). A flood's write may take the
		// reset's error first: its read then ends as at EOF.
		if _, err := io.Copy(io.Discard, c); !errors.Is(err, syscall.ECONNRESET) && (err != nil || !tc.flood) {
			t.Fatalf("%s: A's app read %v, want a reset", tc.name, err)
		}
		if at.Armed() || inResponse.Load() {
			t.Fatalf("%s: the armed place was never reached", tc.name)
		}
		want := before
		want.failed++
		want.labelled++
		want.panicLines++
		if tc.open {
			want.closed++
			want.reasonLines++
		}
		var got books
		deadline := time.Now().Add(10 * time.Second)
		for {
			got = read(tc.reg, tc.logs, tc.dir)
			if got == want || time.Now().After(deadline) {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		if got != want {
			t.Errorf("%s: books %+v, want %+v (one failure internal_error with its labels, one error line, a close for an open connection)\n%s",
				tc.name, got, want, tc.logs)
		}
		if n := testenv.Metric(t, tc.peerRegs, "ambit_tunnel_connections_failed_total", nil); n != peerFailed {
			t.Errorf("%s: the other agent counted %v failures, want %v as before", tc.name, n, peerFailed)
		}
		if n := quiet(); n != 0 {
			t.Errorf("%s: active_connections %v after the panicked connection, want 0", tc.name, n)
		}
		// The pooled connection goes on, and carries the next one.
		if now := pooled(); len(now) != 1 || now[0] != first[0] || !first[0].Usable() {
			t.Fatalf("%s: pooled %v, want the connection of before (%v) still there and open (its error: %v)", tc.name, now, first, first[0].Err())
		}
		c = dial(8080)
		echo(c)
		c.Close()
	}
}
