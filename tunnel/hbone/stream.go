package hbone

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime/debug"
	"strconv"
	"sync"
	"syscall"
	"time"

	"golang.org/x/net/http2/hpack"
	"golang.org/x/sys/unix"

	"github.com/ambit-mesh/ambit/tunnel/internal/panicpoint"
)

type chunk struct {
	bp   *[]byte // pooled backing buffer (nil for none)
	data []byte
}

// Stream is one CONNECT stream: a bidirectional byte stream with
// half-close (CloseWrite ↔ END_STREAM) and reset.
type Stream struct {
	c  *Conn
	id uint32

	// Request is the peer's request (server side).
	Request *Request

	// Client side: the response.
	respOnce   sync.Once
	resp       chan struct{}
	status     int
	respHeader []hpack.HeaderField
	// informational counts 1xx responses skipped (read loop only).
	informational int

	// Receive side.
	rmu       sync.Mutex
	rsig      chan struct{}
	chunks    []chunk
	buffered  int64
	recvEnd   bool
	recvErr   error
	recvAvail int64
	unacked   int64
	abort     func() // set by Splice: unblock the app side at once
	onResp    func(status int)
	// direct is the app socket once Splice delivers to it: the read loop
	// then writes DATA straight to the app when nothing is queued and
	// the socket takes it without blocking, saving a goroutine hand-off
	// per message (latency). writing marks such a write in progress (or
	// the drain goroutine's), so bytes never overtake each other.
	direct  syscall.RawConn
	writing bool
	directN int64 // bytes delivered to the app (under rmu)
	// Splice delivery state (under rmu): the app, whether a drain
	// goroutine runs (only while bytes wait: an idle stream has none),
	// whether the client response was dealt with, and the end of the
	// stream → app direction.
	app       *net.TCPConn
	appEOF    bool // the pump read the app's FIN
	drainer   bool
	respDone  bool
	toAppOnce sync.Once
	toAppDone chan error

	// wEnd: END_STREAM is written (under c.wmu, so it goes out once and
	// no DATA follows it whoever races to write).
	wEnd bool

	// Send side and lifecycle, under c.mu.
	sendWin   int64
	sentEnd   bool
	remoteEnd bool
	reset     bool
	// sendCut: bytes given to a send, or a 2xx Respond, were not sent
	// because the connection was closing (reserve saw it closed, or the
	// write lock came after the close began: closing). A later
	// CloseWrite sends no END_STREAM then: the peer would read a clean
	// end of a stream cut short
	// (TestCloseWriteAfterADroppedWriteSendsNoEndStream), or DATA on a
	// stream never answered
	// (TestCloseWriteAfterADroppedRespondSendsNothing).
	sendCut  bool
	released bool
	waiting  bool // queued for a handler (server, startHandler)
}

func newStream(c *Conn) *Stream {
	return &Stream{
		c:         c,
		resp:      make(chan struct{}),
		rsig:      make(chan struct{}, 1),
		recvAvail: int64(c.cfg.StreamWindow),
	}
}

// ID is the HTTP/2 stream id.
func (s *Stream) ID() uint32 { return s.id }

// Conn is the connection carrying the stream.
func (s *Stream) Conn() *Conn { return s.c }

func (s *Stream) signal() {
	select {
	case s.rsig <- struct{}{}:
	default:
	}
}

func (s *Stream) acceptsData() bool {
	s.rmu.Lock()
	defer s.rmu.Unlock()
	return !s.recvEnd && s.recvErr == nil
}

func (s *Stream) takeRecvWindow(n int64) bool {
	s.rmu.Lock()
	defer s.rmu.Unlock()
	s.recvAvail -= n
	return s.recvAvail >= 0
}

// Buffered is how many received bytes wait for the app.
func (s *Stream) Buffered() int64 {
	s.rmu.Lock()
	defer s.rmu.Unlock()
	return s.buffered
}

func (s *Stream) pushData(bp *[]byte, data []byte, end bool) {
	s.rmu.Lock()
	if s.recvErr != nil {
		s.rmu.Unlock()
		if bp != nil {
			putBuf(bp)
		}
		s.c.returnConnWindow(int64(len(data)))
		return
	}
	if len(data) > 0 && len(s.chunks) == 0 && !s.writing && s.direct != nil {
		s.writing = true
		rc := s.direct
		s.rmu.Unlock()
		n := writeNonBlocking(rc, data)
		if n > 0 {
			s.creditWindow(int64(n))
		}
		s.rmu.Lock()
		s.writing = false
		s.directN += int64(n)
		data = data[n:]
		if len(data) == 0 && bp != nil {
			putBuf(bp)
			bp = nil
		}
		if s.recvErr != nil {
			// Reset during the write: dropBuffers has emptied the
			// queue and nothing drains it again, so the rest goes
			// as at the top of pushData (queued, it would hold the
			// connection's window for good; enableDelivery has the
			// same case, tested by TestResetWhileDeliveringReturnsWindow).
			s.rmu.Unlock()
			s.signal() // a drainer may wait for writing to end
			if bp != nil {
				putBuf(bp)
			}
			s.c.returnConnWindow(int64(len(data)))
			return
		}
	}
	if len(data) > 0 {
		s.chunks = append(s.chunks, chunk{bp, data})
		s.buffered += int64(len(data))
		bufferedBytes.Add(int64(len(data)))
	}
	if end {
		s.recvEnd = true
	}
	var fin *net.TCPConn
	if end && len(s.chunks) == 0 && !s.writing && !s.drainer && s.direct != nil && s.app != nil {
		// Everything is delivered: pass the FIN on right here
		// (shutdown(2) does not block) rather than start a goroutine.
		fin = s.app
	}
	start := fin == nil && s.kickLocked()
	s.rmu.Unlock()
	s.signal()
	if fin != nil {
		s.finToApp(fin)
	}
	if start {
		go s.drain()
	}
	if end {
		s.markRemoteEnd()
	}
}

