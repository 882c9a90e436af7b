package tunnel_test

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"
)

// TestByteCounters: the bytes an app sends and receives through the
// tunnel are counted on both sides, whatever path they took — the app's
// first bytes travel inside the CONNECT (optimistic data), the rest
// through the spliced stream. (The first bytes used to be left out: a
// client that sent its whole request at once showed 0 bytes sent.)
func TestByteCounters(t *testing.T) {
	m := newMesh(t)
	payload := bytes.Repeat([]byte("0123456789"), 300)
	msg := append([]byte("echo\n"), payload...)
	// Eight apps at a time, so that the agent often finds the request
	// already there when it takes the app's first bytes.
	const n = 40
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range n / 8 {
				c, err := m.A.Dial(netip.AddrPortFrom(m.B.Pod.IP4, 8080))
				if err != nil {
					errs <- err
					return
				}
				if _, err := c.Write(msg); err != nil {
					errs <- err
				}
				c.(*net.TCPConn).CloseWrite()
				c.SetReadDeadline(time.Now().Add(10 * time.Second))
				got, err := io.ReadAll(c)
				c.Close()
				if err != nil || !bytes.Equal(got, payload) {
					errs <- fmt.Errorf("app %d: echo of %d bytes, %v", g, len(got), err)
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	ids := map[string]string{"src_identity": m.A.Workload.Identity, "dst_identity": m.B.Workload.Identity}
	with := func(dir string) map[string]string {
		l := map[string]string{"direction": dir, "mode": "hbone"}
		for k, v := range ids {
			l[k] = v
		}
		return l
	}
	// A's apps sent msg and received the payload; B's app the reverse.
	waitMetric(t, m.A, "ambit_tunnel_sent_bytes_total", with("outbound"), float64(n*len(msg)))
	waitMetric(t, m.A, "ambit_tunnel_received_bytes_total", with("outbound"), float64(n*len(payload)))
	waitMetric(t, m.B, "ambit_tunnel_received_bytes_total", with("inbound"), float64(n*len(msg)))
	waitMetric(t, m.B, "ambit_tunnel_sent_bytes_total", with("inbound"), float64(n*len(payload)))
}
