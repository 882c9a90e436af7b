package hbone

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2/hpack"
)

// The known HTTP/2 denial-of-service attacks, played by a hostile peer
// that holds a valid certificate (any meshed workload can reach any
// node's agent): real TLS over loopback TCP, frames written by hand.
// docs/tunnel.md, "HTTP/2 abuse (session 10)", lists them.

// attacker is a hand-driven HTTP/2 client over real TLS.
type attacker struct {
	t      *testing.T
	tc     *tls.Conn
	srv    chan *Conn
	srvErr chan error
	sc     *Conn
	frames chan rawFrame // nil when the attacker does not read
}

type attackOpts struct {
	// noRead: never read what the server sends (its socket fills).
	noRead bool
	// noPreface: stop after the TLS handshake.
	noPreface bool
	// pipe: TLS over a synchronous net.Pipe instead of loopback TCP, so
	// a peer that does not read blocks the server's writes at once. Over
	// TCP the kernel buffers megabytes first (autotuning, up to 32 MiB
	// here), and with fixed small buffers the many small segments of
	// control frames made it drop segments and back off for seconds.
	pipe bool
}

func newAttacker(t *testing.T, cfg Config, o attackOpts, handler func(*Stream)) *attacker {
	t.Helper()
	ccfg, scfg := testTLS(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	a := &attacker{t: t, srv: make(chan *Conn, 1), srvErr: make(chan error, 1)}
	cfg.PingInterval = -1
	var raw, srvRaw net.Conn
	if o.pipe {
		raw, srvRaw = net.Pipe()
		t.Cleanup(func() { srvRaw.Close() })
	}
	go func() {
		if srvRaw == nil {
			var err error
			if srvRaw, err = ln.Accept(); err != nil {
				a.srvErr <- err
				return
			}
		}
		c, err := Server(context.Background(), srvRaw, scfg, cfg, nil, handler)
		if err != nil {
			a.srvErr <- err
			return
		}
		a.srv <- c
	}()
	if raw == nil {
		if raw, err = net.Dial("tcp", ln.Addr().String()); err != nil {
			t.Fatal(err)
		}
	}
	a.tc = tls.Client(raw, ccfg)
	t.Cleanup(func() { a.tc.Close() })
	if err := a.tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	if o.noPreface {
		return a
	}
	// A peer that does not read still takes the server's SETTINGS (over
	// a pipe the server's first write waits for it), then stops.
	a.frames = make(chan rawFrame, 1<<16)
	go func() {
		defer close(a.frames)
		var hb [frameHeaderLen]byte
		for {
			if _, err := io.ReadFull(a.tc, hb[:]); err != nil {
				return
			}
			h := parseFrameHeader(hb[:])
			b := make([]byte, h.Length)
			if _, err := io.ReadFull(a.tc, b); err != nil {
				return
			}
			select {
			case a.frames <- rawFrame{h, b}:
			default: // the test looks for a GOAWAY; drop the excess
			}
			if o.noRead && h.Type == frameSettings {
				return
			}
		}
	}()
	a.write(append([]byte(clientPreface), appendSettings(nil)...))
	return a
}

// server is the server side of the connection once it is set up.
func (a *attacker) server() *Conn {
	a.t.Helper()
	if a.sc == nil {
		select {
		case a.sc = <-a.srv:
			a.t.Cleanup(func() { a.sc.Close() })
		case err := <-a.srvErr:
			a.t.Fatalf("server: %v", err)
		case <-time.After(5 * time.Second):
			a.t.Fatal("server connection not set up within 5 s")
		}
	}
	return a.sc
}

// write sends b; failures are ignored (the server may have hung up,
// which the test then checks).
func (a *attacker) write(b []byte) error {
	_ = a.tc.SetWriteDeadline(time.Now().Add(5 * time.Second))
	_, err := a.tc.Write(b)
	return err
}

// goAway waits for the server's GOAWAY and returns its error code.
func (a *attacker) goAway(within time.Duration) (ErrCode, bool) {
	deadline := time.After(within)
	for {
		select {
		case f, ok := <-a.frames:
			if !ok {
				return 0, false
			}
			if f.h.Type == frameGoAway && len(f.p) >= 8 {
				code := ErrCode(binary.BigEndian.Uint32(f.p[4:]))
				if code != ErrCodeNo {
					return code, true
				}
			}
		case <-deadline:
			return 0, false
		}
	}
}

// wantGoAway fails the test unless the server ends the connection with
// code (its GOAWAY read, and the server's Conn done).
func (a *attacker) wantGoAway(code ErrCode, what string) {
	a.t.Helper()
	got, ok := a.goAway(5 * time.Second)
	if !ok {
		a.t.Fatalf("%s: no GOAWAY within 5 s (server error: %v)", what, a.server().Err())
	}
	if got != code {
		a.t.Fatalf("%s: GOAWAY %v, want %v (server error: %v)", what, got, code, a.server().Err())
	}
}

// wantClosed fails the test unless the server's Conn ends within d, its
// error containing msg.
func (a *attacker) wantClosed(d time.Duration, msg, what string) {
	a.t.Helper()
	c := a.server()
	select {
	case <-c.Done():
	case <-time.After(d):
		a.t.Fatalf("%s: server connection still open after %v", what, d)
	}
	if err := c.Err(); err == nil || !strings.Contains(err.Error(), msg) {
		a.t.Fatalf("%s: server ended with %v, want an error containing %q", what, err, msg)
	}
}

func headersFrame(id uint32, end bool) []byte {
	flags := uint8(flagEndHeaders)
	if end {
		flags |= flagEndStream
	}
	return frameBytes(frameHeaders, flags, id, connectBlock("10.0.0.1:80"))
}

// TestRapidResetBoundsHandlers (CVE-2023-44487): HEADERS then RST_STREAM,
// over and over. A reset frees the stream's slot at once, so
// MAX_CONCURRENT_STREAMS bounded nothing: every CONNECT started a handler
// (the agent's authorizes and dials the app, and carries on after the
// reset), 2,000 of them at once here. Handlers in flight are now at most
// MAX_CONCURRENT_STREAMS, the streams beyond wait in a queue (a reset
// one never starts), and a peer that fills the queue (4x the limit, as
// x/net) is sent away with ENHANCE_YOUR_CALM.
func TestRapidResetBoundsHandlers(t *testing.T) {
	const limit = 10
	var running, peak atomic.Int32
	release := make(chan struct{})
	defer close(release)
	a := newAttacker(t, Config{MaxConcurrentStreams: limit}, attackOpts{}, func(s *Stream) {
		n := running.Add(1)
		for {
			p := peak.Load()
			if n <= p || peak.CompareAndSwap(p, n) {
				break
			}
		}
		<-release // a dial to an app that does not answer
		running.Add(-1)
	})
	var b []byte
	for id := uint32(1); id < 4000; id += 2 {
		b = append(b, headersFrame(id, false)...)
		b = append(b, appendRST(nil, id, ErrCodeCancel)...)
	}
	a.write(b)
	code, ok := a.goAway(5 * time.Second)
	if p := peak.Load(); p > limit {
		t.Errorf("%d handlers ran at once, MAX_CONCURRENT_STREAMS is %d", p, limit)
	}
	if !ok || code != ErrCodeEnhanceYourCalm {
		t.Errorf("GOAWAY %v (received: %v), want ENHANCE_YOUR_CALM", code, ok)
	}
}

// TestQueuedStreamStartsWhenAHandlerEnds: a stream queued behind
// handlers still running for reset streams is served once one of them
// ends; one reset while queued never reaches the handler.
func TestQueuedStreamStartsWhenAHandlerEnds(t *testing.T) {
	release := make(chan struct{})
	var started sync.Map
	a := newAttacker(t, Config{MaxConcurrentStreams: 2}, attackOpts{}, func(s *Stream) {
		started.Store(s.ID(), true)
		if s.ID() <= 3 {
			<-release
			return
		}
		s.Respond(200, nil)
	})
	var b []byte
	for _, id := range []uint32{1, 3} {
		b = append(b, headersFrame(id, false)...)
		b = append(b, appendRST(nil, id, ErrCodeCancel)...)
	}
	b = append(b, headersFrame(5, false)...) // queued: two handlers run
	b = append(b, headersFrame(7, false)...) // queued, then reset
	b = append(b, appendRST(nil, 7, ErrCodeCancel)...)
	a.write(b)
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, ok1 := started.Load(uint32(1))
		_, ok3 := started.Load(uint32(3))
		if ok1 && ok3 || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond)
	if _, ok := started.Load(uint32(5)); ok {
		t.Fatal("stream 5's handler started while two handlers ran (limit 2)")
	}
	release <- struct{}{} // one handler ends
	f := nextFrame(t, a.frames, "the response to stream 5", func(f rawFrame) bool { return f.h.Type == frameHeaders })
	if f.h.StreamID != 5 {
		t.Fatalf("response on stream %d, want 5", f.h.StreamID)
	}
	close(release)
	time.Sleep(50 * time.Millisecond)
	if _, ok := started.Load(uint32(7)); ok {
		t.Error("stream 7, reset while queued, reached the handler")
	}
	if n := a.server().ActiveStreams(); n != 1 {
		t.Errorf("%d active streams, want 1 (stream 5)", n)
	}
}