// kickLocked decides, under rmu, whether a drain goroutine must start:
// Splice delivers, the app may be written, and bytes or the end wait.
func (s *Stream) kickLocked() bool {
	if s.app == nil || s.direct == nil || s.drainer || s.recvErr != nil {
		return false
	}
	if len(s.chunks) == 0 && !s.recvEnd {
		return false
	}
	s.drainer = true
	return true
}

// finToApp passes the stream's end on to the app as a FIN. When the app
// has ended its own side already (the pump read its EOF), Splice is about
// to close the socket and close(2) sends that same FIN: shutdown(2)
// first would be one more system call for nothing.
func (s *Stream) finToApp(app *net.TCPConn) {
	s.rmu.Lock()
	done := s.appEOF
	s.rmu.Unlock()
	if done {
		s.finishToApp(nil)
		return
	}
	s.finishToApp(app.CloseWrite())
}

// finishToApp records the end of the stream → app direction, once.
func (s *Stream) finishToApp(err error) {
	s.toAppOnce.Do(func() {
		// Under rmu: Splice sets toAppDone (under rmu) while a reset
		// from another goroutine may be finishing here.
		s.rmu.Lock()
		done := s.toAppDone
		s.rmu.Unlock()
		if done != nil {
			done <- err
		}
	})
}

// panicHook runs panicpoint.StreamHook, if set (tests only): where the
// panic tests make a stream's own code panic (panicpoint picks one by
// its caller).
func (s *Stream) panicHook() {
	if h := panicpoint.StreamHook.Load(); h != nil {
		(*h)(s)
	}
}

// drain writes queued chunks to the app with writev and delivers the end
// of the stream, then exits as soon as nothing waits.
func (s *Stream) drain() {
	// For drainPanicked: chs, taken off the queue and not yet recycled,
	// and whether s.writing is this goroutine's.
	var chs []chunk
	mine := false
	defer func() {
		if v := recover(); v != nil {
			s.drainPanicked(v, chs, mine)
		}
	}()
	bufs := make(net.Buffers, 0, 16)
	for {
		s.rmu.Lock()
		if s.recvErr != nil {
			s.drainer = false
			err := s.recvErr
			s.rmu.Unlock()
			s.finishToApp(err)
			return
		}
		if len(s.chunks) == 0 || s.writing {
			if s.recvEnd && !s.writing {
				s.drainer = false
				app := s.app
				s.rmu.Unlock()
				s.finToApp(app)
				return
			}
			if s.writing {
				// The read loop is writing; it queues what is left and
				// we look again.
				s.rmu.Unlock()
				<-s.rsig
				continue
			}
			s.drainer = false
			s.rmu.Unlock()
			return
		}
		chs = s.chunks
		s.chunks = nil
		s.writing, mine = true, true
		app := s.app
		s.rmu.Unlock()
		bufs = bufs[:0]
		var n int64
		for _, ch := range chs {
			bufs = append(bufs, ch.data)
			n += int64(len(ch.data))
		}
		s.panicHook()
		_, werr := bufs.WriteTo(app)
		s.rmu.Lock()
		s.writing, mine = false, false
		if werr == nil {
			s.directN += n
		}
		s.rmu.Unlock()
		s.signal()
		// Not drainPanicked's from here: a panic while they are
		// recycled must not put a buffer back twice (two streams would
		// share it); what it leaves is held for good.
		done := chs
		chs = nil
		s.consumed(done)
		if werr != nil {
			s.rmu.Lock()
			s.drainer = false
			s.rmu.Unlock()
			s.Reset(ErrCodeCancel)
			_ = app.SetLinger(0)
			_ = app.Close()
			s.finishToApp(werr)
			return
		}
	}
}

// drainPanicked ends the stream whose drain goroutine panicked with v (a
// bug in the write to the app, or in what leads to it): a goroutine of
// the stream's own, where nothing recovered, and the panic ended the
// process, every connection with it. chs, the chunks the write had taken
// off the queue, give back their buffers and their connection window,
// as the reset does for those still queued (held, that window was lost
// to every stream of the connection). The connection goes on: drain
// takes none of its locks, and the stream's only around updates of its
// fields. mine: the panic came during drain's write, whose writing flag
// is cleared here.
func (s *Stream) drainPanicked(v any, chs []chunk, mine bool) {
	stack := debug.Stack()
	s.rmu.Lock()
	if mine {
		s.writing = false
	}
	s.drainer = false
	app := s.app
	s.rmu.Unlock()
	s.signal()
	s.endPanicked("the stream's delivery to its app", v, stack, app)
	s.consumed(chs)
}

// endPanicked ends a stream alone after a panic (v, with the stack) on
// code that serves it alone: where says what panicked. Splice returns a
// *PanicError; the stream is reset (INTERNAL_ERROR: the peer is told)
// and the app's socket closed with a reset. Config.OnPanic is not told:
// Splice's caller is, once, and knows which connection it was (the
// agent counted such a panic twice, OnPanic's count and the
// connection's end with the panic as its error).
func (s *Stream) endPanicked(where string, v any, stack []byte, app *net.TCPConn) {
	// Before the reset: Splice's error is the panic, not the reset's.
	s.finishToApp(&PanicError{Where: where, Value: v, Stack: stack})
	s.Reset(ErrCodeInternal)
	if app != nil {
		_ = app.SetLinger(0)
		_ = app.Close()
	}
}

// PanicError is Splice's error when a panic hbone recovered ended that
// stream alone: a panic on its drain goroutine (the writes of received
// bytes to the app) or in its OnResponse callback. Its connection goes
// on, and Config.OnPanic is not told: the caller of Splice counts and
// logs it, once.
type PanicError struct {
	Where string // what panicked
	Value any    // the panic's value
	Stack []byte // the stack of the goroutine that panicked
}

