package hbone

import (
	"io"
	"testing"
	"time"
)

// TestCloseWriteAfterADroppedWriteSendsNoEndStream: a stream's write
// made while its connection closes is dropped, and the caller told so:
// its window reserved before the close began, it takes the write lock
// after (closing), or it finds the connection closed (reserve). A
// CloseWrite the caller makes next (genericSplice's io.Copy then
// CloseWrite, any Write-then-CloseWrite user) must not then send
// END_STREAM, with the close's close_notify behind it: the peer read a
// clean end of a stream whose last bytes were never sent, a transfer cut
// short passed off as whole. The close is held between its start and its
// wait for the write lock (testHookCloseBegun: its goroutine descheduled
// there, or a writer barging in on the lock in its normal mode), where
// the writer's own CloseWrite can take the lock first.
func TestCloseWriteAfterADroppedWriteSendsNoEndStream(t *testing.T) {
	for _, tc := range []struct {
		name     string
		reserved bool // the write reserved its window before the close began
	}{
		{"the write lock taken after the close began", true},
		{"the connection found closed", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			type result struct{ write, closeWrite error }
			res := make(chan result, 1)
			write := make(chan struct{})
			handler := func(s *Stream) {
				if err := s.Respond(200, nil); err != nil {
					t.Error(err)
					return
				}
				<-write
				_, werr := s.Write(make([]byte, 64<<10))
				res <- result{werr, s.CloseWrite()}
			}
			c, srv := serve(t, Config{PingInterval: -1}, handler)
			s, err := c.OpenStream("10.0.0.1:80", nil)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			s.CloseWrite()
			sc := srv()
			if _, _, err := s.Response(t.Context()); err != nil {
				t.Fatal(err)
			}
			if tc.reserved {
				// The write reserves its window, then waits for the lock.
				sc.wmu.Lock()
				close(write)
				for deadline := time.Now().Add(10 * time.Second); lockWaiters("(*Stream).sendFrom") < 1; time.Sleep(time.Millisecond) {
					if time.Now().After(deadline) {
						sc.wmu.Unlock()
						t.Fatal("the stream's write is not waiting for the write lock within 10 s")
					}
				}
			}
			begun, release := holdCloseAtItsStart(t, sc)
			closed := make(chan struct{})
			go func() { sc.Close(); close(closed) }()
			<-begun
			if tc.reserved {
				sc.wmu.Unlock()
			} else {
				close(write)
			}
			var r result
			select {
			case r = <-res:
			case <-time.After(10 * time.Second):
				close(release)
				t.Fatal("the handler's write and CloseWrite have not returned within 10 s")
			}
			close(release)
			<-closed
			if r.write == nil {
				t.Fatal("the write went out after the close began: the test did not set up its case")
			}
			if r.closeWrite == nil {
				t.Error("CloseWrite after the dropped write said END_STREAM went out")
			}
			b, err := io.ReadAll(s)
			if err == nil {
				t.Errorf("the client read a clean end of the stream after %d of the 64 KiB written, the rest dropped by the close", len(b))
			}
		})
	}
}

// holdCloseAtItsStart holds sc's next close between its start (closing
// set) and its wait for the write lock: begun closes when it gets
// there, closing release lets it go on.
func holdCloseAtItsStart(t *testing.T, sc *Conn) (begun, release chan struct{}) {
	begun, release = make(chan struct{}), make(chan struct{})
	hook := func(hc *Conn) {
		if hc == sc {
			close(begun)
			<-release
		}
	}
	testHookCloseBegun.Store(&hook)
	t.Cleanup(func() { testHookCloseBegun.Store(nil) })
	return begun, release
}
