package hbone

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2/hpack"
)

// Config tunes a connection. Zero fields take the defaults (ztunnel's).
type Config struct {
	// StreamWindow and ConnWindow are the receive windows we grant:
	// how much the peer may send before we return credit.
	StreamWindow uint32 // default 4 MiB
	ConnWindow   uint32 // default 16 MiB
	// MaxFrameSize is the largest frame we accept (default 1 MiB).
	MaxFrameSize uint32
	// SendFrameSize caps the DATA frames we send (default 64 KiB; also
	// capped by the peer's MAX_FRAME_SIZE).
	SendFrameSize int
	// AppReadSize is the most a stream reads from its app socket at once
	// (default 1 MiB, only while the app streams; at most maxBigReads
	// streams of a connection at once); one read leaves as one burst of
	// DATA frames.
	AppReadSize int
	// SocketReadSize is the most one read(2) takes from the connection's
	// socket (default 256 KiB; negative: as much as crypto/tls asks for,
	// about a record or two). A buffer is held only while it has bytes.
	SocketReadSize int
	// MaxConcurrentStreams a server accepts on one connection (default
	// 200); a client never opens more than the peer allows.
	MaxConcurrentStreams uint32
	// MaxStreamsPerConn is how many streams a client opens on one
	// connection at most (default 100, ztunnel's); the peer's
	// MAX_CONCURRENT_STREAMS may lower it.
	MaxStreamsPerConn uint32
	// MaxHeaderListSize bounds a decoded header block (default 64 KiB).
	MaxHeaderListSize uint32
	// PingInterval: either side pings a connection that received
	// nothing for this long (default 10 s; negative disables);
	// PingTimeout later without any frame it is closed (default 20 s;
	// on a slow link, while the peer's TCP still acknowledges or sends
	// new bytes, PingTimeout after the last such tick, 10 × PingTimeout
	// after the PING at most: see keepalive).
	// ztunnel's values. The server pings as the client does: its
	// client's node may die (no FIN, no RST) as well as the other way,
	// and only the PING tells (see keepalive). PingTimeout also bounds
	// a server's Shutdown's wait for its PING's answer (on a slow link
	// as keepalive's), how long a clean close waits for a live peer
	// whose reader stalls with our bytes queued, and, at 10 ×
	// PingTimeout, how long it goes on reading while the link still
	// drains (lingerClose); with keepalive off that is all it does, and
	// it defaults to 5 s (noKeepaliveAckWait).
	PingInterval time.Duration
	PingTimeout  time.Duration
	// ResponseTimeout bounds a spliced client stream's wait for its
	// CONNECT response (default 30 s): servers answer 503 themselves
	// after their own (10 s) connect timeout. A peer gone dark is
	// caught sooner, by the liveness probe (probeSilence); a peer alive
	// but not answering HEADERS, only by this.
	ResponseTimeout time.Duration
	// HandshakeReads, when set, follows Server's TLS handshake on its
	// socket (raw, when it is a syscall.Conn): called with waiting
	// false before each read(2) (the handshake is reading, and has the
	// peer's bytes to work on if it finds some, however long it then
	// takes to get the CPU) and with waiting true when one finds
	// nothing (the handshake now waits for its peer). Called on the
	// handshake's goroutine, never after the handshake ends; Client
	// does not call it. The tunnel's bound on pending handshakes tells
	// with it a peer that owes the next step from one whose answer
	// waits on our CPU, which the socket alone cannot (once read, the
	// bytes are crypto/tls's to look at).
	HandshakeReads func(raw net.Conn, waiting bool)
	// OnPanic, when set, is told of a panic on a connection's read loop:
	// a bug in frame handling (the loop parses everything the peer
	// sends) or in SetOnIdle's callback, which it runs. The connection
	// is then closed with INTERNAL_ERROR, its streams failing with an
	// error that names the panic, instead of the panic ending the
	// process. Called once, on the read loop, with the stack. Also of a
	// panic on its control-frame writer (the write of a queued
	// RST_STREAM, WINDOW_UPDATE, PING, SETTINGS ACK) or in the GOAWAY
	// the read loop or keepalive writes as they close it: the
	// connection is closed without a GOAWAY (its frames may be cut
	// short). A panic in a write made by the caller (Stream.Write,
	// Splice, CloseWrite, Respond, OpenStream) closes the connection
	// the same way and goes on to the caller. Not of a panic that ends
	// one stream alone, on a spliced stream's drain goroutine (its
	// writes of received bytes to the app) or in its OnResponse
	// callback: that stream is reset, its app's socket closed, and
	// Splice returns a *PanicError with the stack; the connection goes
	// on. Each panic is told once, to OnPanic or to Splice's caller.
	OnPanic func(c *Conn, v any, stack []byte)
}

func (c Config) withDefaults() Config {
	if c.StreamWindow == 0 {
		c.StreamWindow = 4 << 20
	}
	if c.ConnWindow == 0 {
		c.ConnWindow = 16 << 20
	}
	if c.StreamWindow > maxWindow {
		c.StreamWindow = maxWindow
	}
	if c.ConnWindow > maxWindow {
		c.ConnWindow = maxWindow
	}
	if c.MaxFrameSize == 0 {
		c.MaxFrameSize = 1 << 20
	}
	if c.MaxFrameSize < defaultMaxFrame {
		c.MaxFrameSize = defaultMaxFrame
	}
	if c.MaxFrameSize > maxFrameSizeLimit {
		c.MaxFrameSize = maxFrameSizeLimit
	}
	if c.SendFrameSize <= 0 {
		c.SendFrameSize = 64 << 10
	}
	if c.AppReadSize <= 0 {
		// 1 MiB rather than 256 KiB: a quarter of the bursts, so a
		// quarter of the far side's wake-ups; bulk CPU per GB -6 to
		// -8 % and throughput +4 to +9 % (docs/tunnel.md, session 21).
		c.AppReadSize = 1 << 20
	}
	if c.SocketReadSize == 0 {
		c.SocketReadSize = 256 << 10
	}
	if c.MaxConcurrentStreams == 0 {
		c.MaxConcurrentStreams = 200
	}
	if c.MaxStreamsPerConn == 0 {
		c.MaxStreamsPerConn = 100
	}
	if c.MaxHeaderListSize == 0 {
		c.MaxHeaderListSize = 64 << 10
	}
	if c.PingInterval == 0 {
		c.PingInterval = 10 * time.Second
	}
	if c.PingTimeout == 0 {
		c.PingTimeout = 20 * time.Second
		if c.PingInterval < 0 {
			c.PingTimeout = noKeepaliveAckWait
		}
	}
	if c.ResponseTimeout <= 0 {
		c.ResponseTimeout = 30 * time.Second
	}
	return c
}

// ErrConnClosed is returned for operations on a closed connection,
// wrapped with the reason it closed (closedError).
var ErrConnClosed = errors.New("hbone: connection closed")

// closedError is what a stream or an open gets once the connection has
// closed for reason: ErrConnClosed, which callers test for (the pool
// opens elsewhere), naming the reason, which the user needs (the
// agent's access log). A write that failed under keepalive's close got
// "connection closed" alone, and a read keepalive's reason without
// ErrConnClosed (TestBlockedWriteErrorNamesKeepalive,
// TestStreamErrorsNameKeepalive).
func closedError(reason error) error {
	if reason == nil {
		return ErrConnClosed
	}
	if errors.Is(reason, ErrConnClosed) {
		return reason
	}
	return fmt.Errorf("%w (%w)", ErrConnClosed, reason)
}

// closedErr is closedError of the connection's close reason.
func (c *Conn) closedErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return closedError(c.closeErr)
}

// ErrNoCapacity means the connection takes no new stream now (at the
// stream limit, or going away): open one elsewhere.
var ErrNoCapacity = errors.New("hbone: connection has no capacity for a new stream")

// Conn is one HTTP/2 connection carrying CONNECT streams.
type Conn struct {
	nc     net.Conn
	cork   *corkConn // nil when not wrapping the socket under TLS
	client bool
	cfg    Config
	br     *bufio.Reader

	// Writing: wmu serialises whole frames (and hpack encoder state).
	wmu    sync.Mutex
	henc   *hpack.Encoder
	hbuf   bytes.Buffer
	nextID atomic.Uint32 // client: next stream id (assigned under wmu)
	// closing is closed (below), set with it, read without mu by
	// writers holding wmu (sendFrom, Respond): one that takes wmu once
	// a close began writes no new stream data (closeAs).
	closing atomic.Bool

	// Control frames queued by goroutines that must not block on the
	// socket (the read loop above all), written by ctlLoop or by the next
	// data writer, whichever comes first.
	ctlMu  sync.Mutex
	ctl    []byte
	ctlSig chan struct{}
	// ctlQueued counts the frames in ctl (changed under ctlMu, read by
	// the read loop without it): a peer that makes us owe more than
	// maxQueuedControl without reading them is sent away.
	ctlQueued atomic.Int64
	// dataSent counts the DATA frames we sent, in windowUpdateUnit
	// bytes at most each: the peer's WINDOW_UPDATE budget
	// (windowUpdatesPerData).
	dataSent atomic.Int64
	// bigReads counts pumps holding a read bigger than a frame
	// (maxBigReads, Stream.pumpFrom).
	bigReads atomic.Int32

	mu             sync.Mutex
	cond           *sync.Cond // send windows, stream slots, close
	streams        map[uint32]*Stream
	connSendWin    int64
	peerInitWin    int64
	peerMaxFrame   uint32
	peerMaxStreams uint32
	// The smallest header table size the peer allowed since the last
	// header block we encoded; applied to henc by the next encoder
	// (under wmu), not by the read loop, which must never wait for a
	// writer.
	tableLimit     uint32
	tableLimitSet  bool
	reserved       int // streams open or being opened
	goingAway      bool
	closed         bool
	closeErr       error
	lastPeerStream uint32
	// Server: handlers running (at most MaxConcurrentStreams) and the
	// streams waiting for one, in order (handlerQueueFactor).
	handlers     int
	handlerQueue []*Stream
	idleSince    time.Time
	onIdle       func(*Conn) // pool hook, called without locks

	connRecvAvail atomic.Int64 // what the peer may still send on the connection
	connUnacked   atomic.Int64 // consumed but not yet returned

	frames   atomic.Uint64 // frames read, for keepalive
	pingSent atomic.Int64  // nanotime of an unanswered ping, 0 if none
	// lastRecv is when the read loop last read the socket and found
	// frames (nanotime; stamped per socket read, not per frame: the
	// frames of one read arrived together), and probing says a liveness
	// probe is armed (probeIfSilent, watch).
	lastRecv atomic.Int64
	probing  atomic.Bool
	// lastOpen and openDeadline are when the last stream with a
	// deadline opened, and that deadline (nanotime): the streams the
	// probe watches.
	lastOpen     atomic.Int64
	openDeadline atomic.Int64
	silence      time.Duration // probeSilence when the connection began
	// probes counts the PINGs this connection's liveness probes sent,
	// keepalivePings keepalive's.
	probes         atomic.Int64
	keepalivePings atomic.Int64
	// shutdownAck is closed when the peer acknowledges Shutdown's PING.
	shutdownAck     chan struct{}
	shutdownAckOnce sync.Once
	// Shutdown's steps happen once whoever calls it and how often (the
	// agent's idle or stale-peer close, then the pod's Close, on the
	// same connection): firstStep queues the GOAWAY(2^31-1) and the
	// PING; finalSent (under mu) says the final GOAWAY, naming
	// finalLast, is queued. A GOAWAY's last stream id must never go up
	// (RFC 9113 §6.8; nghttp2 and h2, ztunnel's, close the connection
	// with PROTOCOL_ERROR): a second Shutdown sent GOAWAY(2^31-1) after
	// the final GOAWAY, then a final one naming streams refused since
	// (TestShutdownTwiceNeverRaisesGoAway).
	firstStep sync.Once
	finalSent bool
	finalLast uint32

	handler func(*Stream)
	done    chan struct{}
	// readDone closes when the read loop has returned: a clean close
	// keeps the socket until then (lingerClose).
	readDone chan struct{}
	// gone closes once the socket itself is closed: with done, or after
	// a clean close's linger (Gone).
	gone chan struct{}

	// read-loop only
	hdec       *hpack.Decoder
	hfields    []hpack.HeaderField
	hsize      uint32
	hbad       bool
	contStream uint32 // stream whose header block continues, 0 if none
	contEnd    bool
	hblock     []byte
	scratch    []byte
	// Abuse accounting (limits.go): the current run of frames that do
	// nothing, PRIORITY and WINDOW_UPDATE frames read, streams the peer
	// opened (server side).
	emptyRun      int
	priorities    int64
	windowUpdates int64
	peerOpened    int64
}