func (e *PanicError) Error() string { return fmt.Sprintf("hbone: %s panicked: %v", e.Where, e.Value) }

// handleResponse acts on a client stream's response once Splice runs:
// a 2xx opens delivery to the app, anything else resets both sides.
func (s *Stream) handleResponse() {
	s.rmu.Lock()
	if s.respDone || s.app == nil {
		s.rmu.Unlock()
		return
	}
	select {
	case <-s.resp:
	default:
		s.rmu.Unlock()
		return
	}
	s.respDone = true
	st := s.status
	app := s.app
	s.rmu.Unlock()
	if st == 0 {
		return // reset before a response: dropBuffers finishes
	}
	if s.onResp != nil && !s.runOnResp(st, app) {
		return
	}
	if !accepted(st) {
		s.finishToApp(StatusError{st})
		s.Reset(ErrCodeCancel)
		_ = app.SetLinger(0)
		_ = app.Close()
		return
	}
	s.enableDelivery()
}

// runOnResp runs the OnResponse callback, false when it panicked: that
// ends this stream alone (endPanicked), as a panic of its drain does. The
// callback is the caller's code (the agent counts the connection open
// there): on the read loop, where it runs when the response comes after
// Splice, its panic closed the connection and every stream on it, and
// the agent counted it twice, OnPanic's count and the stream's failure
// with the panic as its error.
func (s *Stream) runOnResp(st int, app *net.TCPConn) (ok bool) {
	defer func() {
		if v := recover(); v != nil {
			s.endPanicked("its OnResponse callback", v, debug.Stack(), app)
		}
	}()
	s.onResp(st)
	return true
}

// enableDelivery lets the read loop write to the app, and starts a
// drainer if bytes are already waiting.
func (s *Stream) enableDelivery() {
	rc, err := s.app.SyscallConn()
	if err != nil {
		s.finishToApp(err)
		return
	}
	s.rmu.Lock()
	s.direct = rc
	// Bytes that arrived before the app was connected (optimistic
	// send): write what the socket takes now, without a goroutine.
	var early []chunk
	if !s.writing && !s.drainer && len(s.chunks) > 0 {
		early = s.chunks
		s.chunks = nil
		s.writing = true
	}
	s.rmu.Unlock()
	if early != nil {
		var n int64
		rest := early[:0]
		for i, ch := range early {
			k := writeNonBlocking(rc, ch.data)
			n += int64(k)
			if k < len(ch.data) {
				early[i].data = ch.data[k:]
				rest = early[i:]
				break
			}
			if ch.bp != nil {
				putBuf(ch.bp)
			}
			if i == len(early)-1 {
				rest = nil
			}
		}
		s.rmu.Lock()
		s.writing = false
		s.directN += n
		s.buffered -= n
		var dropped []chunk
		if s.recvErr != nil {
			// Reset during the write: dropBuffers emptied the queue
			// and nothing will drain it again. Put back, the rest held
			// the connection's window (and its buffers) for good.
			dropped = rest
		} else {
			s.chunks = append(rest, s.chunks...)
		}
		s.rmu.Unlock()
		s.signal() // a drainer may wait for writing to end
		bufferedBytes.Add(-n)
		s.creditWindow(n)
		s.consumed(dropped)
	}
	s.rmu.Lock()
	var fin bool
	if s.recvEnd && len(s.chunks) == 0 && !s.writing && !s.drainer && s.recvErr == nil {
		fin = true
	}
	start := !fin && s.kickLocked()
	s.rmu.Unlock()
	if fin {
		s.finToApp(s.app)
	}
	if start {
		go s.drain()
	}
}

func (s *Stream) markRemoteEnd() { s.ended(&s.remoteEnd) }

// ended records one direction's END_STREAM (side is &s.sentEnd or
// &s.remoteEnd) and releases the stream once both went by.
func (s *Stream) ended(side *bool) {
	c := s.c
	c.mu.Lock()
	*side = true
	done := s.sentEnd && s.remoteEnd
	c.mu.Unlock()
	if done {
		c.release(s)
	}
}

func (s *Stream) gotHeaders(fields []hpack.HeaderField, end bool) {
	if fields != nil && s.c.client {
		st, info, bad := 0, false, error(nil)
		select {
		case <-s.resp:
			// Trailers, or a stream already reset: only END_STREAM
			// matters. After the final response only trailers may
			// come, and they end the stream (RFC 9113 §8.1): a block
			// without END_STREAM is malformed, a stream error, as
			// the malformed responses before it are. It was ignored.
			if !end {
				s.malformedAfterResponse()
				return
			}
		default:
			st, info, bad = parseResponse(fields, end)
			if info {
				// An informational response (100, 103, ...): the final
				// one follows on the same stream (RFC 9113 §8.1). Read
				// loop only, so the count needs no lock; bounded so a
				// peer cannot hold the stream in 1xx for ever (each
				// block is decoded, up to MaxHeaderListSize).
				s.informational++
				if s.informational <= maxInformational {
					return
				}
				st, bad = 0, fmt.Errorf("more than %d informational (1xx) responses before the final one", maxInformational)
			}
		}
		if !s.answered(fields, st, end, bad) {
			return
		}
	}
	if end {
		s.pushData(nil, nil, true)
	}
}

// errHeadersAfterResponse: a HEADERS without END_STREAM after the final
// response (RFC 9113 §8.1).
var errHeadersAfterResponse = errors.New("HEADERS without END_STREAM after the final response (only trailers, which end the stream, may follow it)")

