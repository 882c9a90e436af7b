package hbone

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Frame types and flags (RFC 9113 §6).
const (
	frameData         = 0x0
	frameHeaders      = 0x1
	framePriority     = 0x2
	frameRSTStream    = 0x3
	frameSettings     = 0x4
	framePushPromise  = 0x5
	framePing         = 0x6
	frameGoAway       = 0x7
	frameWindowUpdate = 0x8
	frameContinuation = 0x9

	flagEndStream  = 0x1
	flagAck        = 0x1
	flagEndHeaders = 0x4
	flagPadded     = 0x8
	flagPriority   = 0x20
)

// Settings identifiers.
const (
	settingHeaderTableSize      = 0x1
	settingEnablePush           = 0x2
	settingMaxConcurrentStreams = 0x3
	settingInitialWindowSize    = 0x4
	settingMaxFrameSize         = 0x5
	settingMaxHeaderListSize    = 0x6
)

// ErrCode is an HTTP/2 error code.
type ErrCode uint32

// Error codes used here.
const (
	ErrCodeNo                 ErrCode = 0x0
	ErrCodeProtocol           ErrCode = 0x1
	ErrCodeInternal           ErrCode = 0x2
	ErrCodeFlowControl        ErrCode = 0x3
	ErrCodeSettingsTimeout    ErrCode = 0x4
	ErrCodeStreamClosed       ErrCode = 0x5
	ErrCodeFrameSize          ErrCode = 0x6
	ErrCodeRefusedStream      ErrCode = 0x7
	ErrCodeCancel             ErrCode = 0x8
	ErrCodeCompression        ErrCode = 0x9
	ErrCodeConnect            ErrCode = 0xa
	ErrCodeEnhanceYourCalm    ErrCode = 0xb
	ErrCodeInadequateSecurity ErrCode = 0xc
)

func (c ErrCode) String() string {
	names := [...]string{"NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "FLOW_CONTROL_ERROR",
		"SETTINGS_TIMEOUT", "STREAM_CLOSED", "FRAME_SIZE_ERROR", "REFUSED_STREAM", "CANCEL",
		"COMPRESSION_ERROR", "CONNECT_ERROR", "ENHANCE_YOUR_CALM", "INADEQUATE_SECURITY"}
	if int(c) < len(names) {
		return names[c]
	}
	return fmt.Sprintf("ERR_%#x", uint32(c))
}

const (
	frameHeaderLen = 9
	// maxFrameSizeLimit is the largest SETTINGS_MAX_FRAME_SIZE allowed.
	maxFrameSizeLimit = 1<<24 - 1
	defaultMaxFrame   = 16384
	maxWindow         = 1<<31 - 1
	clientPreface     = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
)

// frameHeader is the 9-byte frame header.
type frameHeader struct {
	Length   uint32
	Type     uint8
	Flags    uint8
	StreamID uint32
}

func parseFrameHeader(b []byte) frameHeader {
	return frameHeader{
		Length:   uint32(b[0])<<16 | uint32(b[1])<<8 | uint32(b[2]),
		Type:     b[3],
		Flags:    b[4],
		StreamID: binary.BigEndian.Uint32(b[5:9]) & (1<<31 - 1),
	}
}

func putFrameHeader(b []byte, h frameHeader) {
	b[0], b[1], b[2] = byte(h.Length>>16), byte(h.Length>>8), byte(h.Length)
	b[3], b[4] = h.Type, h.Flags
	binary.BigEndian.PutUint32(b[5:9], h.StreamID&(1<<31-1))
}

func appendFrame(dst []byte, typ, flags uint8, streamID uint32, payload []byte) []byte {
	var h [frameHeaderLen]byte
	putFrameHeader(h[:], frameHeader{Length: uint32(len(payload)), Type: typ, Flags: flags, StreamID: streamID})
	dst = append(dst, h[:]...)
	return append(dst, payload...)
}

// connError is a connection error: the connection is closed with GOAWAY.
type connError struct {
	Code ErrCode
	Msg  string
}

func (e connError) Error() string {
	return fmt.Sprintf("hbone: connection error %v: %s", e.Code, e.Msg)
}

// StreamError is a stream error: the stream was reset (by either side).
type StreamError struct {
	Code   ErrCode
	Remote bool // reset by the peer
}

func (e StreamError) Error() string {
	who := "local"
	if e.Remote {
		who = "peer"
	}
	return fmt.Sprintf("hbone: stream reset by %s: %v", who, e.Code)
}

// setting is one SETTINGS parameter.
type setting struct {
	ID  uint16
	Val uint32
}

