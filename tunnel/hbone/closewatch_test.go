package hbone

import (
	"fmt"
	"net"
	"sync"
	"testing"
	"time"
)

// TestCloseToAPeerThatSendsButNeverReads: the close's patience is for a
// link that takes our bytes (closeWatch), and a peer that sends is not
// one: a hostile client (any meshed workload can reach an agent) opens a
// download, stops reading, and sends a PING every 50 ms. The server's
// writer blocks on the full socket, holding the write lock; the peer's
// window is zero, so no byte of ours is acknowledged. Its bytes coming
// in say nothing of room in our socket: a close that took them for the
// link's progress held its deadline, the write lock and Close's caller
// (the tunnel's pool and Serving.Close, one connection after another)
// to the cap, 10 × PingTimeout (20 s here, 200 s with the defaults),
// where it must end closeWriteWait after it began, abortive, the burst
// cut.
func TestCloseToAPeerThatSendsButNeverReads(t *testing.T) {
	sent := make(chan error, 1)
	a := newAttacker(t, Config{PingTimeout: 2 * time.Second}, attackOpts{noRead: true}, func(s *Stream) {
		if err := s.Respond(200, nil); err != nil {
			sent <- err
			return
		}
		_, err := s.Write(make([]byte, 256<<20))
		sent <- err
	})
	b := appendSettings(nil, setting{settingInitialWindowSize, 1 << 30})
	b = appendWindowUpdate(b, 0, 1<<30)
	b = append(b, headersFrame(1, false)...)
	if err := a.write(b); err != nil {
		t.Fatal(err)
	}
	sc := a.server()
	awaitBlockedWrite(t, sc)
	// The premise: the peer's window is zero (no byte acknowledged for
	// 300 ms, where a reading peer acknowledges within milliseconds on
	// loopback) and the burst still waits for room.
	acked, _, _, _, ok := tcpProgress(sc.cork.raw)
	for quiet := time.Now(); time.Since(quiet) < 300*time.Millisecond; time.Sleep(10 * time.Millisecond) {
		now, _, _, queued, ok2 := tcpProgress(sc.cork.raw)
		if !ok || !ok2 || !queued {
			t.Fatalf("nothing of ours queued in the server's socket (TCP_INFO read: %v %v)", ok, ok2)
		}
		if now != acked {
			acked, quiet = now, time.Now()
		}
		if time.Since(quiet) > 10*time.Second {
			t.Fatal("the server's bytes are still acknowledged: the peer's window is not zero")
		}
	}
	if sc.cork.blockedSince.Load() == 0 {
		t.Fatal("the server's burst no longer waits for room: its socket is not full")
	}
	// The peer sends all along; its PINGs reach the server's read loop.
	frames := sc.frames.Load()
	keepPinging(t, a)
	for deadline := time.Now().Add(5 * time.Second); sc.frames.Load() < frames+2; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the server read none of the peer's PINGs within 5 s")
		}
	}
	closeReturnsWithin(t, sc, 2*closeWriteWait, fmt.Sprintf("a peer that sends but reads nothing (cap %v)", maxPingWait(sc.cfg.PingTimeout)))
	if err := <-sent; err == nil {
		t.Error("the burst toward a peer that reads nothing was written whole")
	}
	select {
	case <-sc.readDone:
	case <-time.After(time.Second):
		t.Error("the close toward a peer that reads nothing lingers: not abortive")
	}
}

// deadlineConn records the write deadlines set on it; set runs in
// SetWriteDeadline, before it records.
type deadlineConn struct {
	net.Conn
	mu  sync.Mutex
	set func()
	got []time.Time
}

func (d *deadlineConn) SetWriteDeadline(t time.Time) error {
	if d.set != nil {
		d.set()
	}
	d.mu.Lock()
	d.got = append(d.got, t)
	d.mu.Unlock()
	return nil
}

// TestCloseWatchMovesNoDeadlineThatPassed: a deadline that passed may
// have cut a write mid-record; moving it on afterwards would let the
// close judge itself clean (inTime) and write its frames after half a
// record. The watch must leave it, and say the close is not in time.
func TestCloseWatchMovesNoDeadlineThatPassed(t *testing.T) {
	d := &deadlineConn{}
	w := &closeWatch{c: &Conn{nc: d}, base: time.Now().Add(-2 * closeWriteWait), until: closeWriteWait}
	w.move(3 * closeWriteWait)
	if len(d.got) != 0 {
		t.Errorf("the watch moved a deadline that had passed, to %v", d.got)
	}
	if w.inTime() {
		t.Error("inTime after the deadline passed")
	}
}

// TestCloseWatchCountsALapseAsACut: the deadline in force passes while
// the watch moves it (SetWriteDeadline takes the time): the old one may
// have fired, and cut a write, before the new one took hold, so the
// close must not be judged in time, though the new deadline is ahead.
func TestCloseWatchCountsALapseAsACut(t *testing.T) {
	const old = 50 * time.Millisecond
	base := time.Now()
	d := &deadlineConn{set: func() { time.Sleep(time.Until(base.Add(old + 10*time.Millisecond))) }}
	w := &closeWatch{c: &Conn{nc: d}, base: base, until: old}
	w.move(time.Hour)
	if len(d.got) != 1 {
		t.Fatalf("%d deadlines set, want the move's", len(d.got))
	}
	if w.inTime() {
		t.Error("inTime after the deadline in force passed during its move")
	}
	// In time while no deadline has passed.
	d.set = nil
	w = &closeWatch{c: &Conn{nc: d}, base: time.Now(), until: time.Hour}
	w.move(2 * time.Hour)
	if !w.inTime() {
		t.Error("not inTime with the deadline an hour ahead")
	}
}

// TestCloseWatchRunsOnlyWhereTheLinkAnswers: the watch's goroutine
// looks at TCP_INFO, so it runs for a patient close over an open TCP
// socket only: over a Unix socket, or a TCP one already closed under
// the connection (the tunnel's abortConn), every look failed, and a
// close for a failure keeps the fixed deadline.
func TestCloseWatchRunsOnlyWhereTheLinkAnswers(t *testing.T) {
	conn := func(nc net.Conn) *Conn {
		k := newCorkConn(nc, 0)
		return &Conn{nc: k, cork: k}
	}
	pair := func(network, addr string) (net.Conn, net.Conn) {
		t.Helper()
		ln, err := net.Listen(network, addr)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		a, err := net.Dial(network, ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		b, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { a.Close(); b.Close() })
		return a, b
	}
	tcp, _ := pair("tcp", "127.0.0.1:0")
	unix, _ := pair("unix", t.TempDir()+"/s")
	closed, _ := pair("tcp", "127.0.0.1:0")
	c := conn(closed)
	closed.Close()
	for _, tc := range []struct {
		name    string
		c       *Conn
		patient bool
		runs    bool
	}{
		{"a patient close over TCP", conn(tcp), true, true},
		{"a close for a failure over TCP", conn(tcp), false, false},
		{"a patient close over a Unix socket", conn(unix), true, false},
		{"a patient close over a closed TCP socket", c, true, false},
	} {
		w := watchClose(tc.c, tc.patient)
		if runs := w.done != nil; runs != tc.runs {
			t.Errorf("%s: the watch runs: %v, want %v", tc.name, runs, tc.runs)
		}
		w.end()
	}
}