// malformedAfterResponse resets a client stream that got
// errHeadersAfterResponse with PROTOCOL_ERROR; its reader, or the app
// through Splice, sees a ResponseError saying so (set before the reset,
// which keeps an error already there: one reset earlier stays as it was).
func (s *Stream) malformedAfterResponse() {
	s.rmu.Lock()
	if s.recvErr == nil && !(s.recvEnd && len(s.chunks) == 0) {
		s.recvErr = ResponseError{Reason: errHeadersAfterResponse.Error()}
	}
	s.rmu.Unlock()
	s.Reset(ErrCodeProtocol)
}

// answered records a client stream's response, the final one: st, or 0
// with bad saying why there is none usable. fields are its headers (nil
// for none). A refusal or an unusable response ends the stream here;
// false then, and the caller has nothing more to do with the frame.
func (s *Stream) answered(fields []hpack.HeaderField, st int, end bool, bad error) bool {
	first, closed := false, false
	s.respOnce.Do(func() {
		s.respHeader = append([]hpack.HeaderField(nil), fields...)
		s.status = st
		if !accepted(st) {
			// Before the response is visible: whoever sees it
			// (Splice, a reader) also sees the refusal and, with
			// the server's END_STREAM, a stream that may be closed
			// both ways.
			closed = s.refusing(end, bad)
		}
		close(s.resp)
		first = true
	})
	if first && !accepted(s.status) {
		s.refused(closed)
		return false
	}
	s.handleResponse()
	return true
}

// awaitsResponse is whether a client stream has had no final response
// yet (a reset one has, with status 0).
func (s *Stream) awaitsResponse() bool {
	if !s.c.client {
		return false
	}
	select {
	case <-s.resp:
		return false
	default:
		return true
	}
}

// errDataBeforeResponse: RFC 9113 §8.1 makes DATA before the final
// response's HEADERS malformed. Delivered, it reached the app ahead of
// the tunnel's opening (or of a refusal), bytes no server meant for it:
// since 1xx responses are skipped, "100, DATA, 200" spliced the DATA
// into the tunnel. x/net's client resets the stream with PROTOCOL_ERROR
// too.
var errDataBeforeResponse = errors.New("DATA before the final response")

// accepted is whether a final CONNECT response status opens the
// tunnel: any 2xx does (RFC 9110 §9.3.6), not only the 200 every HBONE
// server we know sends.
func accepted(status int) bool { return status >= 200 && status <= 299 }

// parseResponse reads a response header block's :status. info is an
// informational (1xx) response to skip; bad says why the block is no
// usable response (status 0): RFC 9113 §8.3.2 asks for exactly one
// :status of three digits, §8.1 for no END_STREAM on a 1xx, and §8.6
// removes 101 (Switching Protocols) from HTTP/2.
func parseResponse(fields []hpack.HeaderField, end bool) (status int, info bool, bad error) {
	n := 0
	for _, f := range fields {
		if f.Name != ":status" {
			continue
		}
		n++
		v := f.Value
		if len(v) != 3 || v[0] < '1' || v[0] > '9' || v[1] < '0' || v[1] > '9' || v[2] < '0' || v[2] > '9' {
			return 0, false, fmt.Errorf("malformed response: :status %q is not a 3-digit code", v)
		}
		status = int(v[0]-'0')*100 + int(v[1]-'0')*10 + int(v[2]-'0')
	}
	switch {
	case n == 0:
		return 0, false, errors.New("malformed response: no :status")
	case n > 1:
		return 0, false, errors.New("malformed response: more than one :status")
	case status == 101:
		return 0, false, errors.New("101 (Switching Protocols) answers a CONNECT; HTTP/2 has no 101 (RFC 9113 §8.6)")
	case status < 200 && end:
		return 0, false, fmt.Errorf("malformed response: informational %d ends the stream", status)
	case status < 200:
		return status, true, nil
	}
	return status, false, nil
}

// ResponseError is a CONNECT response the client cannot use: malformed,
// a 101, or too many informational responses before the final one; or a
// HEADERS without END_STREAM after the final response. The stream is
// reset with PROTOCOL_ERROR, which Unwrap gives.
type ResponseError struct{ Reason string }

func (e ResponseError) Error() string { return "hbone: bad CONNECT response: " + e.Reason }

// Unwrap is the reset it caused, so errors.As finds a StreamError.
func (e ResponseError) Unwrap() error { return StreamError{Code: ErrCodeProtocol} }

// refusing records a client stream's refusal, a CONNECT answered with
// any status but 2xx (0: none usable, bad says why): the tunnel never
// opened, so the stream is an error for its reader and writer from here
// on, whatever the server sends next. Its END_STREAM on the response, or
// the RST_STREAM(NO_ERROR) RFC 9113 §8.1 lets it send after a complete
// response, must not make it a stream that ended cleanly: a reader (the
// app, through Splice or a copy) would take the EOF for a server that
// accepted and closed. The error is set before any reset, which keeps an
// error already there and never replaces this one (dropBuffers). With
// end, the server's END_STREAM is recorded here too, before anything can
// reset the stream (Splice does at once when it sees the refusal): a
// stream closed both ways gets no RST_STREAM (RFC 9113 §5.1). closed is
// whether it is, and then the caller releases it.
func (s *Stream) refusing(end bool, bad error) (closed bool) {
	var err error = StatusError{s.status}
	if s.status == 0 {
		err = ResponseError{Reason: bad.Error()}
	}
	s.rmu.Lock()
	if s.recvErr == nil {
		s.recvErr = err
	}
	s.rmu.Unlock()
	if end {
		// As markRemoteEnd, but the release waits for refused: not
		// under respOnce.
		c := s.c
		c.mu.Lock()
		s.remoteEnd = true
		closed = s.sentEnd
		c.mu.Unlock()
	}
	return closed
}

// refused ends a stream refusing recorded: Splice, if it runs, hears
// the status and resets the app, and the stream is reset unless it is
// closed both ways already.
func (s *Stream) refused(closed bool) {
	code := ErrCodeCancel
	if s.status == 0 {
		code = ErrCodeProtocol // a malformed response (RFC 9113 §8.1.1)
	}
	s.handleResponse()
	if closed {
		s.c.release(s)
	}
	s.Reset(code)
}

