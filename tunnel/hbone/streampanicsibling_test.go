package hbone

import (
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/tunnel/internal/panicpoint"
)

// TestDrainPanicLeavesSiblingFullWindow: a panic on one stream's drain
// while a sibling stream of the same (pooled) connection is spliced and
// busy leaves the connection whole for the sibling: none of the
// connection's receive window held by the panicked stream, its entry
// gone from the stream table, no big-read slot or write lock left held.
// The sibling then moves three connection windows (48 MiB) to its app,
// which it could not if the panicked stream's window were lost (each
// lost byte is one the peer never sends again on any stream).
func TestDrainPanicLeavesSiblingFullWindow(t *testing.T) {
	var at panicpoint.Point
	var victim sync.Map // server streams whose drain may panic
	streamPanicAt(t, &at, func(s *Stream) bool { _, ok := victim.Load(s); return ok })
	type served struct {
		peer    net.Conn
		spliced chan SpliceResult
	}
	apps := make(chan served, 2)
	c, srv := serve(t, Config{PingInterval: -1}, func(s *Stream) {
		app, peer := appPair(t)
		if s.Request.Authority == "10.0.0.1:81" {
			// The victim's app takes little and reads nothing: what
			// comes waits in the stream for a drain goroutine.
			victim.Store(s, true)
			app.SetWriteBuffer(4 << 10)
			peer.(*net.TCPConn).SetReadBuffer(4 << 10)
		}
		sv := served{peer, make(chan SpliceResult, 1)}
		apps <- sv
		if s.Respond(200, nil) == nil {
			sv.spliced <- s.Splice(app)
		}
	})
	open := func(authority string) (*Stream, served) {
		t.Helper()
		s := openAnswered(t, c, authority)
		return s, <-apps
	}
	sib, sibApp := open("10.0.0.1:80")
	got := make(chan int64, 1)
	go func() {
		n, _ := io.Copy(io.Discard, sibApp.peer)
		got <- n
	}()
	// The sibling is busy while the victim's drain panics.
	if _, err := sib.Write(make([]byte, 1<<20)); err != nil {
		t.Fatal(err)
	}
	at.Arm("hbone.(*Stream).drain")
	vic, vicApp := open("10.0.0.1:81")
	go vic.Write(make([]byte, 2<<20))
	select {
	case res := <-vicApp.spliced:
		wantPanicError(t, res.Err, "hbone.(*Stream).drain")
	case <-time.After(10 * time.Second):
		t.Fatalf("the victim's Splice has not returned 10 s after its drain was armed (armed %v)", at.Armed())
	}
	// The victim's frames still on their way are dropped as they come:
	// then the connection holds no window but the sibling's, which its
	// app reads at once.
	deadline := time.Now().Add(5 * time.Second)
	for srv().ActiveStreams() != 1 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if n := srv().ActiveStreams(); n != 1 {
		t.Fatalf("%d streams open on the server, want the sibling alone", n)
	}
	if n := srv().bigReads.Load(); n != 0 {
		t.Errorf("%d big-read slots held with no pump reading", n)
	}
	const bulk = 48 << 20
	wrote := make(chan error, 1)
	go func() {
		buf := make([]byte, 1<<20)
		for i := 0; i < bulk/len(buf); i++ {
			if _, err := sib.Write(buf); err != nil {
				wrote <- err
				return
			}
		}
		wrote <- sib.CloseWrite()
	}()
	select {
	case err := <-wrote:
		if err != nil {
			t.Fatalf("the sibling's bulk write: %v", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("the sibling's 48 MiB not sent within 60 s: the connection's window is held (%d bytes)", connWindowHeld(srv()))
	}
	select {
	case n := <-got:
		if n != 1<<20+bulk {
			t.Fatalf("the sibling's app read %d bytes, want %d", n, 1<<20+bulk)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the sibling's app has not read its end within 30 s")
	}
	sib.Close()
	waitWindowBack(t, srv())
}