func newConn(nc net.Conn, cork *corkConn, client bool, cfg Config) *Conn {
	cfg = cfg.withDefaults()
	c := &Conn{
		nc:             nc,
		cork:           cork,
		client:         client,
		cfg:            cfg,
		br:             bufio.NewReaderSize(nc, 32<<10),
		ctlSig:         make(chan struct{}, 1),
		streams:        make(map[uint32]*Stream),
		connSendWin:    65535,
		peerInitWin:    65535,
		peerMaxFrame:   defaultMaxFrame,
		peerMaxStreams: 100,
		done:           make(chan struct{}),
		readDone:       make(chan struct{}),
		gone:           make(chan struct{}),
		shutdownAck:    make(chan struct{}),
		idleSince:      time.Now(),
		silence:        probeSilence,
	}
	c.nextID.Store(1)
	c.lastRecv.Store(monoNanos(c.idleSince)) // the handshake has just been read
	c.cond = sync.NewCond(&c.mu)
	c.henc = hpack.NewEncoder(&c.hbuf)
	c.hdec = hpack.NewDecoder(4096, func(f hpack.HeaderField) {
		c.hsize += f.Size()
		if c.hsize > c.cfg.MaxHeaderListSize {
			// Refused once decoded; the rest is decoded (the HPACK
			// state must follow) but not emitted.
			c.hbad = true
			c.hdec.SetEmitEnabled(false)
			return
		}
		c.hfields = append(c.hfields, f)
	})
	c.hdec.SetMaxStringLength(int(cfg.MaxHeaderListSize))
	c.connRecvAvail.Store(int64(cfg.ConnWindow))
	return c
}

func (c *Conn) ourSettings() []byte {
	ss := []setting{
		{settingInitialWindowSize, c.cfg.StreamWindow},
		{settingMaxFrameSize, c.cfg.MaxFrameSize},
		{settingMaxHeaderListSize, c.cfg.MaxHeaderListSize},
	}
	if c.client {
		ss = append(ss, setting{settingEnablePush, 0})
	} else {
		ss = append(ss, setting{settingMaxConcurrentStreams, c.cfg.MaxConcurrentStreams})
	}
	b := appendSettings(nil, ss...)
	if c.cfg.ConnWindow > 65535 {
		b = appendWindowUpdate(b, 0, c.cfg.ConnWindow-65535)
	}
	return b
}

// Client runs the TLS handshake on raw (the client side) and starts an
// HTTP/2 connection over it. tlsCfg must offer ALPN "h2".
func Client(ctx context.Context, raw net.Conn, tlsCfg *tls.Config, cfg Config) (*Conn, error) {
	cork := newCorkConn(raw, cfg.withDefaults().SocketReadSize)
	tc := tls.Client(cork, tlsCfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, err
	}
	if p := tc.ConnectionState().NegotiatedProtocol; p != "h2" {
		tc.Close()
		return nil, fmt.Errorf("hbone: server negotiated ALPN %q, want h2", p)
	}
	return NewClientConn(tc, cork, cfg)
}

// NewClientConn starts the client side of HTTP/2 on an established
// connection (normally TLS). cork may be nil.
func NewClientConn(nc net.Conn, cork *corkConn, cfg Config) (*Conn, error) {
	c := newConn(nc, cork, true, cfg)
	pre := append([]byte(clientPreface), c.ourSettings()...)
	if _, err := nc.Write(pre); err != nil {
		nc.Close()
		return nil, err
	}
	go c.ctlLoop()
	go c.readLoop()
	if c.cfg.PingInterval > 0 {
		go c.keepalive()
	}
	return c, nil
}

// Server runs the TLS handshake on raw (the server side) and serves HTTP/2
// CONNECT streams on it, calling handler in a new goroutine per stream,
// until the connection ends. tls is the handshaken connection, for the
// caller to inspect the peer before streams arrive: verify is called after
// the handshake and before any stream; a non-nil error closes raw.
func Server(ctx context.Context, raw net.Conn, tlsCfg *tls.Config, cfg Config, verify func(*tls.Conn) error, handler func(*Stream)) (*Conn, error) {
	cork := newCorkConn(raw, cfg.withDefaults().SocketReadSize)
	if f := cfg.HandshakeReads; f != nil {
		cork.onRead = func(waiting bool) { f(raw, waiting) }
	}
	tc := tls.Server(cork, tlsCfg)
	// The handshake runs on this goroutine (HandshakeContext's own
	// only watches ctx): onRead is dropped before any other reads.
	err := tc.HandshakeContext(ctx)
	cork.onRead = nil
	if err != nil {
		raw.Close()
		return nil, err
	}
	if p := tc.ConnectionState().NegotiatedProtocol; p != "h2" {
		tc.Close()
		return nil, fmt.Errorf("hbone: client negotiated ALPN %q, want h2", p)
	}
	if verify != nil {
		if err := verify(tc); err != nil {
			tc.Close()
			return nil, err
		}
	}
	return NewServerConn(tc, cork, cfg, handler)
}

// NewServerConn serves HTTP/2 on an established connection: it reads the
// client preface and starts the read loop.
func NewServerConn(nc net.Conn, cork *corkConn, cfg Config, handler func(*Stream)) (*Conn, error) {
	c := newConn(nc, cork, false, cfg)
	c.handler = handler
	if _, err := nc.Write(c.ourSettings()); err != nil {
		nc.Close()
		return nil, err
	}
	// The preface and the first SETTINGS must come within
	// prefaceTimeout; the read loop lifts the deadline at that SETTINGS.
	_ = nc.SetReadDeadline(time.Now().Add(prefaceTimeout))
	pre := make([]byte, len(clientPreface))
	if err := readFull(c.br, pre); err != nil {
		nc.Close()
		if ne := net.Error(nil); errors.As(err, &ne) && ne.Timeout() {
			return nil, fmt.Errorf("%w (%v)", errSlowPreface, prefaceTimeout)
		}
		return nil, fmt.Errorf("hbone: reading client preface: %w", err)
	}
	if string(pre) != clientPreface {
		nc.Close()
		return nil, errors.New("hbone: bad client preface (not HTTP/2)")
	}
	go c.ctlLoop()
	go c.readLoop()
	if c.cfg.PingInterval > 0 {
		go c.keepalive()
	}
	return c, nil
}

// NetConn is the underlying (TLS) connection.
func (c *Conn) NetConn() net.Conn { return c.nc }

// Done is closed when the connection has ended.
func (c *Conn) Done() <-chan struct{} { return c.done }

// Gone is closed once the connection's socket is closed. That is when
// Done closes, except after a clean close, whose socket lingers while
// the peer may still send (lingerClose): a second at most on a quiet
// link, longer while a slow link drains. A process that exits before
// Gone has its kernel close what lingers, and the peer's next frame
// gets a reset instead of our FIN, as if the socket had not lingered;
// so whoever ends the process (an agent's drain at an upgrade) waits
// for Gone, and whoever must be rid of the socket now (a pod's network
// going) closes the NetConn's own socket, which ends the linger.
func (c *Conn) Gone() <-chan struct{} { return c.gone }

// Err is why the connection ended (nil while it is alive).
func (c *Conn) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closeErr
}

// ActiveStreams is the number of streams open or being opened.
func (c *Conn) ActiveStreams() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.reserved
}

// IdleSince is when the last stream ended (zero time while streams are
// open).
func (c *Conn) IdleSince() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.reserved > 0 {
		return time.Time{}
	}
	return c.idleSince
}

// Usable reports whether the connection can take new streams at all.
func (c *Conn) Usable() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return !c.closed && !c.goingAway
}

// SetOnIdle registers fn, called when the last open stream ends.
func (c *Conn) SetOnIdle(fn func(*Conn)) {
	c.mu.Lock()
	c.onIdle = fn
	c.mu.Unlock()
}

// Close closes the connection; open streams fail. It does not wait for
// streams to end (Shutdown does), but a writer already in the middle of
// a burst as it is called gets that burst onto the link, with the
// close's own frames after it, for as long as the link takes our bytes
// (up to 10 × PingTimeout on a slow link; a second for a peer that
// takes none): a caller with a deadline cuts the socket under it past
// that deadline (the tunnel's abortConn), which ends the wait at once.
func (c *Conn) Close() error {
	c.closeAs(ErrConnClosed, ErrCodeNo, true)
	return nil
}

// shutdownPing is the payload of Shutdown's PING, told apart from
// keepalive PINGs (which carry a timestamp) by its first byte.
var shutdownPing = [8]byte{0xff, 'g', 'o', 'a', 'w', 'a', 'y', 0}

// noKeepaliveAckWait is PingTimeout's default with keepalive off, where
// it bounds only Shutdown's wait for its PING's answer. With keepalive
// on, that wait borrows keepalive's patience with any PING (20 s). With
// it off there is none to borrow, and keepalive's default held a drain
// without a deadline (the agent's idle and stale-peer closes) of a dead
// peer 20 s for a PING whose only job is to order the GOAWAYs
// (TestShutdownWithoutKeepaliveBoundsItsAckWait). 5 s still covers a
// live peer's reader held up on a busy node (TestShutdownWaitsForALateAck
// stalls it 3 s, with keepalive on and off). Not 0 (no PING): the
// streams a client sent before it read the first GOAWAY would be
// refused, keepalive or not.
const noKeepaliveAckWait = 5 * time.Second

// Shutdown sends GOAWAY (no new streams), waits until the open streams
// end or ctx does, then closes.
//
// A server shuts down in two steps (RFC 9113 §6.8): a GOAWAY with the
// highest stream id and a PING first, the final GOAWAY with the real
// last stream id only after the PING's ACK. A client may have sent
// HEADERS before it read the first GOAWAY; those arrive before the ACK
// and are served. One GOAWAY alone refused them (or closed under them),
// and the app behind such a stream saw a reset: the agent upgrade's
// race. The ACK is waited for as long as keepalive waits for any PING's
// answer (PingTimeout; on a slow link, while the peer's TCP still
// acknowledges or sends new bytes, PingTimeout after the last look that
// saw it, 10 × PingTimeout at most: awaitShutdownAck), then the peer is
// taken for gone: a fixed 2 s before refused a slow peer's streams
// (TestShutdownWaitsForALateAck), on a busy node, when agents restart.
// With keepalive off the PING is sent all the same (the race does not
// depend on keepalive) and waited for PingTimeout, 5 s unless set
// (noKeepaliveAckWait). ctx bounds it too.
func (c *Conn) Shutdown(ctx context.Context) error {
	c.mu.Lock()
	final := c.finalSent
	c.mu.Unlock()
	if !c.client && !final {
		// A second caller waits for the first's PING (its own would be
		// acknowledged by the same once).
		c.firstStep.Do(func() {
			c.queueCtl(append(appendGoAway(nil, 1<<31-1, ErrCodeNo, ""), appendFrame(nil, framePing, 0, 0, shutdownPing[:])...))
		})
		c.awaitShutdownAck(ctx)
	}
	c.mu.Lock()
	last := c.lastPeerStream
	c.goingAway = true
	send := !c.finalSent
	if send {
		c.finalSent, c.finalLast = true, last
	}
	c.mu.Unlock()
	if send {
		c.queueCtl(appendGoAway(nil, last, ErrCodeNo, ""))
	}
	c.mu.Lock()
	stop := context.AfterFunc(ctx, func() {
		c.mu.Lock()
		c.cond.Broadcast()
		c.mu.Unlock()
	})
	defer stop()
	for c.reserved > 0 && !c.closed && ctx.Err() == nil {
		c.cond.Wait()
	}
	c.mu.Unlock()
	c.Close()
	return ctx.Err()
}

// shutdownAckLooks is how many times per PingTimeout Shutdown's wait
// for its PING's answer looks at the link's progress (linkWatch): a
// look that sees none ends the wait at most a quarter PingTimeout late
// past the progress, at one getsockopt per look, during a Shutdown only.
const shutdownAckLooks = 4

