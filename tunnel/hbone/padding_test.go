package hbone

import (
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"

	"golang.org/x/net/http2/hpack"
)

// TestPaddingReturnsStreamWindow: padding counts against flow control
// (RFC 9113 §6.1), so a DATA frame's padding is given back to the
// stream's window as well as the connection's once the frame is read.
// Only the data was: a peer padding its DATA saw the stream's window
// shrink by the padding of every frame, for good, and here (a stream
// window of padded frames, one byte of data each) it never got a
// WINDOW_UPDATE and stalled.
func TestPaddingReturnsStreamWindow(t *testing.T) {
	const window = 64 << 10
	cli, srvSide := net.Pipe()
	defer cli.Close()
	updated := make(chan uint32, 64)
	go func() {
		var hb [frameHeaderLen]byte
		for {
			if _, err := io.ReadFull(cli, hb[:]); err != nil {
				return
			}
			h := parseFrameHeader(hb[:])
			p := make([]byte, h.Length)
			if _, err := io.ReadFull(cli, p); err != nil {
				return
			}
			if h.Type == frameWindowUpdate && h.StreamID == 1 && len(p) == 4 {
				updated <- binary.BigEndian.Uint32(p)
			}
		}
	}()
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	enc.WriteField(hpack.HeaderField{Name: ":method", Value: "CONNECT"})
	enc.WriteField(hpack.HeaderField{Name: ":authority", Value: "10.0.0.1:80"})
	in := append([]byte(clientPreface), appendSettings(nil)...)
	in = append(in, frameBytes(frameHeaders, flagEndHeaders, 1, hb.Bytes())...)
	// Frames of 1 + 1 + 255 bytes: pad length, one byte of data, padding.
	frame := make([]byte, 257)
	frame[0], frame[1] = 255, 'x'
	sent := 0
	for sent+len(frame) <= window {
		in = append(in, frameBytes(frameData, flagPadded, 1, frame)...)
		sent += len(frame)
	}
	go cli.Write(in)
	c, err := NewServerConn(srvSide, nil, Config{StreamWindow: window, PingInterval: -1}, func(s *Stream) {
		s.Respond(200, nil)
		io.Copy(io.Discard, s)
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	select {
	case n := <-updated:
		t.Logf("WINDOW_UPDATE of %d after %d bytes of padded DATA", n, sent)
	case <-time.After(2 * time.Second):
		t.Fatalf("no WINDOW_UPDATE for the stream after its whole window (%d bytes, %d of them data) was read by the app: the sender stalls", sent, sent/len(frame))
	}
}
