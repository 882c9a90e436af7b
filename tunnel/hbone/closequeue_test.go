package hbone

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"runtime"
	"strings"
	"testing"
	"time"
)

// awaitClosing waits until a close of c has begun (closed set), within
// d, and says when it saw it (a millisecond late at most).
func awaitClosing(t *testing.T, c *Conn, d time.Duration) time.Time {
	t.Helper()
	for deadline := time.Now().Add(d); ; time.Sleep(time.Millisecond) {
		c.mu.Lock()
		closed := c.closed
		c.mu.Unlock()
		if closed {
			return time.Now()
		}
		if time.Now().After(deadline) {
			t.Fatalf("the connection has not begun to close within %v", d)
		}
	}
}

// TestKeepaliveCloseKeepsTheWriteWait: keepalive's close is for a peer
// it has judged broken, its PING wait having already followed the link
// (up to maxPingWait). Its close's writes keep the fixed closeWriteWait:
// the server's 4 MiB burst blocked on its full socket over the slow
// link, which takes our bytes all along, and a PING the client never
// gets (it is queued behind the burst) until keepalive's cap; the close
// must end closeWriteWait after it began, abortive, not follow the link
// another cap (10 × PingTimeout) as Close's does.
func TestKeepaliveCloseKeepsTheWriteWait(t *testing.T) {
	sent := make(chan error, 1)
	burst := make([]byte, frameHeaderLen+4<<20)
	handler := func(s *Stream) {
		if err := s.Respond(200, nil); err != nil {
			sent <- err
			return
		}
		sent <- s.sendFrom(burst, len(burst)-frameHeaderLen, true)
	}
	scfg := Config{PingInterval: 200 * time.Millisecond, PingTimeout: 500 * time.Millisecond}
	c, sc, _ := fullSocketServer(t, scfg, handler)
	openToABlockedWrite(t, c, sc)
	blocked := time.Now()
	closing := awaitClosing(t, sc, 2*maxPingWait(scfg.PingTimeout))
	// The premise: keepalive's wait followed the link (a dead one ends
	// it PingTimeout after the PING).
	if d := closing.Sub(blocked); d < 2*scfg.PingTimeout {
		t.Fatalf("keepalive closed %v after the burst blocked: its wait did not follow the link", d)
	}
	select {
	case <-sc.Done():
		t.Logf("the close ended %v after it began (keepalive closed %v after the burst blocked)",
			time.Since(closing).Round(time.Millisecond), closing.Sub(blocked).Round(time.Millisecond))
	case <-time.After(2 * closeWriteWait):
		t.Fatalf("keepalive's close has not ended %v after it began (cap %v)", 2*closeWriteWait, maxPingWait(scfg.PingTimeout))
	}
	if err := sc.Err(); err == nil || !strings.Contains(err.Error(), "keepalive timeout") {
		t.Fatalf("the server closed with %v, want keepalive's timeout", err)
	}
	if err := <-sent; err == nil {
		t.Error("the burst was written whole")
	}
	select {
	case <-sc.readDone:
	case <-time.After(time.Second):
		t.Error("keepalive's close lingers: not abortive")
	}
}

// lockWaiters counts the goroutines waiting for a mutex in fn (as
// runtime.Stack names it).
func lockWaiters(fn string) int {
	st := make([]byte, 4<<20)
	st = st[:runtime.Stack(st, true)]
	n := 0
	for _, g := range bytes.Split(st, []byte("\n\n")) {
		if bytes.Contains(g, []byte("(*Mutex).Lock")) && bytes.Contains(g, []byte(fn)) {
			n++
		}
	}
	return n
}