// TestHeaderBlockBoundedWhileAccumulating (CONTINUATION flood,
// CVE-2024-27316 family): HEADERS without END_HEADERS and CONTINUATION
// after CONTINUATION. The block is capped while it accumulates (twice
// MAX_HEADER_LIST_SIZE), not when it ends, which it never does.
func TestHeaderBlockBoundedWhileAccumulating(t *testing.T) {
	a := newAttacker(t, Config{MaxHeaderListSize: 16 << 10}, attackOpts{}, func(s *Stream) { s.Respond(200, nil) })
	frag := bytes.Repeat([]byte{0x80 | 62}, 16<<10) // indexed fields
	a.write(frameBytes(frameHeaders, 0, 1, frag))
	for i := 0; i < 256; i++ { // 4 MiB
		if a.write(frameBytes(frameContinuation, 0, 1, frag)) != nil {
			break
		}
	}
	a.wantGoAway(ErrCodeEnhanceYourCalm, "CONTINUATION flood")
	<-a.server().Done() // the read loop has ended: hblock is the test's
	if n := cap(a.server().hblock); n > 64<<10 {
		t.Errorf("header block buffer grew to %d bytes", n)
	}
}

// TestOneFrameHeaderBlockBounded: a block that ends in its first frame
// (up to MaxFrameSize, 1 MiB) is held to the same cap before it is
// decoded; it was decoded in full, and only the decoded list was refused.
func TestOneFrameHeaderBlockBounded(t *testing.T) {
	a := newAttacker(t, Config{MaxHeaderListSize: 16 << 10}, attackOpts{}, func(s *Stream) { s.Respond(200, nil) })
	block := append(connectBlock("10.0.0.1:80"), bytes.Repeat([]byte{0x80 | 62}, 256<<10)...)
	a.write(frameBytes(frameHeaders, flagEndHeaders, 1, block))
	a.wantGoAway(ErrCodeEnhanceYourCalm, "a 256 KiB header block in one frame")
}

