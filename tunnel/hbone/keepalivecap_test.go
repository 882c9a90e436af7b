package hbone

import (
	"encoding/binary"
	"io"
	"math"
	"net"
	"testing"
	"time"
)

// TestKeepaliveHugeTimeoutWaitsForTheAnswer: a PingTimeout too large for
// the wait's cap (10 × PingTimeout) to be counted in a Duration leaves
// the cap at the longest one, not negative. The product overflowed for
// a PingTimeout past ~29 years (math.MaxInt64 gave -10 ns), and the
// connection was closed at the first tick after its PING, a late answer
// or not, where before the cap it was never closed.
func TestKeepaliveHugeTimeoutWaitsForTheAnswer(t *testing.T) {
	for _, timeout := range []time.Duration{math.MaxInt64, 1 << 62, math.MaxInt64/maxPingWaitFactor + 1} {
		t.Run(timeout.String(), func(t *testing.T) {
			cfg := Config{PingInterval: 20 * time.Millisecond, PingTimeout: timeout}
			cli, srv := net.Pipe()
			t.Cleanup(func() { srv.Close() })
			// The server, played by hand: it reads every frame and
			// reports the PINGs (their payloads).
			pings := make(chan [8]byte, 16)
			go func() {
				defer close(pings)
				pre := make([]byte, len(clientPreface))
				if _, err := io.ReadFull(srv, pre); err != nil {
					return
				}
				var hb [frameHeaderLen]byte
				for {
					if _, err := io.ReadFull(srv, hb[:]); err != nil {
						return
					}
					h := parseFrameHeader(hb[:])
					p := make([]byte, h.Length)
					if _, err := io.ReadFull(srv, p); err != nil {
						return
					}
					if h.Type == framePing && h.Flags&flagAck == 0 && len(p) == 8 {
						pings <- [8]byte(p)
					}
				}
			}()
			c, err := NewClientConn(cli, nil, cfg)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })
			if _, err := srv.Write(appendSettings(nil)); err != nil {
				t.Fatal(err)
			}
			first := nextPing(t, c, pings)
			// A live peer answering late: ten ticks after the PING.
			time.Sleep(10 * cfg.PingInterval)
			if _, err := srv.Write(appendFrame(nil, framePing, flagAck, 0, first[:])); err != nil {
				t.Fatalf("answering the PING: %v (the client closed: %v)", err, c.Err())
			}
			// Answered, the client pings again at its next quiet tick:
			// the connection outlived the wait.
			second := nextPing(t, c, pings)
			if binary.BigEndian.Uint64(second[:]) <= binary.BigEndian.Uint64(first[:]) {
				t.Fatalf("second PING %x not after the first %x", second, first)
			}
		})
	}
}

// nextPing is the payload of the next PING the client sends; the
// connection's closing fails the test.
func nextPing(t *testing.T, c *Conn, pings <-chan [8]byte) [8]byte {
	t.Helper()
	select {
	case p, ok := <-pings:
		if !ok {
			t.Fatalf("the connection ended before its PING: %v", c.Err())
		}
		return p
	case <-c.Done():
		t.Fatalf("the client closed the connection: %v", c.Err())
	case <-time.After(10 * time.Second):
		t.Fatal("no PING from the client")
	}
	return [8]byte{}
}
