package hbone

import (
	"encoding/binary"
	"math"
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
			c, srv, frames := rawServerCfg(t, cfg)
			first := nextPing(t, c, frames)
			// A live peer answering late: ten ticks after the PING.
			time.Sleep(10 * cfg.PingInterval)
			if _, err := srv.Write(appendFrame(nil, framePing, flagAck, 0, first[:])); err != nil {
				t.Fatalf("answering the PING: %v (the client closed: %v)", err, c.Err())
			}
			// Answered, the client pings again at its next quiet tick:
			// the connection outlived the wait.
			second := nextPing(t, c, frames)
			if binary.BigEndian.Uint64(second[:]) <= binary.BigEndian.Uint64(first[:]) {
				t.Fatalf("second PING %x not after the first %x", second, first)
			}
		})
	}
}

// nextPing is the payload of the next PING the client sends; the
// connection's closing fails the test.
func nextPing(t *testing.T, c *Conn, frames <-chan rawFrame) [8]byte {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case f, ok := <-frames:
			if !ok {
				t.Fatalf("the connection ended before its PING: %v", c.Err())
			}
			if f.h.Type == framePing && f.h.Flags&flagAck == 0 && len(f.p) == 8 {
				return [8]byte(f.p)
			}
		case <-c.Done():
			t.Fatalf("the client closed the connection: %v", c.Err())
		case <-timeout:
			t.Fatal("no PING from the client")
		}
	}
}