// TestCloseSkipsTheBurstsQueuedBehindIt: a server's Close while one
// stream's burst (a download's tail with END_STREAM) waits for room in
// its full socket on the slow link, and two more streams' bursts
// (256 KiB each) and a third's 200 wait for the write lock behind it.
// The close waits for the burst in flight, which goes out whole
// (TestCloseWaitsForTheLinkToTakeTheLastWrite); the writers queued
// behind it took the lock before the close, each writing its burst into
// the full socket, the close's deadline moving with the link: Close
// returned ~10 s after the first burst was taken (100 busy streams
// reach the cap, 10 × PingTimeout), and their streams failed with the
// close after all. Now they write nothing: Close returns as the first
// burst is taken, the client reads that download whole, and the other
// streams fail, the third unanswered.
func TestCloseSkipsTheBurstsQueuedBehindIt(t *testing.T) {
	download := make([]byte, closeSlowBody)
	rand.Read(download)
	type result struct {
		err error
		at  time.Time
	}
	results := make([]chan result, 4)
	for i := range results {
		results[i] = make(chan result, 1)
	}
	responded := make(chan struct{}, 3)
	first, rest := make(chan struct{}), make(chan struct{})
	handler := func(s *Stream) {
		i := int(s.id-1) / 2
		if i == 3 {
			<-rest
			results[i] <- result{s.Respond(200, nil), time.Now()}
			return
		}
		if err := s.Respond(200, nil); err != nil {
			results[i] <- result{err, time.Now()}
			return
		}
		responded <- struct{}{}
		body := download
		if i == 0 {
			<-first
		} else {
			<-rest
			body = download[:256<<10]
		}
		buf := make([]byte, frameHeaderLen+len(body))
		copy(buf[frameHeaderLen:], body)
		err := s.sendFrom(buf, len(body), true)
		results[i] <- result{err, time.Now()}
	}
	c, sc, _ := fullSocketServer(t, Config{PingInterval: -1, PingTimeout: 2 * time.Second}, handler)
	var cs []*Stream
	for range 4 {
		s, err := c.OpenStream("10.0.0.1:80", nil)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		s.CloseWrite()
		cs = append(cs, s)
	}
	for range 3 {
		select {
		case <-responded:
		case <-time.After(10 * time.Second):
			t.Fatal("the server has not answered 3 streams within 10 s")
		}
	}
	got := readDownload(cs[0], download)
	close(first)
	awaitBlockedWrite(t, sc)
	close(rest)
	for deadline := time.Now().Add(10 * time.Second); lockWaiters("(*Stream).sendFrom") < 2 || lockWaiters("(*Stream).Respond") < 1; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("not 2 bursts and a 200 waiting for the write lock within 10 s (%d, %d)",
				lockWaiters("(*Stream).sendFrom"), lockWaiters("(*Stream).Respond"))
		}
	}
	if sc.cork.blockedSince.Load() == 0 {
		t.Fatal("the first burst no longer waits for room: the server's socket is not full")
	}
	closing := time.Now()
	closed := make(chan time.Time, 1)
	go func() { sc.Close(); closed <- time.Now() }()
	var r0 result
	select {
	case r0 = <-results[0]:
		if r0.err != nil {
			t.Fatalf("the burst in flight as the close began: %v", r0.err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the burst in flight has not returned 30 s after the close")
	}
	select {
	case at := <-closed:
		t.Logf("Close returned %v after it began, %v after the burst in flight was taken (%v after it began)",
			at.Sub(closing).Round(time.Millisecond), at.Sub(r0.at).Round(time.Millisecond), r0.at.Sub(closing).Round(time.Millisecond))
	case <-time.After(time.Until(r0.at.Add(closeWriteWait))):
		t.Fatalf("Close has not returned %v after the burst it waited for was taken", closeWriteWait)
	}
	for i := 1; i < 4; i++ {
		if r := <-results[i]; r.err == nil {
			t.Errorf("stream %d: its write, queued behind the close, went out", i)
		}
	}
	select {
	case err := <-got:
		if err != nil {
			t.Fatalf("the download in flight as the close began: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the download has not ended 30 s after the close")
	}
	for i := 1; i < 3; i++ {
		b, err := io.ReadAll(cs[i])
		if err == nil || len(b) != 0 {
			t.Errorf("stream %d: read %d bytes, %v; want none and the close's error", i, len(b), err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if st, _, err := cs[3].Response(ctx); err == nil {
		t.Errorf("stream 3: answered %d by a close's queued writer", st)
	}
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the client's connection has not ended 10 s after the download")
	}
	if err := c.Err(); err != nil && !errors.Is(err, ErrConnClosed) {
		t.Errorf("the client's connection ended with %v, want the server's close_notify", err)
	}
}
