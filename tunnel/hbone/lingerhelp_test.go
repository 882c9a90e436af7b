package hbone

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"testing"
	"time"
)

// heldDownload is a handler that answers 200 and sends download, then
// ends its side, once release is closed; holding is closed as it starts
// (one stream only).
func heldDownload(download []byte) (handler func(*Stream), holding, release chan struct{}) {
	holding = make(chan struct{})
	release = make(chan struct{})
	return func(s *Stream) {
		close(holding)
		<-release
		s.Respond(200, nil)
		s.Write(download)
		s.CloseWrite()
	}, holding, release
}

// readDownload reads s's answer, which must be 200, and all of its body,
// which must be want, in the background; the error says how many bytes
// were read.
func readDownload(s *Stream, want []byte) <-chan error {
	got := make(chan error, 1)
	go func() {
		if st, _, err := s.Response(context.Background()); err != nil || st != 200 {
			got <- fmt.Errorf("response %d, %v", st, err)
			return
		}
		b, err := io.ReadAll(s)
		if err == nil && !bytes.Equal(b, want) {
			err = fmt.Errorf("%d bytes, not the %d sent", len(b), len(want))
		}
		if err != nil {
			err = fmt.Errorf("%v (%d of %d bytes read)", err, len(b), len(want))
		}
		got <- err
	}()
	return got
}

// awaitFinalGoAway waits until sc's Shutdown has queued its final
// GOAWAY (finalSent), 10 s at most.
func awaitFinalGoAway(t *testing.T, sc *Conn) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		sc.mu.Lock()
		final := sc.finalSent
		sc.mu.Unlock()
		if final {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("Shutdown sent no final GOAWAY within 10 s")
		}
	}
}

// keepPinging has a's client send a PING every 50 ms until the test ends
// or a write fails: a peer that keeps sending, whose bytes are the
// link's progress to a linger.
func keepPinging(t *testing.T, a *attacker) {
	stop := make(chan struct{})
	sent := make(chan struct{})
	go func() {
		defer close(sent)
		ping := appendFrame(nil, framePing, 0, 0, make([]byte, 8))
		for {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			if a.write(ping) != nil {
				return
			}
		}
	}()
	t.Cleanup(func() { close(stop); <-sent })
}
