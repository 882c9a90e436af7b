package hbone

import (
	"context"
	"fmt"
	"io"
	"net"
	"sync"
	"syscall"
	"testing"
)

// The data path's benchmarks, over real TLS on loopback: what the frame
// reader's checks (abuse_test.go's limits) must not slow down. The
// package has no second implementation to run against in the same run:
// compare with the same benchmarks run on the previous commit, in turns
// (docs/tunnel.md, "HTTP/2 abuse (session 10)").

// reportCPU reports the process's CPU time (user + system, both peers)
// per operation from now until the returned function runs: on a shared,
// loaded machine wall time swings by 2x between runs, CPU per operation
// much less.
func reportCPU(b *testing.B) func() {
	cpu := func() int64 {
		var ru syscall.Rusage
		_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
		return ru.Utime.Nano() + ru.Stime.Nano()
	}
	start := cpu()
	return func() {
		b.ReportMetric(float64(cpu()-start)/float64(b.N), "cpu-ns/op")
	}
}

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
	done := reportCPU(b)
	for i := 0; i < b.N; i++ {
		if _, err := s.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	done()
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
	done := reportCPU(b)
	for i := 0; i < b.N; i++ {
		if _, err := s.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(s, got); err != nil {
			b.Fatal(err)
		}
	}
	done()
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
	defer reportCPU(b)()
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

// BenchmarkSpliceBulk: apps streaming into their spliced streams (the
// pump: reads of up to AppReadSize, maxBigReads of them at once), 1 and
// 8 streams on one connection, into a server that discards.
func BenchmarkSpliceBulk(b *testing.B) {
	for _, streams := range []int{1, 8} {
		b.Run(fmt.Sprintf("streams=%d", streams), func(b *testing.B) {
			c, _ := serve(b, Config{PingInterval: -1}, func(s *Stream) {
				s.Respond(200, nil)
				io.Copy(io.Discard, s)
				s.CloseWrite()
			})
			const chunk = 256 << 10
			buf := make([]byte, chunk)
			per := (b.N + streams - 1) / streams
			b.SetBytes(chunk)
			b.ResetTimer()
			defer reportCPU(b)()
			var wg sync.WaitGroup
			for i := 0; i < streams; i++ {
				app, peer := benchAppPair(b)
				s, err := c.OpenStream("10.0.0.1:80", nil)
				if err != nil {
					b.Fatal(err)
				}
				wg.Add(2)
				go func() { defer wg.Done(); s.Splice(app) }()
				go func() {
					defer wg.Done()
					for j := 0; j < per; j++ {
						if _, err := peer.Write(buf); err != nil {
							return
						}
					}
					peer.(*net.TCPConn).CloseWrite()
					io.Copy(io.Discard, peer)
				}()
			}
			wg.Wait()
		})
	}
}

// benchAppPair is a connected loopback TCP pair: the app's socket (for
// Splice) and its far end.
func benchAppPair(b *testing.B) (*net.TCPConn, net.Conn) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	peer, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	app, err := ln.Accept()
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { peer.Close(); app.Close() })
	return app.(*net.TCPConn), peer
}