// parseSettings validates a SETTINGS payload (RFC 9113 §6.5).
func parseSettings(h frameHeader, p []byte) ([]setting, error) {
	if h.StreamID != 0 {
		return nil, connError{ErrCodeProtocol, "SETTINGS on a stream"}
	}
	if h.Flags&flagAck != 0 {
		if len(p) != 0 {
			return nil, connError{ErrCodeFrameSize, "SETTINGS ack with payload"}
		}
		return nil, nil
	}
	if len(p)%6 != 0 {
		return nil, connError{ErrCodeFrameSize, "SETTINGS length not a multiple of 6"}
	}
	if len(p)/6 > maxSettings {
		return nil, connError{ErrCodeProtocol, fmt.Sprintf("SETTINGS with %d entries (at most %d)", len(p)/6, maxSettings)}
	}
	out := make([]setting, 0, len(p)/6)
	for i := 0; i < len(p); i += 6 {
		s := setting{binary.BigEndian.Uint16(p[i:]), binary.BigEndian.Uint32(p[i+2:])}
		for _, o := range out {
			if o.ID == s.ID {
				return nil, connError{ErrCodeProtocol, fmt.Sprintf("SETTINGS with setting %#x twice", s.ID)}
			}
		}
		switch s.ID {
		case settingEnablePush:
			if s.Val > 1 {
				return nil, connError{ErrCodeProtocol, "ENABLE_PUSH not 0 or 1"}
			}
		case settingInitialWindowSize:
			if s.Val > maxWindow {
				return nil, connError{ErrCodeFlowControl, "INITIAL_WINDOW_SIZE too large"}
			}
		case settingMaxFrameSize:
			if s.Val < defaultMaxFrame || s.Val > maxFrameSizeLimit {
				return nil, connError{ErrCodeProtocol, "MAX_FRAME_SIZE out of range"}
			}
		}
		out = append(out, s)
	}
	return out, nil
}

func appendSettings(dst []byte, ss ...setting) []byte {
	p := make([]byte, 0, 6*len(ss))
	for _, s := range ss {
		p = binary.BigEndian.AppendUint16(p, s.ID)
		p = binary.BigEndian.AppendUint32(p, s.Val)
	}
	return appendFrame(dst, frameSettings, 0, 0, p)
}

func appendWindowUpdate(dst []byte, streamID, incr uint32) []byte {
	var p [4]byte
	binary.BigEndian.PutUint32(p[:], incr&(1<<31-1))
	return appendFrame(dst, frameWindowUpdate, 0, streamID, p[:])
}

func appendRST(dst []byte, streamID uint32, code ErrCode) []byte {
	var p [4]byte
	binary.BigEndian.PutUint32(p[:], uint32(code))
	return appendFrame(dst, frameRSTStream, 0, streamID, p[:])
}

func appendGoAway(dst []byte, lastStream uint32, code ErrCode, debug string) []byte {
	p := make([]byte, 8, 8+len(debug))
	binary.BigEndian.PutUint32(p, lastStream&(1<<31-1))
	binary.BigEndian.PutUint32(p[4:], uint32(code))
	p = append(p, debug...)
	return appendFrame(dst, frameGoAway, 0, 0, p)
}

// dataPayload strips padding from a DATA frame, returning the data.
func dataPayload(h frameHeader, p []byte) ([]byte, error) {
	if h.Flags&flagPadded == 0 {
		return p, nil
	}
	if len(p) < 1 {
		return nil, connError{ErrCodeFrameSize, "padded DATA without pad length"}
	}
	pad := int(p[0])
	if pad >= len(p) {
		return nil, connError{ErrCodeProtocol, "DATA padding exceeds payload"}
	}
	return p[1 : len(p)-pad], nil
}

// headerBlockFragment strips padding and priority from a HEADERS payload.
func headerBlockFragment(h frameHeader, p []byte) ([]byte, error) {
	pad := 0
	if h.Flags&flagPadded != 0 {
		if len(p) < 1 {
			return nil, connError{ErrCodeFrameSize, "padded HEADERS without pad length"}
		}
		pad = int(p[0])
		p = p[1:]
	}
	if h.Flags&flagPriority != 0 {
		if len(p) < 5 {
			return nil, connError{ErrCodeFrameSize, "HEADERS priority truncated"}
		}
		if binary.BigEndian.Uint32(p)&(1<<31-1) == h.StreamID {
			return nil, connError{ErrCodeProtocol, "stream depends on itself"}
		}
		p = p[5:]
	}
	if pad > len(p) {
		return nil, connError{ErrCodeProtocol, "HEADERS padding exceeds payload"}
	}
	return p[:len(p)-pad], nil
}

var errShortFrame = errors.New("hbone: truncated frame")

// readFull is io.ReadFull with a clearer error for a truncated frame.
func readFull(r io.Reader, b []byte) error {
	_, err := io.ReadFull(r, b)
	if err == io.ErrUnexpectedEOF {
		return errShortFrame
	}
	return err
}