// awaitShutdownAck waits for the answer to Shutdown's PING, sent or
// queued now, as keepalive waits for any PING's (linkWatch.overdue):
// PingTimeout after the PING, or after the last look that saw the peer's
// TCP acknowledge new bytes of ours or send new ones, and
// maxPingWaitFactor × PingTimeout after the PING at most; or until ctx
// or the connection ends. On a slow link, with seconds of our bytes
// queued ahead of the PING, a fixed PingTimeout sent the final GOAWAY
// before the live peer's ACK could come, and refused the streams it sent
// meanwhile (TestShutdownSlowLinkWaitsForTheAck). A dead or stalled peer
// moves neither count: its wait ends at PingTimeout, as before.
func (c *Conn) awaitShutdownAck(ctx context.Context) {
	var link linkWatch
	ping := nanotime()
	link.from(c, ping, ping)
	look := c.cfg.PingTimeout / shutdownAckLooks
	for {
		_, left := link.overdue(c, ping, nanotime(), c.cfg.PingTimeout, 0)
		if left <= 0 {
			return
		}
		if look > 0 {
			left = min(left, look)
		}
		t := time.NewTimer(left)
		select {
		case <-c.shutdownAck:
		case <-c.done:
		case <-ctx.Done():
		case <-t.C:
			continue
		}
		t.Stop()
		return
	}
}

// closeWith closes the connection for err, a failure (a keepalive
// timeout, a protocol or read error, a failed or cut write, a panic):
// its writes get closeWriteWait, fixed (closeAs).
func (c *Conn) closeWith(err error, code ErrCode) { c.closeAs(err, code, false) }

// closeAs closes the connection for err, sending a GOAWAY with code
// unless err is ErrConnClosed with ErrCodeNo. patient: the close is
// Close's (Shutdown's final close, the client's end on the peer's
// GOAWAY, the pool's and the tunnel's closes), a connection nothing
// judged broken, whose write deadline then follows the link
// (closeWatch). Any other close has found the peer broken or the
// connection unusable, keepalive's after its PING wait already
// followed the link up to maxPingWait, or the peer closed (the read
// loop's EOF, where nothing we still write is read): its writes keep
// the fixed closeWriteWait, as a close's own wait on the link would
// only add to what the peer was already given
// (TestKeepaliveCloseKeepsTheWriteWait).
func (c *Conn) closeAs(err error, code ErrCode, patient bool) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	c.closing.Store(true)
	cut := false
	if c.cork != nil {
		if cerr := c.cork.cutErr(); cerr != nil {
			cut = true
			// An opener's cut closed the socket: whoever found it
			// closed first (the read loop, most often, before the
			// opener) knew only "connection closed", and every
			// stream's error would have said no more
			// (TestCutConnectionNamesTheCut).
			err = cutReason(cerr)
		}
	}
	c.closeErr = err
	streams := make([]*Stream, 0, len(c.streams))
	for _, s := range c.streams {
		streams = append(streams, s)
	}
	last := c.lastPeerStream
	if c.finalSent {
		// Not above Shutdown's final GOAWAY (see finalSent).
		last = min(last, c.finalLast)
	}
	// Streams waiting for a handler are among streams: they end below
	// and are skipped by handlerDone.
	c.handlerQueue = nil
	c.cond.Broadcast()
	c.mu.Unlock()
	if h := testHookCloseBegun.Load(); h != nil {
		(*h)(c)
	}
	held, clean := false, false
	// The socket closes with wmu held, every close, not only one that
	// sends a GOAWAY: crypto/tls's Close sends no close_notify while a
	// Write is in flight (it takes the Close for one that breaks the
	// write), and a writer (ctlLoop's SETTINGS ACK, a stream's frame)
	// still in tls.Write as Close ran cost the peer its close_notify
	// (TestCloseWaitsForWriteInFlight). The write deadline bounds the
	// wait for a writer stuck toward a peer that stopped reading: its
	// write fails by then, and the lock taken only past it means a
	// write was cut, maybe mid-record, so nothing more is written
	// (clean). A patient close's follows the link (closeWatch): a
	// writer on a slow link is not stuck. The writers queued on wmu
	// behind the one in flight write no new stream data (closing), so
	// the wait is for that one's burst only: each of theirs, up to a
	// MiB, held the close (and the deadline moving with it) a burst
	// longer, ~100 busy streams on a 400 kbit/s link up to the cap,
	// and their streams fail with the close all the same
	// (TestCloseSkipsTheBurstsQueuedBehindIt).
	w := watchClose(c, patient)
	// Deferred, for a panic in the GOAWAY's write: closed was already
	// set, so without it the connection stayed open with its write lock
	// held, Done never closed, and its streams never told
	// (TestWritePanicLeavesConnClosed).
	defer func() { c.finishClose(streams, err, held, clean, w) }()
	c.wmu.Lock()
	held = true
	clean = w.inTime()
	// After a writer's panic (errWritePanicked: unwedge, ctlLoopRecover,
	// panicked) or an opener's cut, frames may be half on the wire or in
	// the cork's buffer, the HPACK encoder a block ahead of the peer's
	// decoder: a frame written after them is read as garbage, so nothing
	// is, as before.
	if clean && !cut && !errors.Is(err, errWritePanicked) {
		// The control frames still queued go first, in one burst with
		// the GOAWAY if any, as ctlLoop writes them: Shutdown queues its
		// final GOAWAY and, with no stream left to wait for, closes at
		// once, and ctlLoop, woken but not yet holding wmu, lost the
		// frame when we took the lock first: the peer read close_notify
		// without the GOAWAY naming the last stream served
		// (TestShutdownFlushesQueuedGoAway). A SETTINGS or PING ACK, a
		// WINDOW_UPDATE went the same way. Not clean until all is
		// written whole: a panic in the write may leave it unfinished.
		clean = false
		c.corkOn()
		werr := c.writeCtlLocked()
		if werr == nil && (code != ErrCodeNo || !errors.Is(err, ErrConnClosed)) {
			// Best effort GOAWAY with the reason.
			_, werr = c.nc.Write(appendGoAway(nil, last, code, ""))
		}
		if ferr := c.corkOff(); werr == nil {
			werr = ferr
		}
		clean = werr == nil
	}
}

// finishClose is closeWith's second half, once the GOAWAY is written or
// not: the socket closes (with close_notify unless the writes did not end
// cleanly: then the TCP socket under TLS closes first, as abortConn's,
// and the TLS close writes nothing, where its close_notify could wait 5 s
// on a full socket), wmu is freed if held, the streams fail with err,
// Done closes. The streams' endings run without wmu: they call the
// pool's idle hook, which may open streams or close the connection.
func (c *Conn) finishClose(streams []*Stream, err error, held, clean bool, w *closeWatch) {
	// First: crypto/tls sets close_notify's write deadline itself (5 s
	// from its write), and one the watch set after it would cut that.
	w.end()
	tc, ok := c.nc.(*tls.Conn)
	switch {
	case ok && !clean:
		tc.NetConn().Close()
		c.nc.Close()
		close(c.gone)
	case ok && c.lingerClose(tc):
	default:
		c.nc.Close()
		close(c.gone)
	}
	if held {
		c.wmu.Unlock()
	}
	serr := closedError(err)
	for _, s := range streams {
		s.connClosed(serr)
	}
	close(c.done)
}

// closeWriteWait is how long a close lets its writes, and the writers
// it waits for, go without the link progressing (closeWatch): a writer
// stuck toward a peer that stopped reading fails then, and the close is
// abortive.
const closeWriteWait = time.Second

// closeWatch is a close's write deadline. It was a fixed
// closeWriteWait: on a slow link with seconds of our DATA queued, a
// writer blocked on the full socket (a stream's last DATA, ctlLoop's
// frames, the close's own GOAWAY) is woken only once a third of the
// socket's buffer has drained, later than that, so the deadline cut its
// write mid-record and the close turned abortive: the peer got a
// truncated record, or a RST once it sent anything, and never the tail
// of a download that was being served whole, on a link taking our
// bytes all along (TestCloseWaitsForTheLinkToTakeTheLastWrite). Now,
// as the linger's wait, it runs closeWriteWait from the last look
// (lingerLooks per lingerWait) that saw the peer's TCP acknowledge
// bytes of ours still queued (linkWatch's taken), up to the linger's
// cap, max(lingerWait, maxPingWait(PingTimeout)) after the close. Not
// the peer's bytes coming in, which the linger and keepalive count:
// they make no room for our writer, and a peer that sends and never
// reads held the close, and wmu, to the cap
// (TestCloseToAPeerThatSendsButNeverReads). A dead peer moves no
// count: its close still ends closeWriteWait after it began
// (TestCloseToADeadPeerEndsAtTheWriteWait).
// Not stalledAlive's longer wait: a stuck agent's live kernel would
// hold every close of its connections, and wmu, PingTimeout. Only a
// patient close's (Close's, closeAs): one for a failure keeps the fixed
// closeWriteWait. SetWriteDeadline applies to a Write already blocked,
// so one goroutine moves it, only while the close runs and only where
// the socket answers TCP_INFO (elsewhere, a Unix socket, one already
// closed under us as abortConn does, no evidence: the fixed deadline).
// It stops before close_notify, which crypto/tls writes under a
// deadline of its own (5 s).
//
// A deadline moved only once the one in force has passed would let the
// writers it cut be followed by the close's frames, garbage after a
// record cut mid-way: so the watch moves it only while it has not
// passed, and one that passed before the move took hold counts as cut
// (lapsed). inTime is then what clean was: the lock taken before the
// deadline in force, never past it.
type closeWatch struct {
	c    *Conn
	base time.Time // the close's start, with its monotonic reading
	stop chan struct{}
	done chan struct{} // nil: no goroutine (no TCP socket)

	mu     sync.Mutex
	until  time.Duration // the deadline in force, since base
	lapsed bool          // a deadline passed before the next took hold
}

// watchClose sets the close's write deadline, closeWriteWait from now,
// and if patient starts moving it on with the link (closeWatch); end
// stops it.
func watchClose(c *Conn, patient bool) *closeWatch {
	w := &closeWatch{c: c, base: time.Now(), until: closeWriteWait}
	_ = c.nc.SetWriteDeadline(w.base.Add(closeWriteWait))
	if !patient || c.cork == nil || c.cork.raw == nil {
		return w
	}
	if _, _, _, _, ok := tcpProgress(c.cork.raw); ok {
		w.stop, w.done = make(chan struct{}), make(chan struct{})
		go w.run()
	}
	return w
}

func (w *closeWatch) run() {
	defer close(w.done)
	c := w.c
	// On the monotonic clock (since base), as the linger.
	start := monoNanos(w.base)
	var link linkWatch
	link.from(c, start, start)
	most := max(closeWriteWait, maxPingWait(c.cfg.PingTimeout))
	t := time.NewTicker(lingerWait / lingerLooks)
	defer t.Stop()
	for {
		select {
		case <-w.stop:
			return
		case <-t.C:
		}
		now := start + int64(time.Since(w.base))
		link.from(c, start, now)
		// Our bytes taken, not the peer's sent: a peer that sends
		// and never reads (its window zero) frees no room for the
		// writer, and held the close, and wmu, to the cap
		// (TestCloseToAPeerThatSendsButNeverReads).
		taken := time.Duration(link.taken - start)
		if link.ping != start {
			taken = 0
		}
		w.move(min(taken+closeWriteWait, most))
	}
}

// move sets the write deadline to until (since base) if that is later
// than the one in force and that one has not passed.
func (w *closeWatch) move(until time.Duration) {
	w.mu.Lock()
	defer w.mu.Unlock()
	old := w.until
	if until <= old || time.Since(w.base) >= old {
		return
	}
	_ = w.c.nc.SetWriteDeadline(w.base.Add(until))
	if time.Since(w.base) >= old {
		// It may have fired before the new one replaced it.
		w.lapsed = true
	}
	w.until = until
}

// inTime says no write was cut by the close's deadline so far: it has
// not passed, nor did one before it.
func (w *closeWatch) inTime() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return !w.lapsed && time.Since(w.base) < w.until
}

// end stops the watch's goroutine and waits for it: no deadline of its
// lands after the close.
func (w *closeWatch) end() {
	if w.done != nil {
		close(w.stop)
		<-w.done
	}
}

// lingerWait bounds how long a cleanly closed connection goes on
// reading what its peer still sends (lingerClose) once the link is
// quiet: counted from the close, or from the last look (lingerLooks per
// lingerWait) that saw the peer's TCP acknowledge bytes of ours still
// queued or send us new ones (linkWatch, as keepalive's PING wait).
// PingTimeout instead while bytes of ours are queued and the peer's TCP
// still ACKs: its reader is stalled, not gone (linger).
const lingerWait = time.Second

// lingerLooks is how many times per lingerWait a lingering close looks
// at the link's progress: one getsockopt each, only while it lingers.
const lingerLooks = 4

