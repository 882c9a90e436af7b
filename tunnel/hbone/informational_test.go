package hbone

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2/hpack"
)

// A CONNECT's answer is any 2xx (RFC 9110 §9.3.6), possibly after
// informational responses (RFC 9113 §8.1: 100, 103, ...; 101 is not
// HTTP/2's). Our servers send a bare 200; other HBONE servers, or a
// proxy in front of one, may not. Before, the client took anything but
// 200 for a refusal: a 204, or a 100 or 103 ahead of the 200, cut a
// tunnel the server had opened.

// scriptedServer is an HTTP/2 server written by hand over TLS on
// loopback, for what our own server never sends: it answers each
// CONNECT with one HEADERS frame per status (END_STREAM on the last if
// endLast), then echoes the stream's DATA and ends its side when the
// client ends its own. A "data:" status is a DATA frame instead, its
// payload the rest (what a server must not send before its final
// response); a "hdr:" status a HEADERS block of a field x-trailer, the
// rest its value, and no :status. A "trailers:" status is sent last, at
// the client's END_STREAM, as such a block ending the server's side (in
// place of an empty DATA). rsts reports the codes of the client's
// RST_STREAMs.
func scriptedServer(t *testing.T, endLast bool, statuses ...string) (c *Conn, rsts <-chan ErrCode) {
	t.Helper()
	rst := make(chan ErrCode, 16)
	var trailers string
	for _, st := range statuses {
		if v, ok := strings.CutPrefix(st, "trailers:"); ok {
			trailers = v
		}
	}
	c = clientOfTLS(t, Config{PingInterval: -1}, func(tc *tls.Conn) {
		pre := make([]byte, len(clientPreface))
		if _, err := io.ReadFull(tc, pre); err != nil {
			return
		}
		var out bytes.Buffer
		var hb bytes.Buffer
		enc := hpack.NewEncoder(&hb)
		tc.Write(appendSettings(nil))
		var fh [frameHeaderLen]byte
		for {
			if _, err := io.ReadFull(tc, fh[:]); err != nil {
				return
			}
			h := parseFrameHeader(fh[:])
			p := make([]byte, h.Length)
			if _, err := io.ReadFull(tc, p); err != nil {
				return
			}
			out.Reset()
			switch h.Type {
			case frameSettings:
				if h.Flags&flagAck == 0 {
					out.Write(appendFrame(nil, frameSettings, flagAck, 0, nil))
				}
			case framePing:
				if h.Flags&flagAck == 0 {
					out.Write(appendFrame(nil, framePing, flagAck, 0, p))
				}
			case frameHeaders:
				for i, st := range statuses {
					if p, ok := strings.CutPrefix(st, "data:"); ok {
						out.Write(appendFrame(nil, frameData, 0, h.StreamID, []byte(p)))
						continue
					}
					if strings.HasPrefix(st, "trailers:") {
						continue
					}
					hb.Reset()
					if v, ok := strings.CutPrefix(st, "hdr:"); ok {
						enc.WriteField(hpack.HeaderField{Name: "x-trailer", Value: v})
					} else {
						enc.WriteField(hpack.HeaderField{Name: ":status", Value: st})
					}
					if strings.HasPrefix(st, "103") {
						enc.WriteField(hpack.HeaderField{Name: "link", Value: "</x.css>; rel=preload"})
					}
					flags := uint8(flagEndHeaders)
					if endLast && i == len(statuses)-1 {
						flags |= flagEndStream
					}
					out.Write(appendFrame(nil, frameHeaders, flags, h.StreamID, hb.Bytes()))
				}
			case frameData:
				if len(p) > 0 {
					out.Write(appendFrame(nil, frameData, 0, h.StreamID, p))
					// Credit back at once: the echo is all we do.
					out.Write(appendWindowUpdate(nil, 0, uint32(len(p))))
					out.Write(appendWindowUpdate(nil, h.StreamID, uint32(len(p))))
				}
				switch {
				case h.Flags&flagEndStream == 0:
				case trailers != "":
					hb.Reset()
					enc.WriteField(hpack.HeaderField{Name: "x-trailer", Value: trailers})
					out.Write(appendFrame(nil, frameHeaders, flagEndHeaders|flagEndStream, h.StreamID, hb.Bytes()))
				default:
					out.Write(appendFrame(nil, frameData, flagEndStream, h.StreamID, nil))
				}
			case frameRSTStream:
				if len(p) == 4 {
					rst <- ErrCode(uint32(p[0])<<24 | uint32(p[1])<<16 | uint32(p[2])<<8 | uint32(p[3]))
				}
			}
			if out.Len() > 0 {
				if _, err := tc.Write(out.Bytes()); err != nil {
					return
				}
			}
		}
	})
	return c, rst
}