// TestHeaderListLimitStopsDecoding: a small block that expands to a huge
// header list (one dynamic-table entry of 4 KiB, referenced by one byte
// each) is refused with RST_STREAM, and the connection goes on.
func TestHeaderListLimitStopsDecoding(t *testing.T) {
	a := newAttacker(t, Config{MaxHeaderListSize: 16 << 10}, attackOpts{}, func(s *Stream) { s.Respond(200, nil) })
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	enc.WriteField(hpack.HeaderField{Name: ":method", Value: "CONNECT"})
	enc.WriteField(hpack.HeaderField{Name: ":authority", Value: "10.0.0.1:80"})
	enc.WriteField(hpack.HeaderField{Name: "x", Value: strings.Repeat("v", 4000)})
	block := append(hb.Bytes(), bytes.Repeat([]byte{0x80 | 62}, 20000)...) // 80 MB listed
	a.write(frameBytes(frameHeaders, flagEndHeaders, 1, block))
	f := nextFrame(t, a.frames, "RST_STREAM for the oversized list", func(f rawFrame) bool { return f.h.Type == frameRSTStream })
	if f.h.StreamID != 1 {
		t.Fatalf("RST_STREAM on %d", f.h.StreamID)
	}
	// The connection lives on (the HPACK state is intact).
	a.write(headersFrame(3, false))
	nextFrame(t, a.frames, "a response on stream 3", func(f rawFrame) bool { return f.h.Type == frameHeaders && f.h.StreamID == 3 })
}