// lingerClose ends a clean close without a reset: close_notify and the
// FIN go out, and the socket stays open, its read loop reading and
// dropping what the peer still sends, until the peer's own end or
// lingerWait of a quiet link. Closing at once a socket with unread
// bytes in it (the peer's GOAWAY, a WINDOW_UPDATE, its close_notify:
// frames it sent before it saw ours) makes the kernel send a RST
// instead of the FIN and throw away what our socket had not sent yet:
// the last DATA and END_STREAM of a stream the final GOAWAY promised to
// serve, at an agent's upgrade (TestShutdownRefusesNoOpenedStream under
// -race; TestCloseNeverResetsThePeer). So does a closed socket that
// bytes reach afterwards. On a slow link the peer reads our close_notify
// only once the seconds of DATA queued ahead of it are through, and
// sends WINDOW_UPDATEs meanwhile as it reads them: a fixed lingerWait
// from the close ended the read before, and the next WINDOW_UPDATE got
// a RST that cut the download short (TestShutdownLingersWhileTheLinkDrains).
// So the wait runs from the last look that saw the link progress, up to
// keepalive's patience with a PING (maxPingWait(PingTimeout), lingerWait
// at least): a queue that drains ends, and so, past that bound, does a
// peer that keeps sending. A live peer whose reader stalls a second or
// more with our bytes queued acknowledges none (its window zero) and
// sent a WINDOW_UPDATE to a closed socket when it read again: the same
// reset (TestShutdownLingersThroughAReaderStall). So while bytes are
// queued and the peer's TCP has sent an ACK of any kind (its kernel
// answers our zero-window probes) within PingTimeout, the quiet link
// waits PingTimeout, not lingerWait. Not for queued bytes alone: a dead
// node leaves bytes queued too (keepalive's PING at the least) and
// sends no ACK; keepalive closes at a tick PingTimeout-PingInterval/2
// or more after the last that saw a count move (20 s with the
// defaults: the second tick), so once the linger's lingerWait is up its
// last ACK is past PingTimeout (a PingInterval over 2 s that does not
// divide PingTimeout can leave up to PingInterval/2-lingerWait more).
// Queued bytes alone kept the socket, read loop and buffer of every
// connection keepalive closes PingTimeout after the close
// (TestLingerEndsForADeadPeerWithBytesQueued). It says false when it did not close
// (no read loop left to drain, no half-close under TLS, close_notify
// failed): the caller closes the socket.
func (c *Conn) lingerClose(tc *tls.Conn) bool {
	if c.readDone == nil {
		return false
	}
	select {
	case <-c.readDone:
		return false
	default:
	}
	raw := tc.NetConn()
	if k, ok := raw.(*corkConn); ok {
		raw = k.Conn
	}
	hc, ok := raw.(interface{ CloseWrite() error })
	if !ok {
		return false
	}
	if tc.CloseWrite() != nil || hc.CloseWrite() != nil {
		return false
	}
	_ = tc.SetReadDeadline(time.Now().Add(lingerWait))
	go c.linger(tc)
	return true
}

// linger closes the socket of a lingering close once the read loop has
// ended (the peer's close_notify or FIN, or the read deadline), moving
// that deadline on while the link progresses (lingerClose).
func (c *Conn) linger(tc *tls.Conn) {
	var link linkWatch
	// Times on the monotonic clock (since base): a step of the wall
	// clock neither ends the linger early nor holds it for the step.
	base := time.Now()
	start := monoNanos(base)
	link.from(c, start, start)
	most := max(lingerWait, maxPingWait(c.cfg.PingTimeout))
	stalled := max(lingerWait, c.cfg.PingTimeout)
	for {
		elapsed := time.Since(base)
		now := start + int64(elapsed)
		quiet := time.Duration(now - link.from(c, start, now))
		wait := lingerWait
		if link.stalledAlive(now, c.cfg.PingTimeout) {
			wait = stalled
		}
		left := min(wait-quiet, most-elapsed)
		if left <= 0 {
			break
		}
		_ = tc.SetReadDeadline(base.Add(elapsed + left))
		t := time.NewTimer(min(left, lingerWait/lingerLooks))
		select {
		case <-c.readDone:
			t.Stop()
			c.nc.Close()
			close(c.gone)
			return
		case <-t.C:
		}
	}
	// The deadline ends the loop's socket read; the timer covers a loop
	// held elsewhere.
	t := time.NewTimer(100 * time.Millisecond)
	select {
	case <-c.readDone:
	case <-t.C:
	}
	t.Stop()
	c.nc.Close()
	close(c.gone)
}

// errWritePanicked closes a connection whose writer panicked while it
// held wmu (unwedge). It is ErrConnClosed, so closeWith sends no GOAWAY:
// the frames the panic interrupted may be half on the wire, or half in
// the cork's buffer, or the HPACK encoder a block ahead of the peer's
// decoder; anything written after them would be read as garbage.
var errWritePanicked = fmt.Errorf("hbone: a write on the connection panicked, leaving its frames unfinished: %w", ErrConnClosed)

// unwedge runs deferred in each function that takes wmu, with held true
// from its Lock to its Unlock: only a panic between them leaves it
// true. It then frees the lock and closes the connection, and the panic
// goes on to the caller's recover (the tunnel's handler: one stream's
// bug). Before, the lock stayed held: every later write on the
// connection, for any stream, waited on it for ever, and a pooled
// connection kept taking streams that hung (TestWritePanicLeavesConnClosed).
// One open-coded defer per call, and a store at each Lock and Unlock:
// the data path pays no allocation and no lock for it.
func (c *Conn) unwedge(held *bool) {
	if *held {
		c.wmu.Unlock()
		c.closeWith(errWritePanicked, ErrCodeNo)
	}
}

// queueCtl queues a control frame for the writer.
func (c *Conn) queueCtl(b []byte) {
	c.ctlMu.Lock()
	c.ctl = append(c.ctl, b...)
	c.ctlQueued.Add(1)
	c.ctlMu.Unlock()
	select {
	case c.ctlSig <- struct{}{}:
	default:
	}
}

// writeCtlLocked writes queued control frames; wmu held.
func (c *Conn) writeCtlLocked() error {
	c.ctlMu.Lock()
	b := c.ctl
	c.ctl = nil
	c.ctlQueued.Store(0)
	c.ctlMu.Unlock()
	if len(b) == 0 {
		return nil
	}
	_, err := c.nc.Write(b)
	return err
}

func (c *Conn) ctlLoop() {
	held := false
	defer c.ctlLoopRecover(&held)
	for {
		select {
		case <-c.done:
			return
		case <-c.ctlSig:
		}
		if testHookCtlWoken != nil {
			testHookCtlWoken(c)
		}
		c.wmu.Lock()
		held = true
		c.corkOn()
		err := c.writeCtlLocked()
		if ferr := c.corkOff(); err == nil {
			err = ferr
		}
		held = false
		c.wmu.Unlock()
		if err != nil {
			c.closeWith(fmt.Errorf("hbone: write: %w", err), ErrCodeNo)
			return
		}
	}
}

// ctlLoopRecover ends ctlLoop on a panic in its write (the cork's
// buffer, crypto/tls, the socket), which runs on a goroutine of its own
// where nothing else recovers: the process ended, every connection with
// it. The connection is closed as for a writer's panic (unwedge: no
// GOAWAY after half-written frames) with an error naming the panic, and
// Config.OnPanic hears of it, as of the read loop's
// (TestCtlLoopPanicClosesConn).
func (c *Conn) ctlLoopRecover(held *bool) {
	v := recover()
	if v == nil {
		return
	}
	if *held {
		c.wmu.Unlock()
	}
	c.panicked("the control-frame writer", v)
}

// recoverOwn is deferred at the top of the other goroutines a connection
// runs for itself and that write, the read loop (after
// readFramesRecovered: its closeWith) and keepalive: a panic in
// closeWith's GOAWAY write ended the process. closeWith finishes the
// close on a panic (deferred); here OnPanic hears of it
// (TestOwnGoroutinePanicClosesConn).
func (c *Conn) recoverOwn(where string) {
	if v := recover(); v != nil {
		c.panicked(where, v)
	}
}

// panicked closes the connection after a panic on one of its own
// goroutines (where), as after a writer's (unwedge: no GOAWAY), with an
// error naming the panic, and tells OnPanic with the stack.
func (c *Conn) panicked(where string, v any) {
	stack := debug.Stack()
	c.closeWith(fmt.Errorf("hbone: %s panicked: %v: %w", where, v, errWritePanicked), ErrCodeNo)
	if f := c.cfg.OnPanic; f != nil {
		f(c, v, stack)
	}
}

func (c *Conn) corkOn() { c.corkOnFor(0) }

// corkOnFor starts a burst of about n bytes of frames.
func (c *Conn) corkOnFor(n int) {
	if c.cork != nil {
		c.cork.cork(n)
	}
}

func (c *Conn) corkOff() error {
	if c.cork != nil {
		return c.cork.flush()
	}
	return nil
}

// writeBurstLocked writes queued control frames, then b, corked so they
// leave as one burst. The caller holds wmu.
func (c *Conn) writeBurstLocked(b []byte) error {
	c.corkOn()
	err := c.writeCtlLocked()
	if err == nil {
		_, err = c.nc.Write(b)
	}
	if ferr := c.corkOff(); err == nil {
		err = ferr
	}
	return err
}

// encodeHeadersLocked encodes fields as HEADERS (+CONTINUATION) frames
// into dst; wmu held (hpack state follows write order).
func (c *Conn) encodeHeadersLocked(dst []byte, id uint32, fields []hpack.HeaderField, endStream bool) []byte {
	c.mu.Lock()
	max := int(c.peerMaxFrame)
	limit, limitSet := c.tableLimit, c.tableLimitSet
	c.tableLimitSet = false
	c.mu.Unlock()
	if limitSet {
		// The encoder only ever shrinks its table to a limit, so the
		// smallest limit seen stands for the whole sequence (and the
		// size update it emits opens this block, RFC 7541 §4.2).
		c.henc.SetMaxDynamicTableSizeLimit(limit)
	}
	c.hbuf.Reset()
	for _, f := range fields {
		_ = c.henc.WriteField(f)
	}
	block := c.hbuf.Bytes()
	first := true
	for {
		n := min(len(block), max)
		var flags uint8
		typ := uint8(frameContinuation)
		if first {
			typ = frameHeaders
			if endStream {
				flags |= flagEndStream
			}
		}
		if n == len(block) {
			flags |= flagEndHeaders
		}
		dst = appendFrame(dst, typ, flags, id, block[:n])
		block = block[n:]
		first = false
		if len(block) == 0 {
			return dst
		}
	}
}

// OpenStream opens a CONNECT stream to authority with extra headers. It
// does not wait for the response (see Stream.Response): bytes written
// before it are sent optimistically, which saves a round trip.
func (c *Conn) OpenStream(authority string, extra []hpack.HeaderField) (*Stream, error) {
	s, _, err := c.OpenStreamData(authority, extra, nil)
	return s, err
}

// OpenStreamData is OpenStream that also sends the app's first bytes in
// the same write as the HEADERS when the send windows allow (one write,
// one TLS burst, for the common connect-and-send). It returns how many
// bytes of first were sent; the caller sends the rest.
func (c *Conn) OpenStreamData(authority string, extra []hpack.HeaderField, first []byte) (*Stream, int, error) {
	return c.OpenStreamDataContext(context.Background(), authority, extra, first)
}

// OpenStreamDataContext is OpenStreamData that waits for the
// connection's write lock no longer than ctx allows. When the peer's node
// dies while a stream is sending, the writer blocks in a write to a full
// socket buffer, holding the lock, until keepalive closes the connection
// (20 to 40 s); a new stream picked for that connection waited as long,
// past its connect timeout (TestOpenStreamWaitsForStalledWritesNoLongerThanItsContext).
// On ctx's end the stream is not sent and the error wraps ctx.Err().
func (c *Conn) OpenStreamDataContext(ctx context.Context, authority string, extra []hpack.HeaderField, first []byte) (*Stream, int, error) {
	return c.openStream(ctx, authority, extra, first, false)
}

// OpenStreamDataBehindStall is OpenStreamDataContext that goes on waiting
// for the write lock when its holder's write turns WriteStalled, until
// ctx ends. For a caller that has no better connection to go to (its
// dial failed, or it already holds as many connections to the peer as it
// will): giving up there only made it dial again, or fail at once where
// the stalled writer might still drain within ctx.
func (c *Conn) OpenStreamDataBehindStall(ctx context.Context, authority string, extra []hpack.HeaderField, first []byte) (*Stream, int, error) {
	return c.openStream(ctx, authority, extra, first, true)
}

