package hbone

import (
	"bytes"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// silentConn answers the preface with SETTINGS and then never sends
// another byte (a peer that hung, or a black-holed path).
type silentConn struct {
	fuzzConn
	once   sync.Once
	closed chan struct{}
}

func (c *silentConn) Read(p []byte) (int, error) {
	if c.r.Len() > 0 {
		return c.r.Read(p)
	}
	<-c.closed
	return 0, io.EOF
}

func (c *silentConn) Close() error {
	c.once.Do(func() { close(c.closed) })
	return nil
}

var _ net.Conn = (*silentConn)(nil)

// TestKeepaliveClosesDeadPeer: a client pings a connection that went
// quiet and closes it when no answer comes within the timeout.
func TestKeepaliveClosesDeadPeer(t *testing.T) {
	sc := &silentConn{fuzzConn: fuzzConn{r: bytes.NewReader(appendSettings(nil))}, closed: make(chan struct{})}
	c, err := NewClientConn(sc, nil, Config{PingInterval: 50 * time.Millisecond, PingTimeout: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("dead peer not detected")
	}
	if err := c.Err(); err == nil || !strings.Contains(err.Error(), "keepalive") {
		t.Errorf("closed with %v, want a keepalive timeout", err)
	}
}

// TestKeepaliveKeepsLivePeer: a peer that answers PINGs keeps the
// connection, however long it stays idle. The client's keepalive is the
// subject; the server's is off: at these intervals it closed the
// connection on a 90 ms scheduling stall of the client under load
// (serverkeepalive_test.go covers it).
func TestKeepaliveKeepsLivePeer(t *testing.T) {
	c, _ := serveSplitCfg(t, Config{PingInterval: 20 * time.Millisecond, PingTimeout: 100 * time.Millisecond}, Config{PingInterval: -1}, echoHandler)
	time.Sleep(500 * time.Millisecond)
	if !c.Usable() {
		t.Fatalf("idle but live connection closed: %v", c.Err())
	}
}