// Response waits for the response headers (client side) and returns the
// status, the final one (informational responses are skipped). A
// status other than 2xx is not an error here, but the stream is over:
// its Read and Write return StatusError. A response the client cannot
// use (malformed, a 101) is a ResponseError, with status 0.
func (s *Stream) Response(ctx context.Context) (int, []hpack.HeaderField, error) {
	select {
	case <-s.resp:
	case <-ctx.Done():
		return 0, nil, ctx.Err()
	}
	if s.status != 0 {
		return s.status, s.respHeader, nil
	}
	// Closed without a response: the stream was reset or the connection
	// died.
	s.rmu.Lock()
	err := s.recvErr
	s.rmu.Unlock()
	if err == nil {
		err = StreamError{Code: ErrCodeCancel}
	}
	return 0, nil, err
}

// Status is the final response's status (client side) once it has
// arrived, and 0 before, or for a stream that ended without one. It
// never waits. After Splice returns it says whether the peer answered by
// then: OnResponse, run on the read loop, may still be running then (the
// app reset the connection as the answer arrived), and what it records
// cannot be read without a race.
func (s *Stream) Status() int {
	select {
	case <-s.resp:
		return s.status
	default:
		return 0
	}
}

// ResponseHeader is the value of the response's header name (client
// side), "" while no response has arrived or when it has no such header.
// Safe from an OnResponse callback.
func (s *Stream) ResponseHeader(name string) string {
	select {
	case <-s.resp:
	default:
		return ""
	}
	for _, f := range s.respHeader {
		if f.Name == name {
			return f.Value
		}
	}
	return ""
}

// Respond sends the response headers (server side). A 2xx opens the
// tunnel and keeps the stream open, as the client takes any 2xx for the
// tunnel's start (accepted; only 200 did, and a 204 went out with
// END_STREAM and RST_STREAM(NO_ERROR) under a client that had opened
// its tunnel); any other status ends the stream. Only final statuses:
// a 1xx would go out with END_STREAM, which RFC 9113 §8.1 makes
// malformed, and an HBONE server has nothing to say before its answer.
func (s *Stream) Respond(status int, extra []hpack.HeaderField) error {
	if status < 200 || status > 599 {
		return fmt.Errorf("hbone: Respond(%d): not a final status (200-599)", status)
	}
	fields := make([]hpack.HeaderField, 0, 1+len(extra))
	fields = append(fields, hpack.HeaderField{Name: ":status", Value: strconv.Itoa(status)})
	fields = append(fields, extra...)
	end := !accepted(status)
	c := s.c
	held := false
	defer c.unwedge(&held)
	c.wmu.Lock()
	held = true
	if !end && c.closing.Load() {
		// The lock taken after a close began: a 2xx opens a tunnel
		// the close fails at once, and unanswered, the peer's CONNECT
		// says truly that it never opened, not that it opened and was
		// cut. A refusal goes out: it carries no data, and ends the
		// peer's stream with its answer. The handler's CloseWrite
		// then sends nothing (sendCut): END_STREAM with no response
		// HEADERS is malformed at the peer, DATA before the final
		// response (TestCloseWriteAfterADroppedRespondSendsNothing).
		held = false
		c.wmu.Unlock()
		c.mu.Lock()
		s.sendCut = true
		c.mu.Unlock()
		return c.closedErr()
	}
	// Queued control frames first and the block encoded after them: a
	// SETTINGS ACK queued meanwhile then follows this block, which was
	// encoded under the limit that ACK acknowledges, or an older one.
	c.corkOn()
	err := c.writeCtlLocked()
	if err == nil {
		_, err = c.nc.Write(c.encodeHeadersLocked(nil, s.id, fields, end))
	}
	if ferr := c.corkOff(); err == nil {
		err = ferr
	}
	if end && err == nil {
		s.wEnd = true
	}
	held = false
	c.wmu.Unlock()
	if err != nil {
		c.closeWith(fmt.Errorf("hbone: write: %w", err), ErrCodeNo)
		return c.closedErr()
	}
	if end {
		c.mu.Lock()
		s.sentEnd = true
		done := s.remoteEnd
		c.mu.Unlock()
		if done {
			c.release(s)
		} else {
			// We will not read the rest of the request: tell the peer to
			// stop (RFC 9113 §8.1) and forget the stream.
			s.Reset(ErrCodeNo)
		}
	}
	return nil
}

// reserve waits for send window and takes up to want bytes of it.
func (s *Stream) reserve(want int) (int, error) {
	s.panicHook()
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		switch {
		case s.reset:
			return 0, s.sendErrLocked()
		case c.closed:
			s.sendCut = true
			return 0, closedError(c.closeErr)
		case s.sentEnd:
			return 0, errors.New("hbone: write after CloseWrite")
		}
		w := min(s.sendWin, c.connSendWin)
		if w > 0 {
			n := int(min(int64(want), w))
			s.sendWin -= int64(n)
			c.connSendWin -= int64(n)
			return n, nil
		}
		c.cond.Wait()
	}
}

func (s *Stream) sendErrLocked() error {
	s.rmu.Lock()
	defer s.rmu.Unlock()
	if s.recvErr != nil {
		return s.recvErr
	}
	return StreamError{Code: ErrCodeCancel}
}

