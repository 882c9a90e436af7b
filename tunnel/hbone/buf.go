package hbone

import (
	"context"
	"io"
	"math/bits"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Buffers come from size-classed pools (powers of two from 2 KiB to
// 2 MiB), plus frameHeaderLen of headroom, so a pump can read payload
// behind room for its frame header.
const (
	minClassShift = 11
	maxClassShift = 21
)

var bufPools [maxClassShift - minClassShift + 1]sync.Pool

func classOf(n int) int {
	if n <= 1<<minClassShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minClassShift
}

// getBuf returns a buffer of length n (capacity may be larger). A class's
// buffers have frameHeaderLen bytes beyond its power of two, so a request
// of a power of two plus the headroom (a pump's read of a frame, 64 KiB +
// 9) fits its class: it took the next, twice the memory (a peer that
// stopped reading held 512 KiB per stream instead of 256 KiB).
func getBuf(n int) *[]byte {
	c := classOf(max(n-frameHeaderLen, 0))
	if c >= len(bufPools) {
		b := make([]byte, n)
		return &b
	}
	if v := bufPools[c].Get(); v != nil {
		bp := v.(*[]byte)
		*bp = (*bp)[:n]
		return bp
	}
	b := make([]byte, n, (1<<(c+minClassShift))+frameHeaderLen)
	return &b
}

func putBuf(bp *[]byte) {
	c := classOf(cap(*bp) - frameHeaderLen)
	if c >= len(bufPools) || cap(*bp) != (1<<(c+minClassShift))+frameHeaderLen {
		return // odd size: let the GC have it
	}
	bufPools[c].Put(bp)
}

// corkConn batches the TLS records of one burst into one write(2): while
// corked, writes are appended to a buffer that Flush sends at once.
// Uncorked (during the handshake, or writes tls makes on its own from the
// read path) it passes writes through. The buffer comes from the pool for
// the burst and goes back after it, so a connection holds none between
// bursts (a burst is up to a whole app read: AppReadSize of payload).
type corkConn struct {
	net.Conn
	mu     sync.Mutex
	corked bool
	bp     *[]byte // pooled, only during a burst
	buf    []byte
	hint   int // expected size of the burst
	err    error

	// blockedSince is when the write(2) in progress first found the
	// socket full (nanotime; 0 while no write waits on it): read
	// without the lock by Conn.WriteStalled, the pool's sign of a peer
	// that does not drain. Only the burst's flush (writeAll) stamps
	// it; the handshake's and crypto/tls's own writes are not frames.
	blockedSince atomic.Int64
	// guard bounds the current burst's write (an open's HEADERS: its
	// opener's context), nil when nothing does; cut is armed once that
	// write blocks. Both under mu.
	guard context.Context
	cut   *writeCut
	// cutBy is the error of the context whose end cut the socket,
	// stored before the cut closes it: the read loop or another writer
	// may find the socket closed, and close the connection, before the
	// opener whose write was cut does (Conn.closeWith names the cut).
	cutBy atomic.Pointer[error]
	// writeAll's state, under mu, and its step (c.step, made once).
	wb        []byte
	wn        int
	werr      error
	writeStep func(fd uintptr) bool

	// Read side (one reader at a time: crypto/tls's input lock).
	// crypto/tls asks for about a record at a time (its buffer grows
	// little), so a bulk receiver made a read(2) per ~32 KiB; reading
	// up to readSize into a pooled buffer takes all that waits at once.
	// The buffer is taken only once the socket is readable and given
	// back when emptied, so an idle connection holds none.
	raw      syscall.RawConn // nil: plain reads and writes
	readSize int
	full     bool // the last read filled its buffer
	rbp      *[]byte
	rbuf     []byte // unread part of *rbp

	// onRead: Config.HandshakeReads during Server's handshake, nil
	// otherwise (set and cleared on the reading goroutine).
	onRead func(waiting bool)
}

func newCorkConn(nc net.Conn, readSize int) *corkConn {
	c := &corkConn{Conn: nc}
	if sc, ok := nc.(syscall.Conn); ok {
		if rc, err := sc.SyscallConn(); err == nil {
			c.raw, c.readSize = rc, readSize
			c.writeStep = c.step
		}
	}
	return c
}

func (c *corkConn) Read(p []byte) (int, error) {
	if len(c.rbuf) > 0 {
		n := copy(p, c.rbuf)
		c.rbuf = c.rbuf[n:]
		if len(c.rbuf) == 0 {
			putBuf(c.rbp)
			c.rbp, c.rbuf = nil, nil
		}
		return n, nil
	}
	// Without a buffer of ours (readSize <= 0) a reported handshake's
	// reads still go below, straight into p (size <= 0 below).
	if c.raw == nil || c.readSize <= 0 && c.onRead == nil {
		return c.Conn.Read(p)
	}
	// 32 KiB at a time (about what crypto/tls asks for), readSize while
	// the peer streams (the last read filled its buffer): a connection
	// carrying requests and answers takes no big buffer per read.
	size := min(32<<10, c.readSize)
	if c.full {
		size = c.readSize
	}
	var n int
	var rerr error
	var direct bool
	err := c.raw.Read(func(fd uintptr) bool {
		if c.onRead != nil {
			// Before the read(2), not after it: bytes it takes off
			// the socket are never unaccounted for, however long
			// this goroutine then waits for the CPU.
			c.onRead(false)
		}
		if len(p) >= size {
			direct = true
			n, rerr = readFD(fd, p)
			if rerr == unix.EAGAIN && c.onRead != nil {
				c.onRead(true)
			}
			return rerr != unix.EAGAIN
		}
		bp := getBuf(size)
		n, rerr = readFD(fd, (*bp)[:size])
		if rerr == unix.EAGAIN {
			putBuf(bp)
			if c.onRead != nil {
				c.onRead(true)
			}
			return false
		}
		if n > 0 {
			c.rbp, c.rbuf = bp, (*bp)[:n]
		} else {
			putBuf(bp)
		}
		return true
	})
	c.full = rerr == nil && n >= size
	if err != nil {
		return 0, err // closed, deadline: already a *net.OpError
	}
	if rerr != nil {
		return 0, &net.OpError{Op: "read", Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: wrapErrno("read", rerr)}
	}
	if n == 0 {
		return 0, io.EOF
	}
	if direct {
		return n, nil
	}
	return c.Read(p)
}

const corkMax = 1 << 20

func (c *corkConn) Write(b []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return 0, c.err
	}
	if !c.corked {
		if len(c.buf) > 0 {
			if err := c.flushLocked(); err != nil {
				return 0, err
			}
		}
		return c.Conn.Write(b)
	}
	if len(c.buf)+len(b) > corkMax && len(c.buf) > 0 {
		if err := c.flushLocked(); err != nil {
			return 0, err
		}
	}
	if len(b) >= corkMax {
		return c.Conn.Write(b)
	}
	if need := len(c.buf) + len(b); need > cap(c.buf) {
		// A buffer the size of the burst (the hint), grown through the
		// pool's classes if the hint fell short: a burst of control
		// frames or a 1 KB message does not take a 1 MiB buffer.
		bp := getBuf(min(corkMax, max(need, c.hint, 2*cap(c.buf))))
		nb := append((*bp)[:0], c.buf...)
		if c.bp != nil {
			putBuf(c.bp)
		}
		c.bp, c.buf = bp, nb
	}
	c.buf = append(c.buf, b...)
	return len(b), nil
}

// cork starts a burst of about hint bytes (0 if unknown).
func (c *corkConn) cork(hint int) {
	c.mu.Lock()
	c.corked = true
	c.hint = hint
	c.mu.Unlock()
}

// flush sends what is buffered and uncorks.
func (c *corkConn) flush() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.corked = false
	return c.flushLocked()
}

