package istio

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"testing"
	"time"

	istiohbone "istio.io/istio/pkg/hbone"

	"github.com/ambit-mesh/ambit/internal/testca"
	"github.com/ambit-mesh/ambit/tunnel/hbone"
)

// TestIstioDialerAnswersAmbitServerPings: Ambit's HBONE server pings
// idle connections (keepalive, both sides since session 20); Istio's Go
// dialer (x/net's HTTP/2 client, which never pings by itself) answers
// them, so an idle tunnel through it lives across many of the server's
// PINGs and still carries bytes after. In process, on loopback: no
// netns needed.
func TestIstioDialerAnswersAmbitServerPings(t *testing.T) {
	quiet()
	ca, err := testca.New("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	cert, err := ca.Issue(ca.ID("b", "server"), testca.IssueOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	srv := make(chan *hbone.Conn, 1)
	go func() {
		raw, err := ln.Accept()
		if err != nil {
			return
		}
		scfg := &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{*cert}, NextProtos: []string{"h2"}}
		hc, err := hbone.Server(context.Background(), raw, scfg,
			hbone.Config{PingInterval: 50 * time.Millisecond, PingTimeout: 10 * time.Second}, nil,
			func(s *hbone.Stream) {
				s.Respond(200, nil)
				io.Copy(s, s)
				s.CloseWrite()
			})
		if err != nil {
			t.Error(err)
			close(srv)
			return
		}
		srv <- hc
	}()
	d := istiohbone.NewDialer(istiohbone.Config{ProxyAddress: ln.Addr().String(),
		TLS: &tls.Config{MinVersion: tls.VersionTLS13, InsecureSkipVerify: true}})
	c, err := d.DialContext(context.Background(), "tcp", "10.0.0.1:80")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	echo := func(msg string) {
		t.Helper()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.WriteString(c, msg); err != nil {
			t.Fatal(err)
		}
		b := make([]byte, len(msg))
		if _, err := io.ReadFull(c, b); err != nil || string(b) != msg {
			t.Fatalf("echo through Istio's dialer: %q %v", b, err)
		}
		c.SetDeadline(time.Time{})
	}
	echo("hello")
	hc := <-srv
	if hc == nil {
		t.FailNow()
	}
	defer hc.Close()
	// The server sends a PING only once its last one was answered: five
	// sent means four answered. PingTimeout is long so that a starved
	// scheduler cannot close the live connection (200 ms could).
	const pings = 5
	for end := time.Now().Add(20 * time.Second); hc.KeepalivePings() < pings; {
		select {
		case <-hc.Done():
			t.Fatalf("Ambit's server closed Istio's idle connection after %d PINGs: %v", hc.KeepalivePings(), hc.Err())
		case <-time.After(5 * time.Millisecond):
		}
		if time.Now().After(end) {
			t.Fatalf("Ambit's server sent %d PINGs in 20 s on an idle connection, want %d", hc.KeepalivePings(), pings)
		}
	}
	echo("still here")
	if !hc.Usable() {
		t.Fatalf("after %d PINGs the server's connection is not usable: %v", hc.KeepalivePings(), hc.Err())
	}
}