// spliceEcho splices a new stream of c to a loopback app that sends
// "ping", half-closes and reads to the end: what it read, its first
// error, Splice's result and the status OnResponse reported.
func spliceEcho(t *testing.T, c *Conn) (got string, appErr error, res SpliceResult, status int) {
	t.Helper()
	s, err := c.OpenStream("10.0.0.1:80", nil)
	if err != nil {
		t.Fatal(err)
	}
	var st atomic.Int32
	s.OnResponse(func(v int) { st.Store(int32(v)) })
	app, peer := appPair(t)
	done := make(chan SpliceResult, 1)
	go func() { done <- s.Splice(app) }()
	peer.SetDeadline(time.Now().Add(10 * time.Second))
	// A reset can reach the app before it writes: then its write, not
	// its read, reports it (and the read after finds EOF).
	_, werr := peer.Write([]byte("ping"))
	cerr := peer.(*net.TCPConn).CloseWrite()
	b, rerr := io.ReadAll(peer)
	err = errors.Join(werr, cerr, rerr)
	select {
	case res = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Splice did not return")
	}
	return string(b), err, res, int(st.Load())
}

func TestConnectAcceptsAny2xxAfterInformational(t *testing.T) {
	skip := make([]string, maxInformational)
	for i := range skip {
		skip[i] = "103"
	}
	for _, statuses := range [][]string{
		{"204"},
		{"100", "200"},
		{"103", "200"},
		{"100", "103", "103", "201"},
		append(append([]string{}, skip...), "200"), // the most it skips
	} {
		name := strings.Join(statuses, ",")
		if len(statuses) > 4 {
			name = fmt.Sprintf("%d×103,200", len(statuses)-1)
		}
		t.Run(name, func(t *testing.T) {
			c, _ := scriptedServer(t, false, statuses...)
			got, appErr, res, status := spliceEcho(t, c)
			want, _ := strconv.Atoi(statuses[len(statuses)-1])
			if got != "ping" || appErr != nil {
				t.Errorf("app read %q, %v, want the echo %q and EOF", got, appErr, "ping")
			}
			if res.Err != nil || res.FromApp != 4 || res.ToApp != 4 {
				t.Errorf("Splice: %+v, want 4 bytes each way, no error", res)
			}
			if status != want {
				t.Errorf("OnResponse saw %d, want %d", status, want)
			}
			// And a reader without Splice: Response gives the final
			// status.
			s, err := c.OpenStream("10.0.0.1:80", nil)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if st, _, err := s.Response(ctx); st != want || err != nil {
				t.Errorf("Response: %d, %v, want %d", st, err, want)
			}
			s.Write([]byte("again"))
			s.CloseWrite()
			if b, err := io.ReadAll(s); string(b) != "again" || err != nil {
				t.Errorf("stream read %q, %v, want the echo", b, err)
			}
		})
	}
}

// TestConnectBadInformationalRefused: a 101, a 1xx that ends the stream,
// a server that keeps sending 1xx and DATA ahead of the final response
// open no tunnel: the app is reset, the stream reset with
// PROTOCOL_ERROR, and the error says why. Before, each 1xx case was a
// refusal "with status 1xx" (the flood's at its first 103), and a 101
// read as a server's answer.
func TestConnectBadInformationalRefused(t *testing.T) {
	flood := make([]string, maxInformational+1)
	for i := range flood {
		flood[i] = "103"
	}
	for _, tc := range []struct {
		name     string
		endLast  bool
		statuses []string
		why      string
	}{
		{"101", false, []string{"101"}, "101 (Switching Protocols)"},
		{"100,101", false, []string{"100", "101"}, "101 (Switching Protocols)"},
		{"100 with END_STREAM", true, []string{"100"}, "informational 100 ends the stream"},
		{"flood of 1xx", false, flood, fmt.Sprintf("more than %d informational", maxInformational)},
		{"status 2000", false, []string{"2000"}, "not a 3-digit code"},
		// RFC 9113 §8.1: DATA before the final response is malformed.
		// Before, the DATA was buffered and, once the 200 came,
		// spliced into the tunnel: the app read "early" ahead of its
		// echo.
		{"100,DATA,200", false, []string{"100", "data:early", "200"}, "DATA before the final response"},
		{"DATA,200", false, []string{"data:early", "200"}, "DATA before the final response"},
		{"DATA,503", false, []string{"data:early", "503"}, "DATA before the final response"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, rsts := scriptedServer(t, tc.endLast, tc.statuses...)
			got, appErr, res, status := spliceEcho(t, c)
			if got != "" || !errors.Is(appErr, syscall.ECONNRESET) {
				t.Errorf("app read %q, %v, want a reset", got, appErr)
			}
			var re ResponseError
			if !errors.As(res.Err, &re) || !strings.Contains(re.Error(), tc.why) {
				t.Errorf("Splice: %v, want a ResponseError saying %q", res.Err, tc.why)
			}
			var se StreamError
			if !errors.As(res.Err, &se) || se.Code != ErrCodeProtocol {
				t.Errorf("Splice: %v, want it to be a PROTOCOL_ERROR reset too", res.Err)
			}
			if status != 0 {
				t.Errorf("OnResponse saw %d, want no call (no response)", status)
			}
			if !tc.endLast {
				select {
				case code := <-rsts:
					if code != ErrCodeProtocol {
						t.Errorf("client reset the stream with %v, want PROTOCOL_ERROR", code)
					}
				case <-time.After(5 * time.Second):
					t.Error("client sent no RST_STREAM")
				}
			}
			// A stream error: the connection goes on.
			if err := c.Err(); err != nil {
				t.Errorf("connection: %v, want it open", err)
			}
		})
	}
}

