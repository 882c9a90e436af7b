package hbone

import (
	"context"
	"io"
	"testing"
	"time"
)

// BenchmarkStreamOpenParallel is BenchmarkStreamOpenDeadline with 100
// openers at once on one warm connection (50 per CPU on 2): the opens
// contend for the write lock, the path lockWriteContext waits on (its
// goroutine, and since session 18 its timer for a stalled holder).
func BenchmarkStreamOpenParallel(b *testing.B) {
	c, _ := serve(b, Config{PingInterval: -1}, func(s *Stream) {
		s.Respond(200, nil)
		io.Copy(io.Discard, s)
	})
	b.ReportAllocs()
	b.SetParallelism(50)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			s, _, err := c.OpenStreamDataContext(ctx, "10.0.0.1:80", nil, nil)
			cancel()
			if err != nil {
				b.Error(err)
				return
			}
			if st, _, err := s.Response(context.Background()); err != nil || st != 200 {
				b.Errorf("response %d %v", st, err)
				return
			}
			s.Close()
		}
	})
}
