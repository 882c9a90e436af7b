package hbone

import (
	"bytes"
	"io"
	"net"
	"testing"
	"time"
)

// TestBulkFramesFollowPeerSettings: a stream opened and spliced at once
// on a new connection, before the server's SETTINGS arrived, still sends
// DATA frames of the size the server allows once it knows it. The pump
// used to fix its frame size when it started, and such a stream (the
// first on every new connection) sent 16 KiB frames (the RFC default)
// all its life: four times the frames, records and system calls.
func TestBulkFramesFollowPeerSettings(t *testing.T) {
	const size = 4 << 20
	got := make(chan int64, 1)
	var srv func() *Conn
	c, srv := serve(t, Config{}, func(s *Stream) {
		s.Respond(200, nil)
		n, _ := io.Copy(io.Discard, s)
		got <- n
		s.CloseWrite()
	})
	app, peer := appPair(t)
	// The app's bytes wait in its socket before the pump starts, so
	// each read(2) takes a full AppReadSize.
	go func() {
		peer.Write(bytes.Repeat([]byte("b"), size))
		peer.(*net.TCPConn).CloseWrite()
	}()
	time.Sleep(20 * time.Millisecond)
	s, err := c.OpenStream("10.0.0.1:80", nil)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan SpliceResult, 1)
	go func() { done <- s.Splice(app) }()
	select {
	case n := <-got:
		if n != size {
			t.Fatalf("server read %d bytes, want %d", n, size)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("transfer did not end")
	}
	<-done
	// 4 MiB in 64 KiB frames is 64 DATA frames (+ SETTINGS, HEADERS,
	// WINDOW_UPDATEs); in 16 KiB frames it was 256.
	if n := srv().frames.Load(); n > 100 {
		t.Errorf("server read %d frames for %d bytes: DATA frames were not the 64 KiB the settings allow", n, size)
	}
}
