package hbone

import (
	"crypto/tls"
	"testing"
	"time"
)

// Gone tells the socket's end from the connection's: a clean close
// lingers while its peer still sends, and whoever ends the process
// (the agent at an upgrade) must know when nothing lingers any more.
func TestGoneWaitsForTheLinger(t *testing.T) {
	a := newAttacker(t, Config{PingTimeout: 400 * time.Millisecond}, attackOpts{}, echoHandler)
	srv := a.server()
	keepPinging(t, a)
	srv.Close()
	select {
	case <-srv.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("Done not closed 5 s after Close")
	}
	// The peer keeps sending: the linger reads on, well past the
	// lingerWait of a quiet link.
	select {
	case <-srv.Gone():
		t.Fatal("Gone closed while the socket still lingered for a peer that keeps sending")
	case <-time.After(lingerWait + lingerWait/2):
	}
	select {
	case <-srv.readDone:
		t.Fatal("the linger ended: the premise (a socket still open) does not hold")
	default:
	}
	// Closing the socket under TLS (a pod's network going) ends the
	// linger at once.
	cut := time.Now()
	srv.NetConn().(*tls.Conn).NetConn().Close()
	select {
	case <-srv.Gone():
	case <-time.After(lingerWait):
		t.Fatal("Gone not closed within a second of the socket's own close")
	}
	t.Logf("Gone %v after the socket's close", time.Since(cut).Round(time.Millisecond))
}

// A close that does not linger (keepalive off and no read loop left
// is not reachable here; an unclean close is) closes Gone with Done.
func TestGoneWithDoneAfterAnAbortiveClose(t *testing.T) {
	a := newAttacker(t, Config{PingTimeout: 400 * time.Millisecond}, attackOpts{}, echoHandler)
	srv := a.server()
	keepPinging(t, a)
	srv.NetConn().(*tls.Conn).NetConn().Close()
	srv.Close()
	for _, ch := range []<-chan struct{}{srv.Done(), srv.Gone()} {
		select {
		case <-ch:
		case <-time.After(lingerWait):
			t.Fatal("Done or Gone not closed within a second of an abortive close")
		}
	}
}
