package hbone

import (
	"context"
	"io"
	"testing"
	"time"
)

// BenchmarkStreamOpenDeadline is BenchmarkStreamOpen as the tunnel opens
// (OpenStreamDataContext with the connect timeout's deadline): the
// liveness probe's cost on a warm connection, where each open follows
// the last response's frames by microseconds (the probe is armed, its
// timer disarmed by the next frame, at most one a second).
func BenchmarkStreamOpenDeadline(b *testing.B) {
	c, _ := serve(b, Config{PingInterval: -1}, func(s *Stream) {
		s.Respond(200, nil)
		io.Copy(io.Discard, s)
	})
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		s, _, err := c.OpenStreamDataContext(ctx, "10.0.0.1:80", nil, nil)
		cancel()
		if err != nil {
			b.Fatal(err)
		}
		if st, _, err := s.Response(context.Background()); err != nil || st != 200 {
			b.Fatalf("response %d %v", st, err)
		}
		s.Close()
	}
}
