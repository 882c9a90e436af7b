package tunnel

import (
	"context"
	"errors"
	"testing"
	"time"
)

// TestPoolDoesNotRedialWhenItsConnectionsAreFull: A's one connection to
// B is full (MaxStreamsPerConn) and B refuses new connections (its
// listener at its budget, a NetworkPolicy change). An open dials once
// and fails with the dial's reason ("connect").
//
// Before, pick shared a failed dial's error only when no connection was
// pooled at all: with a full one pooled it looped and dialed again, and
// again, until the open's context ended: thousands of refused dials (a
// SYN each towards B) in the connect timeout, then connect_timeout, the
// wrong reason.
func TestPoolDoesNotRedialWhenItsConnectionsAreFull(t *testing.T) {
	r := newStallRig(t, 1)
	s, err := r.open(context.Background(), "echo")
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	r.refuse.Store(true)

	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_, err = r.open(ctx, "echo")
	var de *dialError
	if !errors.As(err, &de) || de.reason != "connect" {
		t.Errorf("open with the one connection full, B refusing new ones: %v (%T), want the refused dial's error (connect)", err, err)
	}
	if got := r.fails.Load(); got != 1 {
		t.Errorf("%d refused dials for one open, want 1", got)
	}
}