// TestControlFrameFloods (CVE-2019-9512 ping, 9515 settings, 9514
// reset): a peer that sends frames we must answer and never reads the
// answers. The answers queued without limit (17 bytes per PING, 9 per
// SETTINGS ACK, 13 per RST_STREAM); now the connection is closed once
// more than maxQueuedControl of them wait, as x/net does (10,000).
func TestControlFrameFloods(t *testing.T) {
	ping := frameBytes(framePing, 0, 0, make([]byte, 8))
	settings := appendSettings(nil)
	for _, tc := range []struct {
		name  string
		frame func(i int) []byte
	}{
		{"ping", func(int) []byte { return ping }},
		{"settings", func(int) []byte { return settings }},
		// A CONNECT without :authority: refused with RST_STREAM.
		{"reset", func(i int) []byte {
			var hb bytes.Buffer
			hpack.NewEncoder(&hb).WriteField(hpack.HeaderField{Name: ":method", Value: "CONNECT"})
			return frameBytes(frameHeaders, flagEndHeaders|flagEndStream, uint32(2*i+1), hb.Bytes())
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := newAttacker(t, Config{}, attackOpts{noRead: true, pipe: true}, func(s *Stream) { s.Respond(200, nil) })
			sc := a.server()
			const n = 200000
			var b []byte
			for i := 0; i < n; i++ {
				b = append(b, tc.frame(i)...)
				if len(b) > 64<<10 {
					if a.write(b) != nil {
						break
					}
					b = b[:0]
				}
			}
			a.write(b)
			// Measure once the server has read them all (or hung up).
			deadline := time.Now().Add(5 * time.Second)
			for sc.frames.Load() < n && time.Now().Before(deadline) {
				select {
				case <-sc.Done():
					deadline = time.Now()
				case <-time.After(time.Millisecond):
				}
			}
			sc.ctlMu.Lock()
			queued := len(sc.ctl)
			sc.ctlMu.Unlock()
			if queued > 300<<10 {
				t.Errorf("%d bytes of answers queued for a peer that reads nothing", queued)
			}
			a.wantClosed(5*time.Second, "control frames", tc.name+" flood")
		})
	}
}

// TestUselessFrameFloods (CVE-2019-9518, 9513): frames that cost a read
// and a dispatch but do nothing. Each was accepted without end; now a
// run of empty frames (DATA without END_STREAM, CONTINUATION, unknown
// types) is cut after maxEmptyFrames, PRIORITY frames are allowed 100
// per stream opened and WINDOW_UPDATEs 10 per DATA frame sent (Envoy's
// budgets), and the connection ends with ENHANCE_YOUR_CALM.
func TestUselessFrameFloods(t *testing.T) {
	for _, tc := range []struct {
		name  string
		open  bool // open stream 1 first
		frame []byte
	}{
		{"empty DATA", true, frameBytes(frameData, 0, 1, nil)},
		{"empty CONTINUATION", false, frameBytes(frameContinuation, 0, 1, nil)},
		{"unknown type", false, frameBytes(0x20, 0, 0, nil)},
		{"PRIORITY", false, frameBytes(framePriority, 0, 1, []byte{0, 0, 0, 0, 16})},
		{"WINDOW_UPDATE", true, appendWindowUpdate(nil, 0, 1)},
		{"stream WINDOW_UPDATE", true, appendWindowUpdate(nil, 1, 1)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := newAttacker(t, Config{}, attackOpts{}, func(s *Stream) {
				s.Respond(200, nil)
				io.Copy(io.Discard, s)
			})
			var b []byte
			if tc.open {
				b = append(b, headersFrame(1, false)...)
			}
			if tc.name == "empty CONTINUATION" {
				b = append(b, frameBytes(frameHeaders, 0, 1, connectBlock("10.0.0.1:80"))...)
			}
			for i := 0; i < 20000; i++ {
				b = append(b, tc.frame...)
			}
			a.write(b)
			a.wantGoAway(ErrCodeEnhanceYourCalm, tc.name)
		})
	}
}

