package hbone

import (
	"math/bits"
	"net"
	"sync"
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

// getBuf returns a buffer of length n (capacity may be larger).
func getBuf(n int) *[]byte {
	c := classOf(n)
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
// read path) it passes writes through.
type corkConn struct {
	net.Conn
	mu     sync.Mutex
	corked bool
	buf    []byte
	err    error
}

const corkMax = 256 << 10

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
	c.buf = append(c.buf, b...)
	return len(b), nil
}

func (c *corkConn) cork() {
	c.mu.Lock()
	c.corked = true
	c.mu.Unlock()
}

// flush sends what is buffered and uncorks.
func (c *corkConn) flush() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.corked = false
	return c.flushLocked()
}

func (c *corkConn) flushLocked() error {
	if len(c.buf) == 0 {
		return c.err
	}
	_, err := c.Conn.Write(c.buf)
	if err != nil {
		c.err = err
	}
	if cap(c.buf) > corkMax*2 {
		c.buf = nil
	} else {
		c.buf = c.buf[:0]
	}
	return err
}
