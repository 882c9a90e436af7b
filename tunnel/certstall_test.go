package tunnel_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"
)

// TestHandshakeCertStallFloodBounded: a flood that answers our flight
// with a certificate that verifies (a pod's own: every 15008 shows it
// to whoever connects, and its key is not needed to send it) and stalls
// before its CertificateVerify is cut back to the pod's limit a second
// after it stalls, like a stall anywhere else in the handshake. It used
// to count as ours to check for as long as it was pending
// (VerifyPeerCertificate had run), so the pod's limit never evicted it
// and one pod's flood held the agent's shared cap (4,096) for the
// handshake timeout (10 s).
func TestHandshakeCertStallFloodBounded(t *testing.T) {
	m := newMesh(t)
	const N = 400
	hb := netip.AddrPortFrom(m.B.Pod.IP4, 15008)
	dial := func() net.Conn {
		t.Helper()
		c, err := m.A.Net.Dial(context.Background(), netip.Addr{}, hb)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}

	// B's own certificate chain, as any client of its 15008 gets it.
	var stolen [][]byte
	probe := tls.Client(dial(), &tls.Config{MinVersion: tls.VersionTLS13, NextProtos: []string{"h2"}, InsecureSkipVerify: true,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			stolen = raw
			return nil
		}})
	probe.SetDeadline(time.Now().Add(10 * time.Second))
	probe.Handshake()
	probe.Close()
	if len(stolen) == 0 {
		t.Fatal("no certificate from B's 15008")
	}
	// Any key: the signature that would need the right one never leaves.
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	cert := tls.Certificate{Certificate: stolen, PrivateKey: key}

	flood := make([]*certStall, 0, N)
	t.Cleanup(func() {
		for _, c := range flood {
			c.Conn.Close()
		}
	})
	var wg sync.WaitGroup
	t0 := time.Now()
	for i := 0; i < N; i++ {
		c := &certStall{Conn: dial()}
		flood = append(flood, c)
		c.SetDeadline(time.Now().Add(20 * time.Second))
		tc := tls.Client(c, &tls.Config{MinVersion: tls.VersionTLS13, NextProtos: []string{"h2"}, InsecureSkipVerify: true,
			Certificates: []tls.Certificate{cert}})
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Returns once the client's flight is "sent": the client
			// does not wait for the server in TLS 1.3.
			tc.Handshake()
		}()
	}
	wg.Wait()
	for i, c := range flood {
		if !c.stalled() {
			t.Fatalf("flood connection %d never got to send its certificate", i)
		}
	}
	// Arrivals past the limit may already have cut some (a slow flood,
	// under -race, takes over a second).
	pFlood := m.B.Metric(t, "ambit_tunnel_pending_handshakes", nil)
	tFlood := time.Since(t0)
	time.Sleep(time.Second)
	// Arrivals every 100 ms until the pod is back to its limit, well
	// within the handshake timeout (10 s), which would end them anyway.
	t1 := time.Now()
	p := pFlood
	for p > 256 && time.Since(t1) < 5*time.Second {
		poke := dial()
		poke.Close()
		time.Sleep(100 * time.Millisecond)
		p = m.B.Metric(t, "ambit_tunnel_pending_handshakes", nil)
	}
	ev := m.B.Metric(t, "ambit_tunnel_handshakes_evicted_total", map[string]string{"limit": "pod"})
	t.Logf("%d handshakes stalled after a verified certificate in %v (%v pending then): %v evicted, the last in %v of arrivals, %v left pending",
		N, tFlood.Round(time.Millisecond), pFlood, ev, time.Since(t1).Round(time.Millisecond), p)
	if ev < N-256 {
		t.Errorf("evicted handshakes = %v, want at least %d (all but the pod's limit)", ev, N-256)
	}
	if p > 256 {
		t.Errorf("pending handshakes = %v, want at most 256", p)
	}
}

// certStall is a TLS 1.3 client's socket that sends its second flight
// only up to its Certificate (the first encrypted record), then nothing:
// no CertificateVerify, no Finished.
type certStall struct {
	net.Conn
	mu     sync.Mutex
	writes int
	cut    bool
}

func (c *certStall) Write(b []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cut {
		return len(b), nil
	}
	if c.writes++; c.writes == 1 {
		return c.Conn.Write(b) // the ClientHello
	}
	// Records: type, version (2), length (2). Through the first
	// application_data one (23): the encrypted Certificate.
	for off := 0; off+5 <= len(b); {
		end := off + 5 + (int(b[off+3])<<8 | int(b[off+4]))
		if b[off] == 23 {
			c.cut = true
			if _, err := c.Conn.Write(b[:end]); err != nil {
				return 0, err
			}
			return len(b), nil
		}
		off = end
	}
	return c.Conn.Write(b)
}

func (c *certStall) stalled() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cut
}