// TestConnectHeadersAfterResponseRefused: after the final response only
// trailers may come, and they end the stream (RFC 9113 §8.1). A HEADERS
// without END_STREAM after it (a header block, a second 200, a 103) is
// malformed: the stream is reset with PROTOCOL_ERROR, the app reset, the
// error says why, the connection goes on. Before, the block was ignored
// and the tunnel carried on (the app read its echo). Trailers that end
// the stream after the echo stay accepted.
func TestConnectHeadersAfterResponseRefused(t *testing.T) {
	for _, statuses := range [][]string{{"200", "hdr:late"}, {"200", "200"}, {"100", "200", "103"}} {
		t.Run(strings.Join(statuses, ","), func(t *testing.T) {
			c, rsts := scriptedServer(t, false, statuses...)
			got, appErr, res, status := spliceEcho(t, c)
			if got != "" || !errors.Is(appErr, syscall.ECONNRESET) {
				t.Errorf("app read %q, %v, want a reset", got, appErr)
			}
			var re ResponseError
			if !errors.As(res.Err, &re) || !strings.Contains(re.Error(), "HEADERS without END_STREAM after the final response") {
				t.Errorf("Splice: %v, want a ResponseError saying HEADERS came without END_STREAM after the response", res.Err)
			}
			var se StreamError
			if !errors.As(res.Err, &se) || se.Code != ErrCodeProtocol {
				t.Errorf("Splice: %v, want it to be a PROTOCOL_ERROR reset too", res.Err)
			}
			// 200 when Splice ran before the response came, none when
			// the stream was reset before Splice ran (as for any reset
			// then).
			if status != 200 && status != 0 {
				t.Errorf("OnResponse saw %d, want 200 or no call", status)
			}
			select {
			case code := <-rsts:
				if code != ErrCodeProtocol {
					t.Errorf("client reset the stream with %v, want PROTOCOL_ERROR", code)
				}
			case <-time.After(5 * time.Second):
				t.Error("client sent no RST_STREAM")
			}
			if err := c.Err(); err != nil {
				t.Errorf("connection: %v, want it open", err)
			}
		})
	}
	t.Run("trailers with END_STREAM", func(t *testing.T) {
		c, rsts := scriptedServer(t, false, "200", "trailers:done")
		got, appErr, res, status := spliceEcho(t, c)
		if got != "ping" || appErr != nil {
			t.Errorf("app read %q, %v, want the echo %q and EOF", got, appErr, "ping")
		}
		if res.Err != nil || res.FromApp != 4 || res.ToApp != 4 {
			t.Errorf("Splice: %+v, want 4 bytes each way, no error", res)
		}
		if status != 200 {
			t.Errorf("OnResponse saw %d, want 200", status)
		}
		select {
		case code := <-rsts:
			t.Errorf("client reset the stream (%v) that trailers ended", code)
		default:
		}
	})
}

// TestConnectRefusalsUnchanged: final statuses outside 2xx stay
// refusals, with or without informational responses ahead of them.
func TestConnectRefusalsUnchanged(t *testing.T) {
	for _, statuses := range [][]string{{"400"}, {"401"}, {"503"}, {"100", "503"}, {"302"}} {
		t.Run(strings.Join(statuses, ","), func(t *testing.T) {
			c, _ := scriptedServer(t, true, statuses...)
			want, _ := strconv.Atoi(statuses[len(statuses)-1])
			got, appErr, res, status := spliceEcho(t, c)
			if got != "" || !errors.Is(appErr, syscall.ECONNRESET) {
				t.Errorf("app read %q, %v, want a reset", got, appErr)
			}
			var se StatusError
			if !errors.As(res.Err, &se) || se.Status != want {
				t.Errorf("Splice: %v, want StatusError %d", res.Err, want)
			}
			if status != want {
				t.Errorf("OnResponse saw %d, want %d", status, want)
			}
		})
	}
}