// sendFrom sends buf[frameHeaderLen:frameHeaderLen+n] as DATA frames,
// writing each frame header into the bytes just in front of its payload
// (already sent or the headroom), so nothing is copied. end puts
// END_STREAM on the last frame (a half-close riding on the data, as
// CloseWrite would send it alone). All the frames the send window allows
// at once go out as one burst (one write(2) for a whole read of the app:
// on this kind of VM every system call costs microseconds).
func (s *Stream) sendFrom(buf []byte, n int, end bool) error {
	c := s.c
	held := false
	defer c.unwedge(&held)
	off := 0
	for off < n {
		k, err := s.reserve(n - off)
		if err != nil {
			return err
		}
		fs := s.frameSize()
		c.wmu.Lock()
		held = true
		if s.wEnd {
			held = false
			c.wmu.Unlock()
			s.unreserve(k)
			return errors.New("hbone: write after CloseWrite")
		}
		if c.closing.Load() {
			// The lock taken after a close began (queued behind the
			// writer it waits for): the stream fails with the close,
			// and this burst, up to a MiB on a full socket, only held
			// the close longer (TestCloseSkipsTheBurstsQueuedBehindIt).
			held = false
			c.wmu.Unlock()
			c.mu.Lock()
			s.sendCut = true
			c.mu.Unlock()
			s.unreserve(k)
			return c.closedErr()
		}
		// The records of k bytes: 22 bytes of TLS overhead per 16 KiB,
		// 9 of framing per frame, and room for queued control frames.
		c.corkOnFor(k + k/256 + 4096)
		err = c.writeCtlLocked()
		u := min(fs, windowUpdateUnit)
		c.dataSent.Add(int64((k + u - 1) / u))
		for j := off; j < off+k && err == nil; {
			m := min(fs, off+k-j)
			var flags uint8
			if end && j+m == n {
				flags = flagEndStream
			}
			// The header overwrites the tail of the previous frame's
			// payload, which tls.Write has already encrypted and copied.
			putFrameHeader(buf[j:j+frameHeaderLen], frameHeader{Length: uint32(m), Type: frameData, Flags: flags, StreamID: s.id})
			_, err = c.nc.Write(buf[j : j+frameHeaderLen+m])
			j += m
		}
		if end && off+k == n && err == nil {
			s.wEnd = true
		}
		if ferr := c.corkOff(); err == nil {
			err = ferr
		}
		held = false
		c.wmu.Unlock()
		if err != nil {
			// Failed most often because the connection was closed
			// under the write (keepalive's deadline for its GOAWAY
			// ends a blocked one): its reason, not ours, if it came
			// first.
			c.closeWith(fmt.Errorf("hbone: write: %w", err), ErrCodeNo)
			return c.closedErr()
		}
		off += k
	}
	if end {
		s.sentEndStream()
	}
	return nil
}

// sentEndStream records that END_STREAM went out.
func (s *Stream) sentEndStream() { s.ended(&s.sentEnd) }

// sendWindow is how much may be sent now on the stream (0 if nothing).
func (s *Stream) sendWindow() int {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	return int(max(0, min(s.sendWin, s.c.connSendWin)))
}

func (s *Stream) frameSize() int {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	return min(s.c.cfg.SendFrameSize, int(s.c.peerMaxFrame))
}

// Write sends p as DATA (copying it; Splice does not copy).
func (s *Stream) Write(p []byte) (int, error) {
	fs := s.frameSize()
	written := 0
	for len(p) > 0 {
		n := min(len(p), fs)
		bp := getBuf(frameHeaderLen + n)
		copy((*bp)[frameHeaderLen:], p[:n])
		err := s.sendFrom(*bp, n, false)
		putBuf(bp)
		if err != nil {
			return written, err
		}
		written += n
		p = p[n:]
	}
	return written, nil
}

// CloseWrite half-closes: END_STREAM, like a TCP FIN.
func (s *Stream) CloseWrite() error {
	c := s.c
	c.mu.Lock()
	if s.sentEnd || s.reset {
		c.mu.Unlock()
		return nil
	}
	if s.sendCut {
		// Its last bytes were dropped by the close: END_STREAM would
		// tell the peer they were all sent. The close ends the stream.
		err := closedError(c.closeErr)
		c.mu.Unlock()
		return err
	}
	c.mu.Unlock()
	var b [frameHeaderLen]byte
	putFrameHeader(b[:], frameHeader{Type: frameData, Flags: flagEndStream, StreamID: s.id})
	held := false
	defer c.unwedge(&held)
	c.wmu.Lock()
	held = true
	if s.wEnd {
		// Another CloseWrite (or a send with END_STREAM) got here first.
		held = false
		c.wmu.Unlock()
		return nil
	}
	err := c.writeBurstLocked(b[:])
	if err == nil {
		s.wEnd = true
		c.dataSent.Add(1)
	}
	held = false
	c.wmu.Unlock()
	if err != nil {
		c.closeWith(fmt.Errorf("hbone: write: %w", err), ErrCodeNo)
		return c.closedErr()
	}
	s.sentEndStream()
	return nil
}

// unreserve gives back send window reserved for bytes not sent.
func (s *Stream) unreserve(n int) {
	c := s.c
	c.mu.Lock()
	s.sendWin += int64(n)
	c.connSendWin += int64(n)
	c.cond.Broadcast()
	c.mu.Unlock()
}

// consumed recycles delivered chunks and returns their window to the
// peer once a quarter of the window has been taken by the app.
func (s *Stream) consumed(chs []chunk) {
	var n int64
	for _, ch := range chs {
		n += int64(len(ch.data))
		if ch.bp != nil {
			putBuf(ch.bp)
		}
	}
	s.credit(n)
}

func (s *Stream) credit(n int64) {
	if n == 0 {
		return
	}
	bufferedBytes.Add(-n)
	s.rmu.Lock()
	s.buffered -= n
	s.rmu.Unlock()
	s.creditWindow(n)
}

