package hbone

import (
	"context"
	"io"
	"testing"
)

// The data path's benchmarks, over real TLS on loopback: what the frame
// reader's checks (abuse_test.go's limits) must not slow down. The
// package has no second implementation to run against in the same run:
// compare with the same benchmarks run on the previous commit, in turns
// (docs/tunnel.md, "HTTP/2 abuse (session 10)").

// BenchmarkBulk: one stream, the client writing 256 KiB at a time into a
// server that discards: DATA frames of 64 KiB and the WINDOW_UPDATEs.
func BenchmarkBulk(b *testing.B) {
	c, _ := serve(b, Config{PingInterval: -1}, func(s *Stream) {
		s.Respond(200, nil)
		io.Copy(io.Discard, s)
		s.CloseWrite()
	})
	s, err := c.OpenStream("10.0.0.1:80", nil)
	if err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 256<<10)
	b.SetBytes(int64(len(buf)))
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := s.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	s.Close()
}

// BenchmarkRequestResponse: 100-byte messages echoed on one stream, one
// at a time: small frames, where per-frame costs show.
func BenchmarkRequestResponse(b *testing.B) {
	c, _ := serve(b, Config{PingInterval: -1}, echoHandler)
	s, err := c.OpenStream("10.0.0.1:80", nil)
	if err != nil {
		b.Fatal(err)
	}
	msg := make([]byte, 100)
	got := make([]byte, len(msg))
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := s.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(s, got); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	s.Close()
}

// BenchmarkStreamOpen: open a stream, wait for its 200, reset it: the
// server's HEADERS path and its handler's start and end.
func BenchmarkStreamOpen(b *testing.B) {
	c, _ := serve(b, Config{PingInterval: -1}, func(s *Stream) {
		s.Respond(200, nil)
		io.Copy(io.Discard, s)
	})
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		s, err := c.OpenStream("10.0.0.1:80", nil)
		if err != nil {
			b.Fatal(err)
		}
		if st, _, err := s.Response(context.Background()); err != nil || st != 200 {
			b.Fatalf("response %d %v", st, err)
		}
		s.Close()
	}
}