func (c *Conn) openStream(ctx context.Context, authority string, extra []hpack.HeaderField, first []byte, behindStall bool) (*Stream, int, error) {
	if !c.client {
		return nil, 0, errors.New("hbone: OpenStream on a server connection")
	}
	c.mu.Lock()
	switch {
	case c.closed:
		err := closedError(c.closeErr)
		c.mu.Unlock()
		return nil, 0, err
	case c.goingAway || uint32(c.reserved) >= min(c.peerMaxStreams, c.cfg.MaxStreamsPerConn) || c.nextID.Load() >= 1<<31-1:
		c.mu.Unlock()
		return nil, 0, ErrNoCapacity
	}
	c.reserved++
	c.mu.Unlock()
	s := newStream(c)
	fields := make([]hpack.HeaderField, 0, 2+len(extra))
	fields = append(fields, hpack.HeaderField{Name: ":method", Value: "CONNECT"}, hpack.HeaderField{Name: ":authority", Value: authority})
	fields = append(fields, extra...)

	held := false
	defer c.unwedge(&held)
	if err := c.lockWriteContext(ctx, behindStall); err != nil {
		c.release(s)
		if errors.Is(err, ErrNoCapacity) {
			return nil, 0, err
		}
		return nil, 0, fmt.Errorf("hbone: the connection's writes are stalled: %w", err)
	}
	held = true
	id := c.nextID.Load()
	c.nextID.Store(id + 2)
	s.id = id
	c.mu.Lock()
	if c.closed || c.goingAway {
		// Checked again under wmu: a GOAWAY read since the check above
		// may already have its PING ACK written, and HEADERS after the
		// ACK are refused. Not sent: the caller picks another connection.
		closed, reason := c.closed, c.closeErr
		c.mu.Unlock()
		held = false
		c.wmu.Unlock()
		c.release(s)
		if closed {
			return nil, 0, closedError(reason)
		}
		return nil, 0, ErrNoCapacity
	}
	s.sendWin = c.peerInitWin
	c.streams[id] = s
	sent := 0
	if n := int64(len(first)); n > 0 && n <= s.sendWin && n <= c.connSendWin && n <= int64(c.peerMaxFrame) {
		s.sendWin -= n
		c.connSendWin -= n
		sent = len(first)
	}
	c.mu.Unlock()
	frames := c.encodeHeadersLocked(nil, id, fields, false)
	if sent > 0 {
		frames = appendFrame(frames, frameData, 0, id, first)
		c.dataSent.Add(1)
	}
	if testHookOpenStreamChecked != nil {
		testHookOpenStreamChecked(c)
	}
	// Queued under wmu, so written below in the same burst as the
	// HEADERS: no extra write, and the stream never waits for the ACK.
	c.probeIfSilent(ctx)
	// The HEADERS first, queued control frames after: the reader may
	// have queued the ACK of the server's shutdown PING since the check
	// above, and written ahead of HEADERS that passed it, the ACK told
	// the server no stream was coming. The server then refused these
	// (or closed the connection under them, its RST_STREAM still
	// queued); TestShutdownAckNeverOvertakesHeaders forces the moment.
	//
	// The write is bounded by ctx too: with the lock free but the
	// socket full (the peer alive but not draining it), the HEADERS'
	// write(2) waited without bound. Past ctx, once the write has also
	// waited writeStallAfter, the socket is closed under it
	// (corkConn.flushGuarded) and so is the connection, its other
	// streams with it: acceptable only for a peer that does not drain
	// (the pool has stopped putting streams on it). ctx may end early
	// (the tunnel cancels it when the app's client goes away): a write
	// that waits only because the connection is busy is left to end.
	guarded := c.cork != nil
	if guarded {
		c.cork.corkGuarded(0, ctx)
	} else {
		c.corkOn()
	}
	_, err := c.nc.Write(frames)
	if err == nil {
		err = c.writeCtlLocked()
	}
	cut := false
	if guarded {
		var ferr error
		cut, ferr = c.cork.flushGuarded()
		if err == nil {
			err = ferr
		}
	} else if ferr := c.corkOff(); err == nil {
		err = ferr
	}
	held = false
	c.wmu.Unlock()
	if cut {
		if testHookOpenStreamCut != nil {
			testHookOpenStreamCut(c)
		}
		err = fmt.Errorf("hbone: the connection's socket took no write within the opener's deadline (closed: the write it cut may have left a frame unfinished): %w", ctx.Err())
		c.closeWith(cutReason(ctx.Err()), ErrCodeNo)
		c.release(s)
		return nil, 0, err
	}
	if err != nil {
		c.closeWith(fmt.Errorf("hbone: write: %w", err), ErrCodeNo)
		return nil, 0, c.closedErr()
	}
	return s, sent, nil
}

// writeStallAfter is how long a write may wait on a full socket before
// WriteStalled says so. Well above what a healthy peer takes to drain a
// burst (at most a 1 MiB cork, usually an app read of 256 KiB: 1 MiB is
// 8 ms at 1 Gbit/s, 84 ms at 100 Mbit/s), so a busy connection is not
// shunned and no dial is spent on it; and a twentieth of the 10 s
// connect timeout, so a stream that would wait behind the stalled
// writer (for the lock, up to that timeout) goes to another connection
// instead, at the price of one dial. A var for tests.
var writeStallAfter = 500 * time.Millisecond

// WriteStalled reports whether a write on c has waited on a full socket
// for writeStallAfter or longer at now: the peer is alive, maybe, but
// not draining (CPU-starved, or the path congested), and a new stream
// put here would wait behind that write for the write lock. The pool
// opens new streams elsewhere; the connection goes on serving its own.
// An atomic load: free on the open path. Always false without a cork
// (NewClientConn with a nil one).
func (c *Conn) WriteStalled(now time.Time) bool {
	if c.cork == nil {
		return false
	}
	since := c.cork.blockedSince.Load()
	return since != 0 && monoNanos(now)-since >= int64(writeStallAfter)
}

// lockWriteContext takes wmu, or gives up when ctx ends. Uncontended
// (the common case) it is a TryLock; contended, a goroutine waits on the
// lock and hands it over, or unlocks it if the caller left meanwhile.
// Unless behindStall, it also gives up once the holder is WriteStalled.
func (c *Conn) lockWriteContext(ctx context.Context, behindStall bool) error {
	if c.wmu.TryLock() {
		return nil
	}
	if ctx.Done() == nil {
		c.wmu.Lock()
		return nil
	}
	got, gone := make(chan struct{}), make(chan struct{})
	go func() {
		c.wmu.Lock()
		select {
		case got <- struct{}{}:
		case <-ctx.Done():
			c.wmu.Unlock()
		case <-gone:
			c.wmu.Unlock()
		}
	}()
	// The holder may be a writer stalled on a full socket: once
	// WriteStalled says so, give up (ErrNoCapacity: the pool opens the
	// stream elsewhere) rather than wait for the lock up to ctx's end,
	// the connect timeout. An opener that picked the connection just
	// before the stall was seen waited that long.
	// behindStall: the caller has nowhere better to go, and waits for
	// the lock up to ctx's end (a nil channel never fires).
	var t *time.Timer
	var stalled <-chan time.Time
	if !behindStall {
		t = time.NewTimer(c.untilStalled(time.Now()))
		defer t.Stop()
		stalled = t.C
	}
	for {
		select {
		case <-got:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		case now := <-stalled:
			if c.WriteStalled(now) {
				close(gone)
				return errWriteStalled
			}
			t.Reset(c.untilStalled(now))
		}
	}
}

// errWriteStalled: an open gave up waiting for the write lock held by a
// writer stalled on a full socket (WriteStalled).
var errWriteStalled = fmt.Errorf("hbone: the connection's writer has waited on a full socket too long: %w", ErrNoCapacity)

// untilStalled is how long from now until WriteStalled could turn true:
// writeStallAfter when no write waits now.
func (c *Conn) untilStalled(now time.Time) time.Duration {
	if c.cork == nil {
		return time.Hour // never: no stamp without a cork
	}
	return max(c.cork.untilStalled(now), time.Millisecond)
}

// cutReason is why a connection closes whose socket an opener's cut
// closed, ctxErr the error of the opener's context. It names ctxErr but
// does not wrap it: it is what the connection's other openers get
// (closedError), and the pool takes an open failing with
// context.DeadlineExceeded for its own connect timeout, where
// ErrConnClosed sends it to another connection.
func cutReason(ctxErr error) error {
	return fmt.Errorf("hbone: the connection's socket took no write within an opener's deadline (%v), and the write was cut: %w", ctxErr, ErrConnClosed)
}

// testHookCloseBegun, when set (tests only), runs in closeAs once the
// close has begun (closed, closing) and before it takes wmu: the moment
// a writer that reserved its window before may take the lock first.
// Atomic: read by every close, the read loop's included, while a test
// sets it.
var testHookCloseBegun atomic.Pointer[func(*Conn)]

// testHookOpenStreamChecked, when set (tests only), runs in
// OpenStreamData after the last going-away check, with wmu held, before
// the HEADERS are written.
var testHookOpenStreamChecked func(*Conn)

// testHookServerHeadersTaken, when set (tests only), runs in the
// server's read loop once a new stream's HEADERS are taken (neither
// refused nor a protocol error), before its handler starts.
var testHookServerHeadersTaken func(*Conn)

// testHookOpenStreamCut, when set (tests only), runs in an open whose
// write was cut (the socket closed under it), after it freed wmu and
// before it closes the connection.
var testHookOpenStreamCut func(*Conn)

// testHookCtlWoken, when set (tests only), runs in ctlLoop each time it
// wakes for queued control frames, before it takes wmu.
var testHookCtlWoken func(*Conn)

// release forgets a finished stream.
func (c *Conn) release(s *Stream) {
	c.mu.Lock()
	if s.released {
		c.mu.Unlock()
		return
	}
	s.released = true
	if s.waiting {
		// Queued for a handler that will never run: a peer resetting
		// streams in a loop leaves the queue full of them, so drop
		// what they hold (their header list, up to MaxHeaderListSize).
		s.Request = nil
	}
	if s.id != 0 && c.streams[s.id] == s {
		delete(c.streams, s.id)
	}
	c.reserved--
	var idle func(*Conn)
	if c.reserved == 0 {
		c.idleSince = time.Now()
		idle = c.onIdle
	}
	c.cond.Broadcast()
	c.mu.Unlock()
	if idle != nil {
		idle(c)
	}
}

// keepalive pings the peer once a tick (PingInterval) has passed without
// a frame read, and closes the connection at the first tick
// PingTimeout-PingInterval/2 after an unanswered PING: between
// PingInterval+PingTimeout and 2*PingInterval+PingTimeout after the last
// frame (30 to 40 s with the defaults).
//
// Both sides run it. On a server it is what ends a connection whose
// client's node died (power off, panic, partition): nothing else comes
// to the socket then, no FIN, no RST. Before, only TCP keepalive bounded
// an idle one (Go's default on the listener: 15 s idle + 9 probes 15 s
// apart, ~150 s), and one with bytes in flight only the kernel's
// retransmissions (tcp_retries2, ~15 min): meanwhile the server pod's app
// kept its side of every stream open, a streaming answer writing into
// the void. A server whose writer is blocked on the full socket toward
// the dead client (holding wmu, so the PING itself never leaves) is
// closed all the same: the timeout counts from when the PING was queued,
// and closeWith's write deadline for its GOAWAY also ends the blocked
// write (TestServerKeepaliveClosesStalledWriter). Its streams fail with
// the keepalive error; a spliced one resets its app's socket (SO_LINGER
// 0, as for a RST_STREAM: Stream.connClosed, dropBuffers' abort), so the
// server's app sees ECONNRESET, not a FIN: the client never ended its
// side, and a clean EOF would pass a cut-off upload or request for a
// complete one. (A stream whose client had already ended its side,
// END_STREAM read, gave its app that FIN then; the app's next write is
// reset, as the pump's send fails.)
//
// A PING unanswered only because the link is slow is waited for longer:
// while the peer's TCP keeps acknowledging our bytes or sending new ones
// the timeout runs from the last tick that saw it do so, not from the
// PING, up to 10 × PingTimeout after the PING (linkWatch,
// maxPingWaitFactor). The reason names the whole wait.
//
// Shutdown's PING carries its own payload (shutdownPing) and does not
// touch pingSent, so a keepalive PING outstanding during a drain is
// answered and timed on its own; an unanswered drain ends at keepalive's
// close, not only at Shutdown's PingTimeout wait. The liveness probe
// stays client-only: it is about streams waiting for their response.
func (c *Conn) keepalive() {
	defer c.recoverOwn("keepalive")
	t := time.NewTicker(c.cfg.PingInterval)
	defer t.Stop()
	last := c.frames.Load()
	var link linkWatch
	for {
		select {
		case <-c.done:
			return
		case <-t.C:
		}
		now := c.frames.Load()
		if now != last {
			last = now
			// Frames read before an outstanding PING do not answer
			// it: the liveness probe sends its PING between ticks,
			// and forgetting it here (the frames before it were new
			// to this tick) restarted the timeout from a PING of our
			// own a tick later (TestKeepaliveCountsFromTheProbesPing).
			if sent := c.pingSent.Load(); sent == 0 || c.lastRecv.Load() >= sent {
				c.pingSent.Store(0)
			}
			continue
		}
		sent := c.pingSent.Load()
		if sent == 0 {
			sent = nanotime()
			c.pingSent.Store(sent)
			var p [8]byte
			binary.BigEndian.PutUint64(p[:], uint64(sent))
			c.queueCtl(appendFrame(nil, framePing, 0, 0, p[:]))
			c.keepalivePings.Add(1)
			link.from(c, sent, sent)
			continue
		}
		waited, left := link.overdue(c, sent, nanotime(), c.cfg.PingTimeout, c.cfg.PingInterval/2)
		if left <= 0 {
			// The wait is in the reason, which every stream's error
			// carries (closedError): a user reading "connection
			// closed" in the access log learns why.
			c.closeWith(fmt.Errorf("hbone: keepalive timeout: no PING answer within %v", roundWait(waited)), ErrCodeNo)
			return
		}
	}
}

