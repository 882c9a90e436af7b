package hbone

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2/hpack"
)

type rawFrame struct {
	h frameHeader
	p []byte
}

// rawPeer plays the client side of an HTTP/2 connection by hand over a
// synchronous pipe; the frames it reads come out of frames. While
// paused (gate held) it reads nothing more, as a peer that stopped
// reading.
type rawPeer struct {
	c      *Conn
	cli    net.Conn
	frames chan rawFrame
	gate   sync.Mutex
}

func newRawPeer(t *testing.T, cfg Config, handler func(*Stream)) *rawPeer {
	t.Helper()
	cli, srvSide := net.Pipe()
	t.Cleanup(func() { cli.Close(); srvSide.Close() })
	p := &rawPeer{cli: cli, frames: make(chan rawFrame, 4096)}
	go func() {
		defer close(p.frames)
		var hb [frameHeaderLen]byte
		for {
			p.gate.Lock()
			p.gate.Unlock()
			if _, err := io.ReadFull(cli, hb[:]); err != nil {
				return
			}
			h := parseFrameHeader(hb[:])
			b := make([]byte, h.Length)
			if _, err := io.ReadFull(cli, b); err != nil {
				return
			}
			p.frames <- rawFrame{h, b}
		}
	}()
	go cli.Write(append([]byte(clientPreface), appendSettings(nil)...))
	cfg.PingInterval = -1
	c, err := NewServerConn(srvSide, nil, cfg, handler)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	p.c = c
	return p
}

// send writes frames without waiting for them to be read.
func (p *rawPeer) send(b []byte) { go p.cli.Write(b) }

func connectBlock(authority string) []byte {
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	enc.WriteField(hpack.HeaderField{Name: ":method", Value: "CONNECT"})
	enc.WriteField(hpack.HeaderField{Name: ":authority", Value: authority})
	return hb.Bytes()
}

// nextFrame waits for the next frame matching want.
func nextFrame(t *testing.T, frames <-chan rawFrame, what string, want func(rawFrame) bool) rawFrame {
	t.Helper()
	deadline := time.After(5 * time.Second)
	for {
		select {
		case f, ok := <-frames:
			if !ok {
				t.Fatalf("connection ended before %s", what)
			}
			if want(f) {
				return f
			}
		case <-deadline:
			t.Fatalf("no %s within 5 s", what)
		}
	}
}

// TestSettingsDoNotWaitForWriter: a peer's SETTINGS changing the header
// table size, read while one of our writers is blocked on the socket
// (the peer not reading, a bulk transfer's usual state), must not stop
// the read loop. It did: the read loop took the write lock to resize
// the encoder's table and waited behind the blocked writer, reading
// nothing more; two peers doing that wait on each other for good. The
// new limit must still open our next header block.
func TestSettingsDoNotWaitForWriter(t *testing.T) {
	got := make(chan string, 1)
	write := make(chan struct{})
	p := newRawPeer(t, Config{}, func(s *Stream) {
		if err := s.Respond(200, nil); err != nil || s.ID() != 1 {
			return
		}
		// Once the peer has stopped reading: it takes at most the frame
		// it was reading, and the next write blocks holding the lock
		// (were the peer still reading, the window would run out first
		// and the writer would wait for it without the lock).
		<-write
		go s.Write(make([]byte, 64<<10))
		b := make([]byte, 4)
		if _, err := io.ReadFull(s, b); err == nil {
			got <- string(b)
		}
	})
	p.send(frameBytes(frameHeaders, flagEndHeaders, 1, connectBlock("10.0.0.1:80")))
	nextFrame(t, p.frames, "the response to stream 1", func(f rawFrame) bool { return f.h.Type == frameHeaders && f.h.StreamID == 1 })

	// The peer reads nothing more now; wait until a writer holds the
	// write lock, blocked on the pipe.
	p.gate.Lock()
	close(write)
	held := 0
	for deadline := time.Now().Add(5 * time.Second); held < 20; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no writer blocked holding the write lock")
		}
		if p.c.wmu.TryLock() {
			p.c.wmu.Unlock()
			held = 0
			continue
		}
		held++
	}

	in := appendSettings(nil, setting{settingHeaderTableSize, 0})
	in = append(in, frameBytes(frameData, 0, 1, []byte("ping"))...)
	p.send(in)
	select {
	case s := <-got:
		if s != "ping" {
			t.Fatalf("read %q, want ping", s)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("DATA after a header-table SETTINGS never reached the stream: the read loop waits for the blocked writer")
	}

	// The peer reads again; our next header block opens with the size
	// update to 0 (RFC 7541 §6.3: 001xxxxx, value 0).
	p.gate.Unlock()
	p.send(frameBytes(frameHeaders, flagEndHeaders, 3, connectBlock("10.0.0.1:80")))
	f := nextFrame(t, p.frames, "the response to stream 3", func(f rawFrame) bool { return f.h.Type == frameHeaders && f.h.StreamID == 3 })
	if len(f.p) == 0 || f.p[0] != 0x20 {
		t.Fatalf("response block for stream 3 starts % x, want a table size update to 0 (20)", f.p[:min(len(f.p), 4)])
	}
}