// TestResetOfIdleStream: RST_STREAM on a stream never opened is a
// connection error (RFC 9113 §6.4); it was ignored.
func TestResetOfIdleStream(t *testing.T) {
	a := newAttacker(t, Config{}, attackOpts{}, nil)
	a.write(appendRST(nil, 101, ErrCodeCancel))
	a.wantGoAway(ErrCodeProtocol, "RST_STREAM on an idle stream")
}

// TestSettingsAbuse: a SETTINGS frame of more than 100 entries or with
// duplicates is refused (x/net's rule: applying each entry walked every
// stream, so one 1 MiB frame of INITIAL_WINDOW_SIZE entries cost 175,000
// walks); an INITIAL_WINDOW_SIZE that pushes a stream's send window past
// 2^31-1 is a FLOW_CONTROL_ERROR (RFC 9113 §6.9.2), it was taken.
func TestSettingsAbuse(t *testing.T) {
	t.Run("many", func(t *testing.T) {
		a := newAttacker(t, Config{}, attackOpts{}, nil)
		ss := make([]setting, 1000)
		for i := range ss {
			ss[i] = setting{settingInitialWindowSize, uint32(65535 + i)}
		}
		a.write(appendSettings(nil, ss...))
		a.wantGoAway(ErrCodeProtocol, "1,000 settings in one frame")
	})
	t.Run("overflow", func(t *testing.T) {
		a := newAttacker(t, Config{}, attackOpts{}, func(s *Stream) {
			s.Respond(200, nil)
			io.Copy(io.Discard, s)
		})
		b := headersFrame(1, false)
		b = appendWindowUpdate(b, 1, maxWindow-65535) // the stream's window: 2^31-1
		b = appendSettings(b, setting{settingInitialWindowSize, 1 << 20})
		a.write(b)
		a.wantGoAway(ErrCodeFlowControl, "INITIAL_WINDOW_SIZE overflowing a window")
	})
}

// TestSlowPreface: a peer that completes TLS and then sends nothing, or
// only the preface, held the connection (and the agent's goroutine in
// Server) for ever. Now the preface and the first SETTINGS must arrive
// within prefaceTimeout (10 s, x/net's).
func TestSlowPreface(t *testing.T) {
	defer func(d time.Duration) { prefaceTimeout = d }(prefaceTimeout)
	prefaceTimeout = 300 * time.Millisecond
	t.Run("no preface", func(t *testing.T) {
		a := newAttacker(t, Config{}, attackOpts{noPreface: true}, nil)
		select {
		case err := <-a.srvErr:
			if !errors.Is(err, errSlowPreface) {
				t.Fatalf("Server: %v, want %v", err, errSlowPreface)
			}
		case <-a.srv:
			t.Fatal("Server succeeded without a preface")
		case <-time.After(5 * time.Second):
			t.Fatal("Server still waiting for the preface after 5 s")
		}
	})
	t.Run("no settings", func(t *testing.T) {
		a := newAttacker(t, Config{}, attackOpts{noPreface: true}, nil)
		a.write([]byte(clientPreface))
		a.wantClosed(5*time.Second, "SETTINGS", "preface without SETTINGS")
	})
	t.Run("settings in time", func(t *testing.T) {
		a := newAttacker(t, Config{}, attackOpts{}, func(s *Stream) { s.Respond(200, nil) })
		// Taken from the server goroutine: its read of prefaceTimeout
		// then happens before the restore above (-race).
		a.server()
		time.Sleep(2 * prefaceTimeout) // idle after the SETTINGS: fine
		a.write(headersFrame(1, false))
		nextFrame(t, a.frames, "a response on stream 1", func(f rawFrame) bool { return f.h.Type == frameHeaders && f.h.StreamID == 1 })
	})
}

