package hbone

import (
	"context"
	"sync"
	"testing"
	"time"
)

// TestResetAsSpliceStarts: a stream reset (the agent's cut, a revoked
// policy) while its Splice starts. The reset's finishToApp read the
// stream's toAppDone while Splice set it: a data race (-race), seen in
// TestResetWhileDeliveringReturnsWindow about once in thirty runs.
func TestResetAsSpliceStarts(t *testing.T) {
	const streams = 50
	var wg sync.WaitGroup
	c, _ := serve(t, Config{}, func(s *Stream) {
		defer wg.Done()
		if err := s.Respond(200, nil); err != nil {
			return
		}
		app, peer := appPair(t)
		defer peer.Close()
		go s.Close()
		s.Splice(app)
	})
	for i := 0; i < streams; i++ {
		wg.Add(1)
		s, err := c.OpenStream("10.0.0.1:80", nil)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		s.Response(ctx)
		cancel()
		wg.Wait()
		s.Close()
	}
}