// creditWindow returns n delivered bytes of window to the peer.
func (s *Stream) creditWindow(n int64) {
	s.c.returnConnWindow(n)
	s.rmu.Lock()
	if s.recvEnd || s.recvErr != nil {
		s.rmu.Unlock()
		return
	}
	s.unacked += n
	var u int64
	if s.unacked >= int64(s.c.cfg.StreamWindow/4) {
		u = s.unacked
		s.unacked = 0
		s.recvAvail += u
	}
	s.rmu.Unlock()
	if u > 0 {
		s.c.queueCtl(appendWindowUpdate(nil, s.id, uint32(u)))
	}
}

// Read reads received bytes (copying; Splice writes chunks to the app
// directly).
func (s *Stream) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	for {
		s.rmu.Lock()
		if len(s.chunks) > 0 {
			n := 0
			var done []chunk
			for n < len(p) && len(s.chunks) > 0 {
				ch := &s.chunks[0]
				k := copy(p[n:], ch.data)
				n += k
				ch.data = ch.data[k:]
				if len(ch.data) == 0 {
					done = append(done, chunk{bp: ch.bp})
					s.chunks = s.chunks[1:]
				}
			}
			s.rmu.Unlock()
			for _, ch := range done {
				if ch.bp != nil {
					putBuf(ch.bp)
				}
			}
			s.credit(int64(n))
			return n, nil
		}
		err := s.recvErr
		if err == nil && s.recvEnd {
			err = io.EOF
		}
		s.rmu.Unlock()
		if err != nil {
			return 0, err
		}
		<-s.rsig
	}
}

// Reset aborts the stream with RST_STREAM(code).
func (s *Stream) Reset(code ErrCode) {
	s.doReset(StreamError{Code: code}, true)
}

func (s *Stream) remoteReset(code ErrCode) {
	s.doReset(StreamError{Code: code, Remote: true}, false)
}

// connClosed ends the stream with its connection. What the peer sent in
// full (its END_STREAM was read) stays readable to the end, as a
// socket's received bytes stay readable after the peer's FIN: a peer
// that is done may close the connection right after its last frame,
// before this side recorded its own END_STREAM as sent (the write has
// returned, sentEnd is set just after), and dropping the buffer then
// threw away a complete answer (TestShutdownRefusesNoOpenedStream: the
// echo lost, "connection closed", in ~3% of runs beside a busy loop).
// Sending fails from now on: reserve sees the closed connection.
func (s *Stream) connClosed(err error) {
	s.rmu.Lock()
	complete := s.recvEnd && s.recvErr == nil
	s.rmu.Unlock()
	if !complete {
		s.doReset(err, false)
		return
	}
	s.respOnce.Do(func() { close(s.resp) })
	s.c.release(s)
	// A spliced app gets the rest and the FIN.
	s.rmu.Lock()
	start := s.kickLocked()
	s.rmu.Unlock()
	if start {
		go s.drain()
	}
}

func (s *Stream) doReset(err error, send bool) {
	c := s.c
	c.mu.Lock()
	if s.reset || (s.sentEnd && s.remoteEnd) {
		c.mu.Unlock()
		if !s.reset {
			// Both sides finished: nothing to reset, but drop buffers.
			s.dropBuffers(err)
		}
		return
	}
	s.reset = true
	c.cond.Broadcast()
	c.mu.Unlock()
	if send && s.id != 0 {
		c.queueCtl(appendRST(nil, s.id, err.(StreamError).Code))
	}
	s.dropBuffers(err)
	s.respOnce.Do(func() { close(s.resp) })
	c.release(s)
}

func (s *Stream) dropBuffers(err error) {
	s.rmu.Lock()
	chs := s.chunks
	s.chunks = nil
	if s.recvErr == nil && !(s.recvEnd && len(chs) == 0) {
		s.recvErr = err
	}
	abort := s.abort
	rerr := s.recvErr
	s.rmu.Unlock()
	s.consumed(chs)
	s.signal()
	if abort != nil && rerr != nil {
		abort()
	}
	if rerr != nil {
		s.finishToApp(rerr)
	} else {
		// Both sides ended cleanly: make sure a pending FIN is delivered.
		s.rmu.Lock()
		start := s.kickLocked()
		s.rmu.Unlock()
		if start {
			go s.drain()
		}
	}
}

// Close ends the stream: a reset unless both directions already ended.
func (s *Stream) Close() error {
	s.Reset(ErrCodeCancel)
	return nil
}

// StatusError is a CONNECT answered with a final status other than 2xx.
type StatusError struct{ Status int }

func (e StatusError) Error() string {
	return "hbone: CONNECT refused with status " + strconv.Itoa(e.Status)
}

// OnResponse registers fn, called by Splice on a client stream with the
// response status once it arrives (before any byte reaches the app). A
// panic in fn ends that stream alone, Splice returning a *PanicError;
// for a refusal that came before Splice ran, fn runs on Splice's
// goroutine and its panic goes on to Splice's caller.
func (s *Stream) OnResponse(fn func(status int)) { s.onResp = fn }

// SpliceResult is what Splice moved.
type SpliceResult struct {
	// ToApp and FromApp count payload bytes in each direction.
	ToApp, FromApp int64
	// Err is the first failure ("" for a clean close both ways).
	Err error
}