// corkGuarded is cork for a burst whose write must end before ctx does
// (flushGuarded).
func (c *corkConn) corkGuarded(hint int, ctx context.Context) {
	c.mu.Lock()
	c.corked = true
	c.hint = hint
	c.guard = ctx
	c.mu.Unlock()
}

// flushGuarded is flush for a corkGuarded burst. When its write has
// waited on a full socket for writeStallAfter (WriteStalled) and the
// guard's context has ended, the TCP socket is closed under it
// (writeCut) and cut is true: the write may have left part of a frame
// (a TLS record, even) on the wire, after which nothing else can be
// sent on the connection, so the caller closes it. No write deadline:
// the socket is shared, and a deadline left on it, or set while
// closeWith has set its own, could cut another writer's frame.
func (c *corkConn) flushGuarded() (cut bool, err error) {
	c.mu.Lock()
	// Deferred: a write that panics (the caller's unwedge closes the
	// connection) must not leave the lock held, or the close's own
	// writes wait on it for ever (TestWritePanicLeavesConnClosed).
	// The cut is settled here, under mu, before any other burst can
	// write: settled after the unlock, a context ending in between
	// closed the socket of a write that had completed, or under the
	// next writer's frame.
	defer func() {
		if wc := c.cut; wc != nil {
			cut = !wc.state.CompareAndSwap(writeCutWriting, writeCutDone)
			wc.disarm()
		}
		c.guard, c.cut = nil, nil
		c.mu.Unlock()
	}()
	c.corked = false
	return false, c.flushLocked()
}