// maxPingWaitFactor bounds how long the link's progress keeps a PING
// waiting (linkWatch): 10 × PingTimeout after it, 200 s with the
// defaults. A live peer answers once what was queued ahead of the PING
// has drained: up to ~5 MiB (the rest of a 1 MiB burst, the socket's
// send buffer autotuned up to tcp_wmem's 4 MiB), 42 s at 1 Mbit/s and
// 200 s at ~210 kbit/s; so the bound spares a link that still gives a
// connection ~200 kbit/s, slower than anything a cluster's pods can be
// expected to work over. Past it the peer is taken for broken, not
// slow: an agent that reads our bytes but never answers PINGs, or one
// stuck while its kernel still takes our bytes into a receive buffer
// that a slow link fills for minutes (autotuned up to tcp_rmem's 6
// MiB). Those were closed 20 s after the PING before; 200 s is still far
// below what bounded a stuck peer before keepalive did (tcp_retries2,
// ~15 min), and no bound at all would keep a PING-deaf peer's
// connection for as long as its kernel takes bytes.
const maxPingWaitFactor = 10

// maxPingWait is maxPingWaitFactor × timeout, the longest Duration when
// that is past what one holds (a PingTimeout over ~29 years, meant as
// "never"): the product overflowed to a negative wait, and keepalive
// closed the connection at its first tick after the PING
// (TestKeepaliveHugeTimeoutWaitsForTheAnswer). A negative timeout is
// no patience at all, as in keepalive's other bound.
func maxPingWait(timeout time.Duration) time.Duration {
	switch {
	case timeout > math.MaxInt64/maxPingWaitFactor:
		return math.MaxInt64
	case timeout < 0:
		return timeout
	}
	return maxPingWaitFactor * timeout
}

// linkWatch is keepalive's evidence that an unanswered PING is only
// slow: the peer's TCP acknowledging new bytes of ours, or sending us
// new bytes, since the PING went out (tcpi_bytes_acked or
// tcpi_bytes_received advancing).
//
// On a slow or congested link (a 1 Gbit/s link shared by a few
// thousand bulk connections gives each a few hundred kbit/s) a sender
// in bulk can read no frame for a tick (its receiver returns window
// once per MiB its app consumes: 34 s apart at 250 kbit/s) and ping,
// and its PING waits behind what is queued ahead of it, the rest of the
// burst whose writer holds the write lock (up to AppReadSize, 1 MiB)
// and the socket's send buffer: tens of seconds at that rate, and
// keepalive closed a live connection with every stream on it. Its
// receiver too, when a DATA frame takes longer than a tick to arrive
// (ours are 64 KiB, 10 s below ~50 kbit/s; a peer may send up to our
// MaxFrameSize, 1 MiB): it reads no frame header, pings, and the answer
// waits behind the same queue on its way back.
//
// Counters, not ACKs: the kernel of a peer whose agent is stuck answers
// our zero-window probes with pure ACKs for ever, neither count moving,
// and that connection must close as before (once what was in flight is
// delivered, it does). And our bytes acknowledged count only while the
// socket holds a queue (bytes of ours unacknowledged or unsent at this
// tick or the one before), where the PING may be behind them: a small
// write after the PING to a stuck agent's live kernel (a RST_STREAM, a
// WINDOW_UPDATE) is acknowledged at once, the socket empty at both
// ticks, and it kept a connection to that agent open a PingTimeout
// longer (TestKeepaliveCountsFromTheProbesPing, whose dark server's
// kernel lives, caught it once in eight runs). A dead node sends
// nothing, so its connection closes when it did. No TCP socket under
// the connection (cork nil, a wrapped or piped conn, a Unix socket): no
// evidence, the timeout as before. Each watch has one user, keepalive's
// goroutine (one getsockopt a tick, only while a PING is outstanding), a
// server's Shutdown waiting for its PING's answer (awaitShutdownAck) or
// a clean close lingering while the link drains (linger).
type linkWatch struct {
	ping     int64  // the PING (pingSent) the fields below belong to
	acked    uint64 // bytes_acked when last seen
	received uint64 // bytes_received when last seen
	queued   bool   // bytes of ours were in the socket when last seen
	progress int64  // the tick that last saw the link progress, else ping
	// taken: the tick that last saw bytes of ours acknowledged, the
	// socket holding a queue, else ping: progress without the peer's
	// bytes, which say nothing of room in our socket (closeWatch).
	taken int64
	ackAt int64 // the peer's last ACK of any kind, as last seen; 0 unknown
}

// from is when the wait for the PING sent at ping (nanotime) counts
// from at now: the PING, or the tick that last saw the link progress,
// whichever is later. The tick, not the moment of the progress, which
// lies between it and the tick before: a tick longer at most, and only
// for a peer that was sending or acknowledging.
func (w *linkWatch) from(c *Conn, ping, now int64) int64 {
	if c.cork == nil || c.cork.raw == nil {
		return ping
	}
	acked, received, sinceAck, queued, ok := tcpProgress(c.cork.raw)
	switch {
	case !ok:
	case w.ping != ping:
		// A new PING (ours, sent now, or the liveness probe's, sent
		// between ticks): what the counts did before is not evidence.
		w.ping, w.acked, w.received, w.queued, w.progress, w.taken = ping, acked, received, queued, ping, ping
		w.ackAt = now - int64(sinceAck)
	default:
		if acked > w.acked && (w.queued || queued) {
			w.progress, w.taken = now, now
		}
		if received > w.received {
			w.progress = now
		}
		w.acked, w.received, w.queued = acked, received, queued
		w.ackAt = now - int64(sinceAck)
	}
	if w.ping != ping {
		return ping
	}
	return w.progress
}

// overdue is what is left at now of the patience with the PING sent at
// ping (nanotime), by keepalive's rule: timeout, less slack, after
// from (the PING, or the last look that saw the link progress), and
// maxPingWait(timeout) after the PING at most. At 0 or below the peer is
// taken for gone; waited is the time since the PING. Keepalive and
// Shutdown's wait for its PING's answer both ask it, each with a
// linkWatch of its own.
func (w *linkWatch) overdue(c *Conn, ping, now int64, timeout, slack time.Duration) (waited, left time.Duration) {
	waited = time.Duration(now - ping)
	quiet := time.Duration(now - w.from(c, ping, now))
	return waited, min(timeout-slack-quiet, maxPingWait(timeout)-waited)
}

// stalledAlive says the last look found bytes of ours queued and the
// peer's TCP alive by an ACK of any kind within window of now: a reader
// stalled on a live host, its window zero, acknowledges no byte, but
// its kernel answers our zero-window probes (linger). A dead node sends
// none. Keepalive does not ask it: a stuck agent's kernel answers those
// probes for ever (TestKeepaliveClosesZeroWindowPeer).
func (w *linkWatch) stalledAlive(now int64, window time.Duration) bool {
	return w.queued && w.ackAt != 0 && time.Duration(now-w.ackAt) < window
}

// roundWait rounds a wait for a message: to 100 ms from a second up
// (keepalive's ticks land a few ms late), to the ms below.
func roundWait(d time.Duration) time.Duration {
	if d >= time.Second {
		return d.Round(100 * time.Millisecond)
	}
	return d.Round(time.Millisecond)
}

// A liveness probe runs while a stream waits on a connection that has
// read nothing since it opened: once the connection has been silent for
// probeSilence, a PING goes out, and unless some frame (its ACK, or
// anything else) arrives by the opener's deadline (the tunnel's connect
// timeout), the streams still waiting for their response fail with
// ErrPeerSilent and the connection takes no new ones (peerSilent:
// answered streams are left to keepalive). A stream opening on a connection already silent sends
// the PING in the same write as its HEADERS; the stream never waits for
// the ACK.
//
// Why: when the peer's node goes dark while a pooled connection is idle,
// nothing tells us (no RST, no FIN). A stream put on it sent its HEADERS
// into the void and waited for the 30 s response timeout, or keepalive's
// close (PingInterval + PingTimeout, ~40 s), where a fresh dial to the
// dead node fails in the 10 s connect timeout: reuse was worse than no
// pool. A peer that answers PINGs but never HEADERS (its agent alive but
// stuck) is not caught: the response timeout still bounds those streams.
//
// probeSilence is 1 s, not keepalive's 10 s: a node that died a few
// seconds ago must be caught too, and a silence of 1 s is already longer
// than any RTT in a cluster (the peer's read loop answers a PING at
// once), while a connection in use (streams moving data, responses
// coming) reads frames far more often and never pays a PING. At most
// one probe is armed per connection (probing), so streams opening
// together send one PING and share its verdict. A var for tests (read
// when a connection begins).
var probeSilence = time.Second

// probeMinWait is the least a probe waits for an answer, whatever is left
// of the opener's deadline (it may have spent most of it waiting for the
// write lock): a live peer's ACK needs an RTT, and a verdict given
// sooner would close a live connection with all its streams.
const probeMinWait = time.Second

// ErrPeerSilent is why a connection closes when a liveness probe found
// its peer silent: no frame, not even a PING's ACK, within the deadline
// of the stream that opened on it.
var ErrPeerSilent = errors.New("hbone: the peer answered nothing, not even a PING, within the connect timeout (its node down or unreachable?)")

// livenessProbes counts the PINGs liveness probes sent, process-wide.
var livenessProbes atomic.Int64

// LivenessProbes is how many PINGs liveness probes have sent in this
// process (streams waiting on a connection silent for a second or
// more): a connection in use sends none.
func LivenessProbes() int64 { return livenessProbes.Load() }

// peersSilent counts the probes' verdicts, process-wide: connections
// found silent past a stream's deadline.
var peersSilent atomic.Int64

// PeersSilent is how many connections liveness probes have found silent
// in this process (each a peer whose node died or became unreachable
// while a pooled connection to it sat idle).
func PeersSilent() int64 { return peersSilent.Load() }

// LivenessProbes is how many PINGs liveness probes sent on c.
func (c *Conn) LivenessProbes() int64 { return c.probes.Load() }

// KeepalivePings is how many PINGs keepalive sent on c (one per
// PingInterval of silence at most; none while frames keep coming).
func (c *Conn) KeepalivePings() int64 { return c.keepalivePings.Load() }

// probeIfSilent notes a stream opening with ctx's deadline and arms the
// liveness probe unless it is armed already. Without a deadline there is
// no probe. Called with wmu held, before the HEADERS are written: a PING
// it queues leaves with them.
func (c *Conn) probeIfSilent(ctx context.Context) {
	dl, ok := ctx.Deadline()
	if !ok {
		return
	}
	now := nanotime()
	// Both stored before probing is looked at: a probe disarming
	// meanwhile sees this open (watch).
	c.openDeadline.Store(monoNanos(dl))
	c.lastOpen.Store(now)
	if !c.probing.CompareAndSwap(false, true) {
		return // armed: it watches this stream too
	}
	c.watch(now)
}