// Splice joins the stream and a TCP connection until both directions have
// ended, then closes app. A TCP FIN becomes END_STREAM and vice versa; a
// reset on either side resets the other.
func (s *Stream) Splice(app *net.TCPConn) SpliceResult {
	var res SpliceResult
	done := make(chan error, 1)
	s.rmu.Lock()
	s.abort = func() {
		_ = app.SetLinger(0)
		_ = app.Close()
	}
	s.app = app
	s.toAppDone = done
	pendingErr := s.recvErr
	var refusal StatusError
	early := pendingErr != nil && !s.respDone && errors.As(pendingErr, &refusal)
	if pendingErr != nil {
		s.respDone = true
	}
	s.rmu.Unlock()
	if early && s.onResp != nil {
		// Refused before Splice ran: the caller still hears the status
		// (its metrics tell a 503 from a 401).
		s.onResp(refusal.Status)
	}
	if pendingErr != nil {
		_ = app.SetLinger(0)
		app.Close()
		res.Err = pendingErr
		return res
	}
	if s.c.client {
		// Nothing reaches the app before the tunnel is up (the app's
		// first bytes may already be on their way: optimistic send).
		s.handleResponse()
		t := time.AfterFunc(s.c.cfg.ResponseTimeout, func() {
			s.rmu.Lock()
			waiting := !s.respDone
			s.rmu.Unlock()
			if waiting {
				s.Reset(ErrCodeCancel)
			}
		})
		defer t.Stop()
	} else {
		s.enableDelivery()
	}
	n, perr := s.pumpFrom(app)
	res.FromApp = n
	if perr != nil {
		s.Reset(ErrCodeCancel)
		_ = app.SetLinger(0)
		app.Close()
	}
	derr := <-done
	if derr != nil && perr == nil {
		s.Reset(ErrCodeCancel)
		_ = app.SetLinger(0)
	}
	app.Close()
	s.rmu.Lock()
	res.ToApp = s.directN
	s.abort = nil
	s.direct = nil
	s.rmu.Unlock()
	switch {
	case isPanic(derr):
		// What ended the stream, ahead of the pump's error for the
		// reset that followed.
		res.Err = derr
	case perr != nil:
		res.Err = perr
	case derr != nil:
		res.Err = derr
	}
	return res
}

// isPanic is whether a stream's delivery ended on a panic (endPanicked).
func isPanic(err error) bool {
	_, ok := err.(*PanicError)
	return ok
}

// pumpFrom moves app → stream until EOF (then END_STREAM) or an error.
// It waits for readability before taking a buffer, so an idle
// connection holds none.
func (s *Stream) pumpFrom(app *net.TCPConn) (int64, error) {
	rc, err := app.SyscallConn()
	if err != nil {
		return 0, err
	}
	// A read takes up to a frame (64 KiB), or, while the app streams
	// (the last read filled its buffer), up to AppReadSize as far as the
	// send window goes: sendFrom frames it and writes it all at once.
	// Request/response streams, which never fill a frame, so hold no
	// bigger buffer than before while they wait for the write lock.
	// At most maxBigReads streams of a connection hold such a bigger
	// buffer at once (the others read a frame): a pump keeps its buffer
	// while it waits for the write lock, and when the peer stops reading
	// every streaming pump waits, so a peer that drew 200 streams into
	// streaming and then stopped reading held 200 of them (54 MiB).
	var size int
	full := false
	var total int64
	// big: the read under way holds one of the connection's big-read
	// slots, from takeBigRead until its bytes are sent. Given back here
	// too, deferred: a panic in between (in the read, or in sendFrom
	// outside its write lock: reserve, frameSize) left the slot taken
	// on a connection that stays open (a panic under the lock closes
	// it), and after maxBigReads of them none of its streams read more
	// than a frame (TestPumpPanicFreesBigRead).
	big := false
	defer func() { s.c.endBigRead(big) }()
	// A server's app often closes right after its answer (request,
	// response, close): on the stream's first read, if the socket was
	// drained, look once more, and a FIN already there leaves as
	// END_STREAM on the answer's DATA frame: one record, one write(2)
	// and one wake-up of the far side instead of two. Only then: on later
	// reads the extra read(2) would mostly find nothing.
	lookahead := !s.c.client
	for {
		var bp *[]byte
		var n int
		var rerr, lerr error
		var eof bool
		size = s.frameSize()
		want := 0
		if full {
			want = min(s.c.cfg.AppReadSize, s.sendWindow())
		}
		err := rc.Read(func(fd uintptr) bool {
			// The token is taken once the app is readable (this runs
			// then), so a pump waiting for its app holds none.
			sz := size
			if want > size && s.c.takeBigRead() {
				sz, big = want, true
				s.panicHook()
			}
			bp = getBuf(frameHeaderLen + sz)
			n, rerr = readFD(fd, (*bp)[frameHeaderLen:frameHeaderLen+sz])
			full = rerr == nil && n == sz
			if rerr == unix.EAGAIN {
				putBuf(bp)
				bp = nil
				if big {
					s.c.bigReads.Add(-1)
					big = false
				}
				return false
			}
			if lookahead && rerr == nil && n > 0 {
				lookahead = false
				if n < sz {
					k, err := readFD(fd, (*bp)[frameHeaderLen+n:frameHeaderLen+sz])
					switch {
					case err == nil && k == 0:
						eof = true
					case err == nil:
						n += k
					case err != unix.EAGAIN:
						lerr = err // after the data, as a next read would
					}
				}
			}
			return true
		})
		if err == nil {
			err = rerr
		}
		if err != nil {
			if bp != nil {
				putBuf(bp)
			}
			s.c.endBigRead(big)
			big = false
			if errors.Is(err, net.ErrClosed) {
				// Closed under us by a reset from the far side.
				return total, nil
			}
			return total, &net.OpError{Op: "read", Net: "tcp", Err: err}
		}
		if n <= 0 {
			putBuf(bp)
			s.c.endBigRead(big)
			big = false
			s.sawAppEOF()
			return total, s.CloseWrite()
		}
		if eof {
			s.sawAppEOF()
		}
		err = s.sendFrom(*bp, n, eof)
		putBuf(bp)
		s.c.endBigRead(big)
		big = false
		if err != nil {
			return total, err
		}
		total += int64(n)
		if eof {
			return total, nil
		}
		if lerr != nil {
			return total, &net.OpError{Op: "read", Net: "tcp", Err: lerr}
		}
	}
}

func (s *Stream) sawAppEOF() {
	s.rmu.Lock()
	s.appEOF = true
	s.rmu.Unlock()
}