// noteBlocked runs when a burst's write first finds the socket full;
// mu held (flushLocked).
func (c *corkConn) noteBlocked() {
	c.blockedSince.Store(nanotime())
	// Done only now: on a timerCtx it makes the channel, an
	// allocation the open that never blocks does not pay.
	if c.guard != nil && c.cut == nil && c.guard.Done() != nil {
		wc := &writeCut{c: c, ctx: c.guard}
		wc.stop = context.AfterFunc(c.guard, wc.fire)
		c.cut = wc
	}
}

// untilStalled is how long from now until the write in progress has
// waited writeStallAfter on a full socket (<= 0: it has); the whole of
// writeStallAfter when no write waits now.
func (c *corkConn) untilStalled(now time.Time) time.Duration {
	if since := c.blockedSince.Load(); since != 0 {
		return time.Duration(since + int64(writeStallAfter) - monoNanos(now))
	}
	return writeStallAfter
}

// writeCut closes the socket under a guarded write still blocked when
// its context ends, once that write has waited writeStallAfter: the
// peer does not drain it. A write that waits only because the
// connection is busy (its bulk streams keep the socket full) is left to
// finish though its context ended (the tunnel's opener: its app's
// client went away): closing the socket closed the shared connection
// and every stream on it. Allocated only once the write blocks: the
// open that finds room in the socket pays nothing for its bound. state
// settles the race between the write ending and the cut: whichever
// moves it from writing first wins.
type writeCut struct {
	state atomic.Int32
	c     *corkConn
	ctx   context.Context            // the guard: its error is the cut's (cutBy)
	stop  func() bool                // the context's AfterFunc
	timer atomic.Pointer[time.Timer] // the wait for the stall, once the context ended
}

const (
	writeCutWriting = iota
	writeCutDone
	writeCutFired
)

// fire runs when the context ends, and again when a write still
// waiting then would count as stalled.
func (w *writeCut) fire() {
	if w.state.Load() != writeCutWriting {
		return
	}
	if d := w.c.untilStalled(time.Now()); d > 0 {
		w.timer.Store(time.AfterFunc(d, w.fire))
		if w.state.Load() != writeCutWriting {
			w.disarm() // settled meanwhile: flushGuarded may have missed the timer
		}
		return
	}
	if w.state.CompareAndSwap(writeCutWriting, writeCutFired) {
		err := w.ctx.Err()
		w.c.cutBy.Store(&err)
		w.c.Conn.Close()
	}
}

// cutErr is the error of the context whose end cut the socket (nil if
// none did).
func (c *corkConn) cutErr() error {
	if p := c.cutBy.Load(); p != nil {
		return *p
	}
	return nil
}

// disarm stops the context's AfterFunc and a pending wait for the stall.
func (w *writeCut) disarm() {
	w.stop()
	if t := w.timer.Load(); t != nil {
		t.Stop()
	}
}

// flushLocked writes the burst with raw write(2) (sys.go) when the
// socket allows it, else through the net.Conn.
func (c *corkConn) flushLocked() error {
	if len(c.buf) == 0 {
		c.release()
		return c.err
	}
	var err error
	if c.raw != nil {
		if _, err = c.writeAll(c.buf); err != nil {
			err = &net.OpError{Op: "write", Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: wrapErrno("write", err)}
		}
	} else {
		_, err = c.Conn.Write(c.buf)
	}
	if err != nil {
		c.err = err
	}
	c.release()
	return err
}

func (c *corkConn) release() {
	if c.bp != nil {
		putBuf(c.bp)
		c.bp = nil
	}
	c.buf = nil
}

// wrapErrno names the system call of a bare errno, as package net does;
// errors from the poller (closed, deadline) are passed as they are.
func wrapErrno(call string, err error) error {
	if e, ok := err.(syscall.Errno); ok {
		return os.NewSyscallError(call, e)
	}
	return err
}