// TestEndStreamOnce: CloseWrite and Write racing on one stream send
// END_STREAM exactly once and no DATA after it (RFC 9113 §5.1: the peer
// answers either with STREAM_CLOSED). Concurrent CloseWrite calls each
// passed the "already ended" check before any had written, and each
// wrote its END_STREAM.
func TestEndStreamOnce(t *testing.T) {
	const streams, racers = 40, 6
	var ready sync.WaitGroup
	ready.Add(streams)
	start := make(chan struct{})
	p := newRawPeer(t, Config{}, func(s *Stream) {
		if err := s.Respond(200, nil); err != nil {
			ready.Done()
			return
		}
		ready.Done()
		<-start
		var wg sync.WaitGroup
		for i := range racers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if i%2 == 0 {
					s.CloseWrite()
				} else {
					s.Write([]byte("data"))
				}
			}()
		}
		wg.Wait()
	})
	var in []byte
	for i := range streams {
		in = append(in, frameBytes(frameHeaders, flagEndHeaders, uint32(2*i+1), connectBlock("10.0.0.1:80"))...)
	}
	p.send(in)
	frames := p.frames
	// Take frames as they come (the pipe is synchronous) until every
	// stream ended once, then a little longer for any second END_STREAM.
	ends := map[uint32]int{}
	var bad []string
	go func() { ready.Wait(); close(start) }()
	ended := 0
	quiet := time.After(30 * time.Second)
	for ended < streams {
		select {
		case f, ok := <-frames:
			if !ok {
				t.Fatal("connection ended")
			}
			if f.h.Type != frameData {
				continue
			}
			id := f.h.StreamID
			if ends[id] > 0 {
				bad = append(bad, frameDesc(f))
			}
			if f.h.Flags&flagEndStream != 0 {
				ends[id]++
				if ends[id] == 1 {
					ended++
				}
			}
		case <-quiet:
			t.Fatalf("only %d of %d streams ended", ended, streams)
		}
	}
	for linger := time.After(300 * time.Millisecond); ; {
		select {
		case f := <-frames:
			if f.h.Type == frameData && ends[f.h.StreamID] > 0 {
				bad = append(bad, frameDesc(f))
			}
			continue
		case <-linger:
		}
		break
	}
	if len(bad) > 0 {
		t.Fatalf("%d DATA frames after their stream's END_STREAM, e.g. %s", len(bad), bad[0])
	}
}

func frameDesc(f rawFrame) string {
	return fmt.Sprintf("stream %d: DATA of %d bytes, flags %#x", f.h.StreamID, f.h.Length, f.h.Flags)
}
