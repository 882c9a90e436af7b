package hbone

import (
	"errors"
	"time"
)

// Limits on what one peer may make a connection do. Any meshed workload
// can open an HBONE connection to any node's agent, so HTTP/2 itself must
// not let one peer exhaust the agent's memory or CPU. Each limit follows
// the fix x/net, nghttp2 or Envoy made for the same attack; docs/tunnel.md
// ("HTTP/2 abuse (session 10)") has the table, abuse_test.go the attacks.
const (
	// maxQueuedControl bounds the control frames we owe a peer that does
	// not read them (PING and SETTINGS ACKs, RST_STREAMs, WINDOW_UPDATEs:
	// CVE-2019-9512, 9514, 9515); past it the connection is closed.
	// x/net's maxQueuedControlFrames.
	maxQueuedControl = 10000

	// maxEmptyFrames bounds a run of frames that carry nothing and do
	// nothing (zero-length DATA without END_STREAM, an empty header
	// fragment without END_HEADERS, unknown frame types): each costs a
	// read and a dispatch for no work (CVE-2019-9518). Any other frame
	// ends the run. Envoy's max_consecutive_inbound_frames_with_empty_
	// payload (1 there; our own peers never send two in a row).
	maxEmptyFrames = 100

	// priorityPerStream: PRIORITY frames (ignored here) are allowed this
	// many per stream opened on the connection, plus as many again
	// (CVE-2019-9513). Envoy's max_inbound_priority_frames_per_stream.
	priorityPerStream = 100

	// windowUpdatesPerData: the peer's WINDOW_UPDATEs are allowed
	// 5 + 2*(streams opened + this many per DATA frame we sent): credit
	// is only due for what we sent, and each one wakes every writer
	// waiting for window. Envoy's max_inbound_window_update_frames_per_
	// data_frame_sent, and its formula.
	windowUpdatesPerData = 10

	// windowUpdateUnit: for that budget a DATA frame counts once per
	// this many bytes. Envoy's frames are 16 KiB; ours up to 64 KiB
	// (SendFrameSize) where the peer allows it, and a peer returns
	// credit per bytes its app read, not per frame: x/net (Istio's Go
	// HBONE, whose server allows 1 MiB frames) sends two WINDOW_UPDATEs
	// per app read of 4 KiB or more, 32 per 64 KiB frame, and a whole
	// frame counted once cut such uploads after their first frame.
	windowUpdateUnit = 16 << 10

	// maxSettings bounds the entries of one SETTINGS frame (duplicates
	// are refused too): a change of INITIAL_WINDOW_SIZE walks every
	// stream. x/net's server rule (NumSettings() > 100 || HasDuplicates).
	maxSettings = 100

	// handlerQueueFactor: streams reset while their handler runs free
	// their MAX_CONCURRENT_STREAMS slot but not the handler's work (the
	// agent's authorizes and dials the app). Handlers in flight are at
	// most MaxConcurrentStreams; streams beyond wait, and a peer whose
	// waiting streams exceed this many times the limit is sent away
	// (Rapid Reset, CVE-2023-44487; x/net's unstartedHandlers bound).
	handlerQueueFactor = 4

	// maxBigReads: how many of a connection's streams may hold a read
	// of more than a frame (up to AppReadSize) at once. A pump keeps its
	// buffer while it waits for the write lock, so a peer that drew every
	// stream into streaming and then stopped reading had each hold
	// AppReadSize (54 MiB for 200 streams); now at most this many do,
	// the others a frame (64 KiB). One stream streaming alone, the case
	// the big reads are for, always gets one.
	maxBigReads = 4

	// maxInformational: informational (1xx) responses a client stream
	// skips before its final one; one more resets it (PROTOCOL_ERROR).
	// A CONNECT sees one or two at most (100 Continue, 103 Early
	// Hints); a server that keeps sending them holds the stream
	// short of its response, each block decoded in full. x/net bounds
	// their total size instead (MaxHeaderListSize); a count is the
	// same bound here, each block being within MaxHeaderListSize.
	maxInformational = 16
)

// prefaceTimeout bounds the wait, after the TLS handshake, for a
// client's preface and first SETTINGS (x/net's prefaceTimeout): a peer
// that sends neither held the connection, and the caller of Server, for
// ever. A variable for tests.
var prefaceTimeout = 10 * time.Second

// errSlowPreface: the client sent no preface within prefaceTimeout.
var errSlowPreface = errors.New("hbone: no client preface within the preface timeout")
