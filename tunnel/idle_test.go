package tunnel_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/tunnel"
	"github.com/ambit-mesh/ambit/tunnel/hbone"
	"github.com/ambit-mesh/ambit/tunnel/internal/meshtest"
)

// TestHBONEIdleClose: the server side closes an inbound HBONE connection
// that has had no stream open for HBONEIdleTimeout, gracefully (the
// drain's two GOAWAYs around a PING, then a clean end), and leaves alone
// one whose stream stays open, however quiet the stream, until its
// stream ends and the timeout passes after that. Before, only the
// client closed idle connections (after 5 min): a peer that did not was
// kept for ever.
func TestHBONEIdleClose(t *testing.T) {
	testenv.RequireRoot(t)
	const idle = 500 * time.Millisecond
	m := meshtest.New(t, meshtest.Options{Config: tunnel.Config{HBONEIdleTimeout: idle}})
	go peerEcho(m.B.Listen(t, "[::]:8080"))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cert, err := m.Certs.Certificate(ctx, m.A.Workload.Identity)
	if err != nil {
		t.Fatal(err)
	}
	tlsCfg := &tls.Config{MinVersion: tls.VersionTLS13, NextProtos: []string{"h2"}, InsecureSkipVerify: true,
		Certificates: []tls.Certificate{*cert}}
	hb := netip.AddrPortFrom(m.B.Pod.IP4, 15008)
	idleClosed := func() float64 { return m.B.Metric(t, "ambit_tunnel_hbone_idle_closed_total", nil) }

	// A busy connection: one stream open, and quiet, across three
	// timeouts.
	raw, err := m.A.Net.Dial(ctx, netip.Addr{}, hb)
	if err != nil {
		t.Fatal(err)
	}
	busy, err := hbone.Client(ctx, raw, tlsCfg, hbone.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	s, err := busy.OpenStream(netip.AddrPortFrom(m.B.Pod.IP4, 8080).String(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if st, _, err := s.Response(ctx); err != nil || st != 200 {
		t.Fatalf("CONNECT: %d, %v", st, err)
	}
	if _, err := io.WriteString(s, "echo\n"); err != nil {
		t.Fatal(err)
	}

	// An idle connection, in raw HTTP/2 to see its frames: it never
	// opens a stream.
	raw2, err := m.A.Net.Dial(ctx, netip.Addr{}, hb)
	if err != nil {
		t.Fatal(err)
	}
	tc := tls.Client(raw2, tlsCfg)
	defer tc.Close()
	if err := tc.HandshakeContext(ctx); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	tc.SetDeadline(t0.Add(idle + 5*time.Second))
	frames, err := idleHTTP2Peer(tc)
	took := time.Since(t0)
	t.Logf("idle connection: %s; ended after %v: %v", strings.Join(frames, ", "), took.Round(time.Millisecond), err)
	if !errors.Is(err, io.EOF) {
		t.Errorf("idle connection ended with %v, want a clean end (EOF)", err)
	}
	// SETTINGS and its ACK come first, in either order. The final
	// GOAWAY is queued just before hbone's Shutdown closes (no stream
	// to wait for) and may not make it out: the first one and the PING
	// already told the client to open no more streams.
	want := []string{"GOAWAY last=2147483647 NO_ERROR", "PING"}
	if len(frames) < 4 || !slices.Equal(frames[2:4], want) ||
		len(frames) > 5 || len(frames) == 5 && frames[4] != "GOAWAY last=0 NO_ERROR" {
		t.Errorf("idle connection got %v, want SETTINGS, its ACK, then GOAWAY (all streams) NO_ERROR, PING, (GOAWAY last 0 NO_ERROR), end", frames)
	}
	if took < idle*9/10 || took > idle+3*time.Second {
		t.Errorf("idle connection closed after %v, want about %v", took, idle)
	}
	if n := idleClosed(); n != 1 {
		t.Errorf("idle_closed_total = %v, want 1", n)
	}

	// The busy connection is still there, its stream works.
	time.Sleep(time.Until(t0.Add(3 * idle)))
	// (A stream has no deadline: closing the connection ends a read
	// that hangs.)
	hang := time.AfterFunc(5*time.Second, func() { busy.Close() })
	if _, err := io.WriteString(s, "still here\n"); err != nil {
		t.Fatalf("busy connection, %v after its stream opened: %v", 3*idle, err)
	}
	line, err := bufio.NewReader(s).ReadString('\n')
	if !hang.Stop() || err != nil || line != "still here\n" {
		t.Fatalf("busy connection's stream answered %q, %v", line, err)
	}
	if !busy.Usable() || idleClosed() != 1 {
		t.Fatalf("busy connection usable %v, idle_closed_total %v: want it kept", busy.Usable(), idleClosed())
	}
	// Its stream ends: the connection is idle from now on, and closed
	// a timeout later.
	s.CloseWrite()
	io.Copy(io.Discard, s)
	s.Close()
	t1 := time.Now()
	select {
	case <-busy.Done():
	case <-time.After(idle + 5*time.Second):
		t.Fatalf("connection still open %v after its last stream ended", time.Since(t1))
	}
	took = time.Since(t1)
	t.Logf("busy connection closed %v after its last stream ended: %v", took.Round(time.Millisecond), busy.Err())
	if took < idle*9/10 {
		t.Errorf("closed %v after its last stream ended, want %v", took, idle)
	}
	if !errors.Is(busy.Err(), hbone.ErrConnClosed) {
		t.Errorf("busy connection ended with %v, want a clean close", busy.Err())
	}
	waitMetric(t, m.B, "ambit_tunnel_hbone_idle_closed_total", nil, 2)
}

// idleHTTP2Peer is the client side of an HTTP/2 connection that opens no
// stream: it sends the preface and its SETTINGS, acknowledges the
// server's SETTINGS and PINGs, and returns the frames it got (type, and
// GOAWAY's last stream and code) until the connection ends, and why.
func idleHTTP2Peer(c *tls.Conn) ([]string, error) {
	const (
		fSettings = 0x4
		fPing     = 0x6
		fGoAway   = 0x7
		flagAck   = 0x1
	)
	frame := func(typ, flags byte, payload []byte) []byte {
		b := []byte{byte(len(payload) >> 16), byte(len(payload) >> 8), byte(len(payload)), typ, flags, 0, 0, 0, 0}
		return append(b, payload...)
	}
	if _, err := c.Write(append([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), frame(fSettings, 0, nil)...)); err != nil {
		return nil, err
	}
	var got []string
	var h [9]byte
	for {
		if _, err := io.ReadFull(c, h[:]); err != nil {
			return got, err
		}
		p := make([]byte, int(h[0])<<16|int(h[1])<<8|int(h[2]))
		if _, err := io.ReadFull(c, p); err != nil {
			return got, err
		}
		switch typ, flags := h[3], h[4]; {
		case typ == fSettings && flags&flagAck != 0:
			got = append(got, "SETTINGS ACK")
		case typ == fSettings:
			got = append(got, "SETTINGS")
			if _, err := c.Write(frame(fSettings, flagAck, nil)); err != nil {
				return got, err
			}
		case typ == fPing && flags&flagAck == 0:
			got = append(got, "PING")
			if _, err := c.Write(frame(fPing, flagAck, p)); err != nil {
				return got, err
			}
		case typ == fGoAway && len(p) >= 8:
			code := "NO_ERROR"
			if c := binary.BigEndian.Uint32(p[4:]); c != 0 {
				code = "code " + strconv.Itoa(int(c))
			}
			got = append(got, "GOAWAY last="+strconv.Itoa(int(binary.BigEndian.Uint32(p)&(1<<31-1)))+" "+code)
		case typ == 0x8: // WINDOW_UPDATE (the server's connection window)
		default:
			got = append(got, "type "+strconv.Itoa(int(typ)))
		}
	}
}