// watch runs the armed probe at now: disarmed when every stream opened so
// far has seen a frame since (the peer was alive after they opened),
// looked at again when the silence will have lasted probeSilence, or the
// PING sent and its verdict timed.
func (c *Conn) watch(now int64) {
	for {
		select {
		case <-c.done:
			return
		default:
		}
		lr := c.lastRecv.Load()
		if c.lastOpen.Load() < lr {
			c.probing.Store(false)
			// An open between the load and the store saw the probe
			// armed and left it to us: look again, armed by whoever
			// wins it back.
			if c.lastOpen.Load() < c.lastRecv.Load() || !c.probing.CompareAndSwap(false, true) {
				return
			}
			now = nanotime()
			continue
		}
		if quiet := now - lr; quiet < int64(c.silence) {
			// One timer per connection, at most one a probeSilence
			// while streams keep opening: a busy connection's frames
			// disarm it when it fires.
			time.AfterFunc(time.Duration(int64(c.silence)-quiet), func() { c.watch(nanotime()) })
			return
		}
		seen := c.frames.Load()
		// keepalive's PING, outstanding, serves as well: its ACK is a
		// frame. Ours is keepalive's kind (a timestamp, answered
		// through pingSent), so keepalive sends none of its own while
		// ours is unanswered.
		if c.pingSent.CompareAndSwap(0, now) {
			var p [8]byte
			binary.BigEndian.PutUint64(p[:], uint64(now))
			c.queueCtl(appendFrame(nil, framePing, 0, 0, p[:]))
			c.probes.Add(1)
			livenessProbes.Add(1)
		}
		wait := max(time.Duration(c.openDeadline.Load()-now), probeMinWait)
		time.AfterFunc(wait, func() {
			if c.frames.Load() == seen {
				c.peerSilent()
				return
			}
			c.watch(nanotime())
		})
		return
	}
}

// peerSilent is the probe's verdict, no frame by the deadline: the
// streams still waiting for their response fail with ErrPeerSilent (the
// tunnel counts them connect_timeout, as a dial to a dead node) and the
// connection takes no new ones. Streams already answered are left to
// keepalive (the probe's PING is its outstanding one, so it closes the
// connection PingTimeout after it, ztunnel's bound): a peer whose agent
// only paused (CPU-starved, stopped, its node swapping) for longer than
// a connect timeout comes back to find its downloads still open, where
// closing the connection here cut every one of them
// (TestProbeSparesAnsweredStreamsOfAPausedPeer). With none answered,
// nothing is lost by closing at once.
func (c *Conn) peerSilent() {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	peersSilent.Add(1)
	var pending []*Stream
	answered := false
	for _, s := range c.streams {
		if s.awaitsResponse() {
			pending = append(pending, s)
		} else {
			answered = true
		}
	}
	if !answered {
		c.mu.Unlock()
		c.closeWith(ErrPeerSilent, ErrCodeNo)
		return
	}
	// Before the streams fail: their openers' next try must not pick
	// this connection again.
	c.goingAway = true
	c.cond.Broadcast()
	c.mu.Unlock()
	for _, s := range pending {
		c.queueCtl(appendRST(nil, s.id, ErrCodeCancel))
		s.doReset(ErrPeerSilent, false)
	}
	// Closes it once the answered streams end (or keepalive does).
	go c.Shutdown(context.Background())
}

// returnConnWindow gives n bytes of connection window back to the peer
// once enough has accumulated.
func (c *Conn) returnConnWindow(n int64) {
	if n <= 0 {
		return
	}
	u := c.connUnacked.Add(n)
	if u < int64(c.cfg.ConnWindow/4) {
		return
	}
	if !c.connUnacked.CompareAndSwap(u, 0) {
		return // someone else is returning it
	}
	c.connRecvAvail.Add(u)
	c.queueCtl(appendWindowUpdate(nil, 0, uint32(u)))
}

// readLoop reads and dispatches frames until the connection fails.
func (c *Conn) readLoop() {
	defer close(c.readDone)
	defer c.recoverOwn("the read loop's close")
	err := c.readFramesRecovered()
	code := ErrCodeNo
	var ce connError
	if errors.As(err, &ce) {
		code = ce.Code
	} else if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
		err = ErrConnClosed
	}
	c.closeWith(err, code)
}

// readFramesRecovered is readFrames with a panic made the connection's
// error (Config.OnPanic). The read loop runs on a goroutine of its own,
// outside any recover of the caller's. What it cannot undo: a panic
// while it held the connection's lock leaves closeWith waiting for it.
// Frame parsing and the callbacks run without it.
func (c *Conn) readFramesRecovered() (err error) {
	defer func() {
		v := recover()
		if v == nil {
			return
		}
		stack := debug.Stack()
		err = connError{ErrCodeInternal, fmt.Sprintf("internal error on the read loop: panic: %v", v)}
		if f := c.cfg.OnPanic; f != nil {
			f(c, v, stack)
		}
	}()
	return c.readFrames()
}

func (c *Conn) readFrames() error {
	var hb [frameHeaderLen]byte
	settingsSeen := false
	for {
		// A header not (wholly) buffered is read from the socket: the
		// one place the loop waits for the peer, so the one clock read
		// the liveness stamp needs (not one per frame of a burst).
		refill := c.br.Buffered() < frameHeaderLen
		if err := readFull(c.br, hb[:]); err != nil {
			if ne := net.Error(nil); !settingsSeen && errors.As(err, &ne) && ne.Timeout() {
				return fmt.Errorf("hbone: no SETTINGS from the client within %v", prefaceTimeout)
			}
			return err
		}
		if refill {
			c.lastRecv.Store(nanotime())
		}
		h := parseFrameHeader(hb[:])
		c.frames.Add(1)
		if h.Length > c.cfg.MaxFrameSize {
			return connError{ErrCodeFrameSize, fmt.Sprintf("frame of %d bytes exceeds %d", h.Length, c.cfg.MaxFrameSize)}
		}
		if !settingsSeen && h.Type != frameSettings {
			return connError{ErrCodeProtocol, "first frame is not SETTINGS"}
		}
		if c.contStream != 0 && h.Type != frameContinuation {
			return connError{ErrCodeProtocol, "header block interrupted"}
		}
		var err error
		switch h.Type {
		case frameData:
			err = c.readData(h)
		case frameHeaders, framePriority, frameRSTStream, frameSettings, framePushPromise,
			framePing, frameGoAway, frameWindowUpdate, frameContinuation:
			var p []byte
			if p, err = c.readPayload(h); err == nil {
				err = c.handleFrame(h, p)
			}
		default:
			// Unknown types are ignored (RFC 9113 §4.1): skipped
			// without a buffer, and counted as frames doing nothing.
			c.emptyRun++
			_, err = c.br.Discard(int(h.Length))
		}
		if err != nil {
			return err
		}
		if !settingsSeen {
			settingsSeen = true
			if !c.client {
				_ = c.nc.SetReadDeadline(time.Time{}) // NewServerConn's
			}
		}
		if err := c.checkAbuse(h); err != nil {
			return err
		}
	}
}

// checkAbuse applies the limits of limits.go after each frame: the
// counters the frame's handling moved. Plain integer compares, plus one
// atomic load: nothing the data path would notice (BenchmarkBulk).
func (c *Conn) checkAbuse(h frameHeader) error {
	switch h.Type {
	case frameData, frameContinuation:
		// readData and handleFrame counted an empty one.
	case frameHeaders:
		// An empty fragment without END_HEADERS was counted as nothing.
	default:
		if isKnownFrame(h.Type) {
			c.emptyRun = 0
		}
	}
	if c.emptyRun > maxEmptyFrames {
		return connError{ErrCodeEnhanceYourCalm, fmt.Sprintf("more than %d frames in a row that carry nothing", maxEmptyFrames)}
	}
	if n := c.ctlQueued.Load(); n > maxQueuedControl {
		return connError{ErrCodeEnhanceYourCalm, fmt.Sprintf("%d control frames queued for a peer that does not read them", n)}
	}
	return nil
}

func isKnownFrame(t uint8) bool { return t <= frameContinuation }

// noteEmpty counts a frame that carried nothing (empty, or nothing but
// padding) and ended nothing in the current run, or ends the run.
func (c *Conn) noteEmpty(empty bool) {
	if empty {
		c.emptyRun++
	} else {
		c.emptyRun = 0
	}
}