// TestXNetServerInformational: x/net's server (Istio's Go HBONE)
// sends what a handler's WriteHeader(1xx) asks for as it is: our client
// skips its 100 and 103 and gets the tunnel, and refuses its 101 and a
// handler that never stops sending 103.
func TestXNetServerInformational(t *testing.T) {
	handler := func(w http.ResponseWriter, r *http.Request) {
		switch r.Host {
		case "early:80":
			w.WriteHeader(100)
			w.Header().Set("Link", "</x.css>; rel=preload")
			w.WriteHeader(103)
			w.Header().Del("Link")
			w.WriteHeader(200)
		case "switch:80":
			w.WriteHeader(101)
		case "flood:80":
			for i := 0; i < 1000 && r.Context().Err() == nil; i++ {
				w.WriteHeader(103)
			}
		}
		w.(http.Flusher).Flush()
		buf := make([]byte, 4096)
		for {
			n, err := r.Body.Read(buf)
			if n > 0 {
				w.Write(buf[:n])
				w.(http.Flusher).Flush()
			}
			if err != nil {
				return
			}
		}
	}
	c := xnetServer(t, http.HandlerFunc(handler))
	for _, tc := range []struct{ authority, why string }{
		{"early:80", ""},
		{"switch:80", "101 (Switching Protocols)"},
		{"flood:80", "more than"},
	} {
		t.Run(tc.authority, func(t *testing.T) {
			s, err := c.OpenStream(tc.authority, nil)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			st, _, err := s.Response(ctx)
			if tc.why != "" {
				var re ResponseError
				if st != 0 || !errors.As(err, &re) || !strings.Contains(err.Error(), tc.why) {
					t.Errorf("Response: %d, %v, want a ResponseError saying %q", st, err, tc.why)
				}
				return
			}
			if st != 200 || err != nil {
				t.Fatalf("Response: %d, %v, want 200", st, err)
			}
			if _, err := s.Write([]byte("through x/net")); err != nil {
				t.Fatal(err)
			}
			s.CloseWrite()
			if b, err := io.ReadAll(s); string(b) != "through x/net" || err != nil {
				t.Errorf("read %q, %v, want the echo", b, err)
			}
		})
	}
	if err := c.Err(); err != nil {
		t.Errorf("connection: %v, want it open after the refused streams", err)
	}
}

// TestRespondRefusesInformational: our server has nothing to send
// before its answer, and Respond would end the stream with it (a
// malformed 1xx, RFC 9113 §8.1): it says so instead of sending it.
func TestRespondRefusesInformational(t *testing.T) {
	errs := make(chan error, 3)
	c, _ := serve(t, Config{}, func(s *Stream) {
		errs <- s.Respond(100, nil)
		errs <- s.Respond(1000, nil)
		errs <- s.Respond(200, nil)
		io.Copy(s, s)
		s.CloseWrite()
	})
	s, err := c.OpenStream("10.0.0.1:80", nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if st, _, err := s.Response(ctx); st != 200 || err != nil {
		t.Fatalf("Response: %d, %v, want 200 (the 1xx not sent)", st, err)
	}
	for _, want := range []string{"Respond(100)", "Respond(1000)", ""} {
		err := <-errs
		if want == "" && err != nil || want != "" && (err == nil || !strings.Contains(err.Error(), want)) {
			t.Errorf("Respond: %v, want %q", err, want)
		}
	}
	s.Close()
}

// TestRespondAny2xxKeepsStream: our server's Respond with any 2xx opens
// the tunnel as the client sees it (any 2xx is its start): the stream
// stays open both ways. Before, only 200 did: a 201, 204 or 299 went out
// with END_STREAM, then RST_STREAM(NO_ERROR), under a client that took
// the tunnel for open (its write failed, or its read found EOF at once).
func TestRespondAny2xxKeepsStream(t *testing.T) {
	for _, status := range []int{201, 204, 299} {
		t.Run(strconv.Itoa(status), func(t *testing.T) {
			c, _ := serve(t, Config{}, func(s *Stream) {
				if err := s.Respond(status, nil); err != nil {
					t.Errorf("Respond(%d): %v", status, err)
					return
				}
				io.Copy(s, s)
				s.CloseWrite()
			})
			s, err := c.OpenStream("10.0.0.1:80", nil)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if st, _, err := s.Response(ctx); st != status || err != nil {
				t.Fatalf("Response: %d, %v, want %d", st, err, status)
			}
			if _, err := s.Write([]byte("through")); err != nil {
				t.Fatalf("write after %d: %v", status, err)
			}
			s.CloseWrite()
			if b, err := io.ReadAll(s); string(b) != "through" || err != nil {
				t.Errorf("read %q, %v after %d, want the echo", b, err, status)
			}
		})
	}
}