// TestStalledPeerSendBuffersBounded: a peer opens 200 streams to an app
// that streams, grants large windows, reads 200 MiB (every pump is then
// in its streaming mode, reading up to AppReadSize) and stops reading.
// Each pump waits for the write lock holding its buffer: 200 x 512 KiB
// (a 256 KiB read took the next size class) = 110 MiB of heap for one
// connection. Now the size classes fit and at most maxBigReads pumps
// read more than a frame: 7.7 MiB measured.
func TestStalledPeerSendBuffersBounded(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	big := make([]byte, 1<<20)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
			go func() {
				for {
					if _, err := c.Write(big); err != nil {
						return
					}
				}
			}()
		}
	}()
	time.Sleep(100 * time.Millisecond)
	runtime.GC()
	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	a := newAttacker(t, Config{}, attackOpts{noRead: true}, func(s *Stream) {
		app, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			return
		}
		s.Respond(200, nil)
		s.Splice(app.(*net.TCPConn))
	})
	b := appendSettings(nil, setting{settingInitialWindowSize, 1 << 30})
	b = appendWindowUpdate(b, 0, 1<<30)
	for id := uint32(1); id < 400; id += 2 {
		b = append(b, headersFrame(id, false)...)
	}
	a.write(b)
	for range a.frames { // up to the server's SETTINGS: the rest is ours
	}
	// Only a bound against a hang: under -race on a loaded machine the
	// 200 MiB took 11 to 23 s, and a 20 s deadline failed the test.
	_ = a.tc.SetReadDeadline(time.Now().Add(2 * time.Minute))
	if _, err := io.CopyN(io.Discard, a.tc, 200<<20); err != nil {
		t.Fatalf("reading the streams: %v", err)
	}
	time.Sleep(time.Second) // every pump reaches the write lock
	runtime.GC()
	runtime.ReadMemStats(&m1)
	grew := int64(m1.HeapInuse) - int64(m0.HeapInuse)
	t.Logf("%d streams, heap in use +%.1f MiB", a.server().ActiveStreams(), float64(grew)/(1<<20))
	if a.server().ActiveStreams() != 200 {
		t.Fatalf("%d streams open, want 200", a.server().ActiveStreams())
	}
	if grew > 32<<20 {
		t.Errorf("a peer that stopped reading holds %.1f MiB of heap on one connection", float64(grew)/(1<<20))
	}
}

// TestStreamsBeyondTheLimitRefused: HEADERS beyond MAX_CONCURRENT_STREAMS
// (streams still open, unlike a rapid reset's) are refused with
// RST_STREAM REFUSED_STREAM, no handler started; the connection goes on.
func TestStreamsBeyondTheLimitRefused(t *testing.T) {
	var started atomic.Int32
	release := make(chan struct{})
	defer close(release)
	a := newAttacker(t, Config{MaxConcurrentStreams: 2}, attackOpts{}, func(s *Stream) {
		started.Add(1)
		s.Respond(200, nil)
		<-release
	})
	a.write(append(append(headersFrame(1, false), headersFrame(3, false)...), headersFrame(5, false)...))
	f := nextFrame(t, a.frames, "RST_STREAM", func(f rawFrame) bool { return f.h.Type == frameRSTStream })
	if f.h.StreamID != 5 || ErrCode(binary.BigEndian.Uint32(f.p)) != ErrCodeRefusedStream {
		t.Fatalf("RST_STREAM %v on stream %d, want REFUSED_STREAM on 5", ErrCode(binary.BigEndian.Uint32(f.p)), f.h.StreamID)
	}
	time.Sleep(50 * time.Millisecond)
	if n := started.Load(); n != 2 {
		t.Errorf("%d handlers started, want 2", n)
	}
	select {
	case <-a.server().Done():
		t.Fatalf("connection closed: %v", a.server().Err())
	default:
	}
}
