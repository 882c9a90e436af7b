package hbone

import (
	"errors"
	"testing"
	"time"
)

// TestCloseWriteAfterADroppedRespondSendsNothing: a 2xx Respond that
// takes the write lock after its connection's close began is dropped
// (the tunnel never opened, the peer's CONNECT unanswered), and its
// handler told so. A CloseWrite the handler makes next must not then
// send END_STREAM: on a stream with no response HEADERS, that DATA is
// malformed at the peer (RFC 9113 §8.1), which read "DATA before the
// final response" instead of the close. The close is held between its
// start and its wait for the write lock (testHookCloseBegun), where the
// handler's Respond and CloseWrite both take the lock first.
func TestCloseWriteAfterADroppedRespondSendsNothing(t *testing.T) {
	type result struct{ respond, closeWrite error }
	res := make(chan result, 1)
	started, respond := make(chan struct{}), make(chan struct{})
	handler := func(s *Stream) {
		close(started)
		<-respond
		rerr := s.Respond(200, nil)
		res <- result{rerr, s.CloseWrite()}
	}
	c, srv := serve(t, Config{PingInterval: -1}, handler)
	s, err := c.OpenStream("10.0.0.1:80", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	sc := srv()
	// The close begins with the handler running: a stream still queued
	// for one is dropped by the close.
	select {
	case <-started:
	case <-time.After(10 * time.Second):
		t.Fatal("the stream's handler did not start within 10 s")
	}
	begun, release := holdCloseAtItsStart(t, sc)
	closed := make(chan struct{})
	go func() { sc.Close(); close(closed) }()
	<-begun
	close(respond)
	var r result
	select {
	case r = <-res:
	case <-time.After(10 * time.Second):
		close(release)
		t.Fatal("the handler's Respond and CloseWrite have not returned within 10 s")
	}
	close(release)
	<-closed
	if r.respond == nil {
		t.Fatal("the 2xx went out after the close began: the test did not set up its case")
	}
	if r.closeWrite == nil {
		t.Error("CloseWrite after the dropped 2xx said END_STREAM went out, on a stream never answered")
	}
	// The client must see the close, not a malformed answer (DATA
	// before the final response).
	_, _, err = s.Response(t.Context())
	var bad ResponseError
	if errors.As(err, &bad) {
		t.Errorf("the client's stream failed with %v: the server sent DATA with no response HEADERS", err)
	} else if err == nil {
		t.Error("the client's stream was answered, though its 2xx was dropped")
	}
}