// takeBigRead reserves one of the connection's maxBigReads reads bigger
// than a frame, if one is free.
func (c *Conn) takeBigRead() bool {
	for {
		n := c.bigReads.Load()
		if n >= maxBigReads {
			return false
		}
		if c.bigReads.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

// endBigRead gives back takeBigRead's reservation, if taken.
func (c *Conn) endBigRead(taken bool) {
	if taken {
		c.bigReads.Add(-1)
	}
}

// streamsOpened is how many streams the connection has seen opened: ours
// on a client, the peer's on a server.
func (c *Conn) streamsOpened() int64 {
	if c.client {
		return int64(c.peekNextID()-1) / 2
	}
	return c.peerOpened
}

func (c *Conn) readPayload(h frameHeader) ([]byte, error) {
	if cap(c.scratch) < int(h.Length) {
		c.scratch = make([]byte, h.Length)
	}
	p := c.scratch[:h.Length]
	if err := readFull(c.br, p); err != nil {
		return nil, err
	}
	if cap(c.scratch) > 64<<10 {
		c.scratch = nil // a rare big control frame: do not keep it
	}
	return p, nil
}

func (c *Conn) handleFrame(h frameHeader, p []byte) error {
	switch h.Type {
	case frameHeaders:
		if h.StreamID == 0 {
			return connError{ErrCodeProtocol, "HEADERS on stream 0"}
		}
		frag, err := headerBlockFragment(h, p)
		if err != nil {
			return err
		}
		c.contStream = h.StreamID
		c.contEnd = h.Flags&flagEndStream != 0
		c.hblock = append(c.hblock[:0], frag...)
		return c.headerFragment(h, len(frag))
	case frameContinuation:
		if c.contStream == 0 || h.StreamID != c.contStream {
			return connError{ErrCodeProtocol, "unexpected CONTINUATION"}
		}
		c.hblock = append(c.hblock, p...)
		return c.headerFragment(h, len(p))
	case framePriority:
		if h.StreamID == 0 {
			return connError{ErrCodeProtocol, "PRIORITY on stream 0"}
		}
		if len(p) != 5 {
			return connError{ErrCodeFrameSize, "PRIORITY length"}
		}
		c.priorities++
		if c.priorities > priorityPerStream*(1+c.streamsOpened()) {
			return connError{ErrCodeEnhanceYourCalm, fmt.Sprintf("%d PRIORITY frames for %d streams", c.priorities, c.streamsOpened())}
		}
		return nil
	case frameRSTStream:
		if h.StreamID == 0 {
			return connError{ErrCodeProtocol, "RST_STREAM on stream 0"}
		}
		if len(p) != 4 {
			return connError{ErrCodeFrameSize, "RST_STREAM length"}
		}
		if s := c.stream(h.StreamID); s != nil {
			s.remoteReset(ErrCode(binary.BigEndian.Uint32(p)))
		} else if c.isIdleID(h.StreamID) {
			return connError{ErrCodeProtocol, "RST_STREAM on an idle stream"}
		}
		return nil
	case frameSettings:
		ss, err := parseSettings(h, p)
		if err != nil {
			return err
		}
		if h.Flags&flagAck != 0 {
			return nil
		}
		if err := c.applySettings(ss); err != nil {
			return err
		}
		c.queueCtl(appendFrame(nil, frameSettings, flagAck, 0, nil))
		return nil
	case framePushPromise:
		return connError{ErrCodeProtocol, "PUSH_PROMISE not allowed"}
	case framePing:
		if h.StreamID != 0 {
			return connError{ErrCodeProtocol, "PING on a stream"}
		}
		if len(p) != 8 {
			return connError{ErrCodeFrameSize, "PING length"}
		}
		switch {
		case h.Flags&flagAck == 0:
			c.queueCtl(appendFrame(nil, framePing, flagAck, 0, p))
		case [8]byte(p) == shutdownPing:
			c.shutdownAckOnce.Do(func() { close(c.shutdownAck) })
		default:
			c.pingSent.Store(0)
		}
		return nil
	case frameGoAway:
		if h.StreamID != 0 {
			return connError{ErrCodeProtocol, "GOAWAY on a stream"}
		}
		if len(p) < 8 {
			return connError{ErrCodeFrameSize, "GOAWAY length"}
		}
		c.goAway(binary.BigEndian.Uint32(p)&(1<<31-1), ErrCode(binary.BigEndian.Uint32(p[4:])))
		return nil
	case frameWindowUpdate:
		if len(p) != 4 {
			return connError{ErrCodeFrameSize, "WINDOW_UPDATE length"}
		}
		c.windowUpdates++
		if c.windowUpdates > 5+2*(c.streamsOpened()+windowUpdatesPerData*c.dataSent.Load()) {
			return connError{ErrCodeEnhanceYourCalm, fmt.Sprintf("%d WINDOW_UPDATEs for %d DATA frames sent", c.windowUpdates, c.dataSent.Load())}
		}
		incr := int64(binary.BigEndian.Uint32(p) & (1<<31 - 1))
		if incr == 0 {
			if h.StreamID == 0 {
				return connError{ErrCodeProtocol, "WINDOW_UPDATE of 0"}
			}
			if s := c.stream(h.StreamID); s != nil {
				s.Reset(ErrCodeProtocol)
			}
			return nil
		}
		c.mu.Lock()
		defer c.mu.Unlock()
		if h.StreamID == 0 {
			c.connSendWin += incr
			if c.connSendWin > maxWindow {
				return connError{ErrCodeFlowControl, "connection window overflow"}
			}
		} else if s := c.streams[h.StreamID]; s != nil {
			s.sendWin += incr
			if s.sendWin > maxWindow {
				go s.Reset(ErrCodeFlowControl)
			}
		}
		c.cond.Broadcast()
		return nil
	default:
		return nil // unknown frame types are ignored (RFC 9113 §4.1)
	}
}

// headerFragment follows a HEADERS or CONTINUATION fragment of n bytes,
// appended to hblock: the block is bounded as it accumulates, and
// decoded once it ends.
func (c *Conn) headerFragment(h frameHeader, n int) error {
	end := h.Flags&flagEndHeaders != 0
	c.noteEmpty(n == 0 && !end)
	// Checked before decoding too: one frame may hold a whole block of
	// up to MaxFrameSize, which decoding would walk in full.
	if uint32(len(c.hblock)) > c.cfg.MaxHeaderListSize*2 {
		return connError{ErrCodeEnhanceYourCalm, "header block too large"}
	}
	if end {
		return c.endHeaders()
	}
	return nil
}

func (c *Conn) applySettings(ss []setting) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, s := range ss {
		switch s.ID {
		case settingHeaderTableSize:
			// Our encoder keeps its table within what the peer allows,
			// from the next header block on. Not applied here: the
			// encoder belongs to whoever holds wmu, and a writer can hold
			// it for as long as the peer does not read; waiting for it in
			// the read loop stops this side's reading too, and two peers
			// doing that deadlock.
			if !c.tableLimitSet || s.Val < c.tableLimit {
				c.tableLimit = s.Val
			}
			c.tableLimitSet = true
		case settingMaxConcurrentStreams:
			c.peerMaxStreams = s.Val
		case settingInitialWindowSize:
			delta := int64(s.Val) - c.peerInitWin
			c.peerInitWin = int64(s.Val)
			for _, st := range c.streams {
				st.sendWin += delta
				if st.sendWin > maxWindow {
					return connError{ErrCodeFlowControl, "INITIAL_WINDOW_SIZE takes a stream's window past 2^31-1"}
				}
			}
		case settingMaxFrameSize:
			c.peerMaxFrame = s.Val
		}
	}
	c.cond.Broadcast()
	return nil
}

func (c *Conn) goAway(last uint32, code ErrCode) {
	c.mu.Lock()
	// A client closes the connection once the streams the GOAWAY
	// spares end (or at once, with none): no new stream can use it.
	// Left open, it waited for the server's own close, which at a pod's
	// deletion comes after the pod's interface is gone and never
	// arrives: keepalive closed it 30 s later, and the server's end
	// stayed for its idle timeout when keepalive was off
	// (TestChurnLeavesNoResidue). First GOAWAY only; already going away
	// (Shutdown, peerSilent), a Shutdown is under way.
	closeIdle := c.client && !c.goingAway && !c.closed
	c.goingAway = true
	var refused []*Stream
	if c.client {
		for id, s := range c.streams {
			if id > last {
				refused = append(refused, s)
			}
		}
	}
	c.cond.Broadcast()
	c.mu.Unlock()
	for _, s := range refused {
		s.remoteReset(ErrCodeRefusedStream)
	}
	if closeIdle {
		go c.Shutdown(context.Background())
	}
}

func (c *Conn) stream(id uint32) *Stream {
	c.mu.Lock()
	s := c.streams[id]
	c.mu.Unlock()
	return s
}

// endHeaders decodes a complete header block and acts on it.
func (c *Conn) endHeaders() error {
	id, end := c.contStream, c.contEnd
	c.contStream = 0
	c.hfields = c.hfields[:0]
	c.hsize = 0
	c.hbad = false
	c.hdec.SetEmitEnabled(true)
	if _, err := c.hdec.Write(c.hblock); err != nil {
		return connError{ErrCodeCompression, err.Error()}
	}
	if err := c.hdec.Close(); err != nil {
		return connError{ErrCodeCompression, err.Error()}
	}
	if cap(c.hblock) > 64<<10 {
		c.hblock = nil
	}
	if c.client {
		return c.clientHeaders(id, end)
	}
	return c.serverHeaders(id, end)
}

func (c *Conn) clientHeaders(id uint32, end bool) error {
	if id%2 == 0 {
		return connError{ErrCodeProtocol, "server-initiated stream"}
	}
	s := c.stream(id)
	if s == nil {
		if id >= c.peekNextID() {
			return connError{ErrCodeProtocol, "HEADERS on an idle stream"}
		}
		return nil // a stream we already forgot
	}
	if c.hbad {
		s.Reset(ErrCodeProtocol)
		return nil
	}
	s.gotHeaders(c.hfields, end)
	return nil
}

func (c *Conn) peekNextID() uint32 { return c.nextID.Load() }

func (c *Conn) serverHeaders(id uint32, end bool) error {
	if id%2 == 0 {
		return connError{ErrCodeProtocol, "even stream id from a client"}
	}
	c.mu.Lock()
	if s := c.streams[id]; s != nil {
		c.mu.Unlock()
		// Trailers: only END_STREAM matters.
		if !end {
			return connError{ErrCodeProtocol, "second HEADERS without END_STREAM"}
		}
		s.gotHeaders(nil, true)
		return nil
	}
	if id <= c.lastPeerStream {
		c.mu.Unlock()
		return connError{ErrCodeStreamClosed, "HEADERS on a closed stream"}
	}
	c.mu.Unlock()
	// Parsed before the id counts as seen. The id and the stream's place
	// among the open ones are taken under one lock: Shutdown's final
	// GOAWAY names the last id seen and then waits for the open streams,
	// so an id seen but not yet open let it find none, close the
	// connection, and fail the stream its GOAWAY promised to serve
	// (TestShutdownServesAStreamItsGoAwayCounted). Only the read loop
	// takes ids, so the check above still holds.
	code := ErrCodeNo
	var req *Request
	if c.hbad {
		code = ErrCodeProtocol
	} else if r, err := parseRequest(c.hfields); err != nil {
		code = ErrCodeProtocol
	} else {
		req = r
	}
	c.mu.Lock()
	c.lastPeerStream = id
	c.peerOpened++
	switch {
	case c.goingAway || c.closed, uint32(c.reserved) >= c.cfg.MaxConcurrentStreams:
		code = ErrCodeRefusedStream
	}
	if code != ErrCodeNo {
		c.mu.Unlock()
		c.queueCtl(appendRST(nil, id, code))
		return nil
	}
	s := newStream(c)
	s.id = id
	s.Request = req
	c.reserved++
	s.sendWin = c.peerInitWin
	c.streams[id] = s
	c.mu.Unlock()
	if testHookServerHeadersTaken != nil {
		testHookServerHeadersTaken(c)
	}
	if end {
		s.gotHeaders(nil, true)
	}
	return c.startHandler(s)
}

// startHandler runs the handler for s, or queues s while
// MaxConcurrentStreams handlers run: a stream the peer resets frees its
// slot at once, its handler's work (authorize, dial the app) does not,
// so the streams' limit alone bounded no work (Rapid Reset). A peer that
// keeps resetting fills the queue and is sent away.
func (c *Conn) startHandler(s *Stream) error {
	c.mu.Lock()
	max := int(c.cfg.MaxConcurrentStreams)
	if c.handlers < max {
		c.handlers++
		c.mu.Unlock()
		go c.runHandlers(s)
		return nil
	}
	if len(c.handlerQueue) >= handlerQueueFactor*max {
		c.mu.Unlock()
		return connError{ErrCodeEnhanceYourCalm, fmt.Sprintf("%d streams wait for %d handlers still running (streams reset early)", len(c.handlerQueue), max)}
	}
	s.waiting = true
	c.handlerQueue = append(c.handlerQueue, s)
	c.mu.Unlock()
	return nil
}

// runHandlers runs the handler for s, then for the queued streams while
// there are some: the goroutine keeps the slot it holds.
func (c *Conn) runHandlers(s *Stream) {
	for s != nil {
		c.handler(s)
		s = c.handlerDone()
	}
}

// handlerDone is the next queued stream still open (one reset meanwhile
// is skipped: its handler never runs), or nil once the slot is free.
func (c *Conn) handlerDone() *Stream {
	c.mu.Lock()
	defer c.mu.Unlock()
	for len(c.handlerQueue) > 0 {
		s := c.handlerQueue[0]
		c.handlerQueue[0] = nil
		c.handlerQueue = c.handlerQueue[1:]
		s.waiting = false
		if !s.released {
			return s
		}
	}
	c.handlerQueue = nil // let the emptied array go
	c.handlers--
	return nil
}

// readData reads a DATA frame's payload straight into a pooled chunk
// and queues it on its stream.
func (c *Conn) readData(h frameHeader) error {
	if h.StreamID == 0 {
		return connError{ErrCodeProtocol, "DATA on stream 0"}
	}
	n := int64(h.Length)
	if c.connRecvAvail.Add(-n) < 0 {
		return connError{ErrCodeFlowControl, "peer exceeded the connection window"}
	}
	s := c.stream(h.StreamID)
	if s == nil || !s.acceptsData() {
		if s == nil && c.isIdleID(h.StreamID) {
			return connError{ErrCodeProtocol, "DATA on an idle stream"}
		}
		c.noteEmpty(n == 0)
		if _, err := c.br.Discard(int(n)); err != nil {
			return err
		}
		c.returnConnWindow(n)
		if s != nil {
			s.Reset(ErrCodeStreamClosed)
		}
		return nil
	}
	if s.awaitsResponse() {
		// Malformed (errDataBeforeResponse): a stream error, the
		// connection goes on; the payload is dropped, its connection
		// window returned.
		if _, err := c.br.Discard(int(n)); err != nil {
			return err
		}
		c.returnConnWindow(n)
		s.answered(nil, 0, h.Flags&flagEndStream != 0, errDataBeforeResponse)
		return nil
	}
	if n == 0 {
		c.noteEmpty(h.Flags&flagEndStream == 0)
		if h.Flags&flagEndStream != 0 {
			s.pushData(nil, nil, true)
		}
		return nil
	}
	bp := getBuf(int(n))
	if err := readFull(c.br, *bp); err != nil {
		putBuf(bp)
		return err
	}
	data, err := dataPayload(h, *bp)
	if err != nil {
		putBuf(bp)
		return err
	}
	if !s.takeRecvWindow(n) {
		putBuf(bp)
		c.returnConnWindow(n)
		s.Reset(ErrCodeFlowControl)
		return nil
	}
	if pad := n - int64(len(data)); pad > 0 {
		// Padding counts against both windows (RFC 9113 §6.1) and is
		// consumed as soon as it is read: the stream's window too, or a
		// padding peer's stream shrinks by it for good.
		s.creditWindow(pad)
	}
	c.noteEmpty(len(data) == 0 && h.Flags&flagEndStream == 0)
	if len(data) == 0 {
		putBuf(bp)
		bp = nil
	}
	s.pushData(bp, data, h.Flags&flagEndStream != 0)
	return nil
}

func (c *Conn) isIdleID(id uint32) bool {
	if c.client {
		return id%2 == 1 && id >= c.peekNextID()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return id%2 == 1 && id > c.lastPeerStream
}
