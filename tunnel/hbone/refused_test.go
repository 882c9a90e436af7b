package hbone

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2/hpack"
)

// waitReleased waits until c holds no stream: the refused stream's last
// frame (the server's RST_STREAM, or its END_STREAM) has been handled.
func waitReleased(t *testing.T, c *Conn) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for c.ActiveStreams() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d streams still active after the refusal", c.ActiveStreams())
		}
		time.Sleep(time.Millisecond)
	}
}

// wantRefused checks that err is the refusal, status 503.
func wantRefused(t *testing.T, what string, err error) {
	t.Helper()
	var se StatusError
	if !errors.As(err, &se) || se.Status != 503 {
		t.Errorf("%s: %v, want the refusal (StatusError 503)", what, err)
	}
}

// TestRefusedStreamIsAnError: a CONNECT answered 503 (our server's answer
// when it cannot reach the app) is an error for the client stream's
// reader and writer, whatever frames follow the response: a clean EOF
// would tell the app the server accepted and closed. Our server sends
// HEADERS(503, END_STREAM) then RST_STREAM(NO_ERROR) (RFC 9113 §8.1: it
// will not read the request); when the client had already half-closed,
// no RST_STREAM follows. Before the fix the END_STREAM made the stream
// look half-closed normally, and the NO_ERROR reset found it "complete":
// Read returned io.EOF in both cases, every time, and Splice reset the
// app only because it looked at the status itself.
func TestRefusedStreamIsAnError(t *testing.T) {
	gate := make(chan struct{})
	c, _ := serve(t, Config{}, func(s *Stream) {
		if s.Request.Authority == "after-fin:1" {
			io.ReadAll(s) // the client's END_STREAM first
		}
		if s.Request.Authority == "gated:1" {
			<-gate
		}
		s.Respond(503, nil)
	})
	t.Run("read and write after 503 and RST_STREAM(NO_ERROR)", func(t *testing.T) {
		for i := 0; i < 20; i++ {
			s, err := c.OpenStream("refused:1", nil)
			if err != nil {
				t.Fatal(err)
			}
			if st, _, err := s.Response(context.Background()); st != 503 || err != nil {
				t.Fatalf("response %d %v, want 503", st, err)
			}
			waitReleased(t, c)
			b, err := io.ReadAll(s)
			if len(b) != 0 {
				t.Errorf("read %q from a refused stream", b)
			}
			wantRefused(t, "read", err)
			_, err = s.Write([]byte("request"))
			wantRefused(t, "write", err)
			if err := s.CloseWrite(); err != nil {
				t.Errorf("CloseWrite of a refused stream: %v, want nil (nothing to end)", err)
			}
			s.Close()
		}
	})
	t.Run("read after 503 alone", func(t *testing.T) {
		s, err := c.OpenStream("after-fin:1", nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		if st, _, err := s.Response(context.Background()); st != 503 || err != nil {
			t.Fatalf("response %d %v, want 503", st, err)
		}
		waitReleased(t, c)
		_, err = io.ReadAll(s)
		wantRefused(t, "read", err)
	})
	// The tunnel's order: Splice once the refusal is already in (the
	// response beat Splice) and while it waits for it. The app must see
	// a reset either way, and OnResponse the status.
	for _, late := range []bool{true, false} {
		name := "splice before the response"
		if late {
			name = "splice after the response"
		}
		t.Run(name, func(t *testing.T) {
			auth := "refused:1"
			if !late {
				auth = "gated:1"
			}
			s, err := c.OpenStream(auth, nil)
			if err != nil {
				t.Fatal(err)
			}
			if late {
				s.Response(context.Background())
				waitReleased(t, c)
			}
			var status int
			s.OnResponse(func(st int) { status = st })
			app, peer := appPair(t)
			done := make(chan SpliceResult, 1)
			go func() { done <- s.Splice(app) }()
			if !late {
				time.Sleep(20 * time.Millisecond) // Splice waits for the response
				gate <- struct{}{}
			}
			peer.SetReadDeadline(time.Now().Add(5 * time.Second))
			b, err := io.ReadAll(peer)
			if len(b) != 0 || !errors.Is(err, syscall.ECONNRESET) {
				t.Errorf("app read %q, %v, want a reset", b, err)
			}
			res := <-done
			wantRefused(t, "Splice", res.Err)
			if status != 503 {
				t.Errorf("OnResponse saw %d, want 503", status)
			}
		})
	}
}

// TestResponseWithoutStatus: a server whose response has no :status (a
// malformed response, RFC 9113 §8.3.2) has not opened the tunnel either:
// the stream is reset (PROTOCOL_ERROR) and a spliced app sees a reset.
// Before, Splice took status 0 for "reset before a response" and waited
// for a reset that never came: the app hung until it gave up itself.
func TestResponseWithoutStatus(t *testing.T) {
	cli, srv := net.Pipe()
	t.Cleanup(func() { cli.Close(); srv.Close() })
	go io.Copy(io.Discard, srv) // the client's preface, HEADERS, RST_STREAM
	// One writer, in order: two goroutines writing to the pipe could put
	// the response before the SETTINGS, and the client rightly refuses a
	// connection whose first frame is not SETTINGS (133 of 3,000 runs).
	toSrv := make(chan []byte, 2)
	go func() {
		for b := range toSrv {
			srv.Write(b)
		}
	}()
	t.Cleanup(func() { close(toSrv) })
	toSrv <- appendSettings(nil)
	c, err := NewClientConn(cli, nil, Config{PingInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	s, err := c.OpenStream("10.0.0.1:80", nil)
	if err != nil {
		t.Fatal(err)
	}
	var hb bytes.Buffer
	hpack.NewEncoder(&hb).WriteField(hpack.HeaderField{Name: "server", Value: "nobody"})
	toSrv <- frameBytes(frameHeaders, flagEndHeaders|flagEndStream, s.ID(), hb.Bytes())
	app, peer := appPair(t)
	done := make(chan SpliceResult, 1)
	go func() { done <- s.Splice(app) }()
	peer.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(peer)
	if len(b) != 0 || !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("app read %q, %v, want a reset", b, err)
	}
	var se StreamError
	if res := <-done; !errors.As(res.Err, &se) || se.Code != ErrCodeProtocol {
		t.Errorf("Splice: %v, want a PROTOCOL_ERROR reset", res.Err)
	}
	if st, _, err := s.Response(context.Background()); st != 0 || err == nil {
		t.Errorf("Response: %d, %v, want no status and an error", st, err)
	}
}
