package tunnel

import (
	"context"
	"maps"
	"net"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambit-mesh/ambit/tunnel/hbone"
)

// sockets are a pod's HBONE connections, inbound and pooled outbound,
// from their handshake until their socket is closed (hbone's Gone), not
// only until they end (Done). A clean close lingers: close_notify and
// the FIN go out, and the socket goes on reading and dropping what the
// peer still sends, up to 10 × PingTimeout while the peer keeps
// sending or a slow link drains. Forgotten at Done, such a socket was
// nobody's: an upgrade's old agent exited once its drains were done and
// the kernel closed what still lingered, so the peer's next frame got a
// reset (the tail of a download served whole thrown away on a slow
// link), and a pod's DEL left the lingering sockets of its earlier
// closes (the pool's idle eviction, a drain) holding its namespace. So
// Close waits for them within its deadline and Abort cuts them.
type sockets struct {
	lingering prometheus.Gauge
	mu        sync.Mutex
	// conns: each connection's TCP socket, for Abort's reset (nil from a
	// PodNetwork of other connections).
	conns map[*hbone.Conn]*net.TCPConn
	// dials: the pool's dials running (runDial), waited for as the
	// sockets are, for each may yet add one. Closing the pool cuts them
	// short, but a handshake just done is discarded only once runDial
	// takes the pool's lock, and a wait that passed before then left
	// that socket to linger past Close.
	dials int
	// cutDone, cutReset: cut ran, and how; a connection added since
	// (a dial's) is closed the same way by its owner, not cleanly: it
	// would linger while Close waits for it past its deadline.
	cutDone, cutReset bool
	left              chan struct{} // kicked (never blocks) when one goes
}

func newSockets(m *metrics) *sockets {
	return &sockets{lingering: m.lingering, conns: map[*hbone.Conn]*net.TCPConn{}, left: make(chan struct{}, 1)}
}

// add holds c, whose TCP socket is raw, until ended sees it gone.
func (ss *sockets) add(c *hbone.Conn, raw *net.TCPConn) {
	ss.mu.Lock()
	ss.conns[c] = raw
	ss.mu.Unlock()
}

// ended lets go of c once its socket is closed, counting it lingering
// meanwhile. Called once c is done, or closing: its owner's last word
// on it (deferred in a handler, for a panic's sake).
func (ss *sockets) ended(c *hbone.Conn) {
	select {
	case <-c.Gone():
		ss.remove(c)
		return
	default:
	}
	go func() {
		<-c.Done()
		select {
		case <-c.Gone():
		default:
			ss.lingering.Inc()
			<-c.Gone()
			ss.lingering.Dec()
		}
		ss.remove(c)
	}()
}

func (ss *sockets) remove(c *hbone.Conn) {
	ss.mu.Lock()
	delete(ss.conns, c)
	ss.mu.Unlock()
	ss.kick()
}

func (ss *sockets) kick() {
	select {
	case ss.left <- struct{}{}:
	default:
	}
}

// dialing counts a dial of the pool about to run (under the pool's
// lock, the pool open), until dialled.
func (ss *sockets) dialing() {
	ss.mu.Lock()
	ss.dials++
	ss.mu.Unlock()
}

// dialled is a dial's end, its connection, if any, added before.
func (ss *sockets) dialled() {
	ss.mu.Lock()
	ss.dials--
	ss.mu.Unlock()
	ss.kick()
}

// wasCut says whether cut ran, and whether with a reset.
func (ss *sockets) wasCut() (cut, reset bool) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	return ss.cutDone, ss.cutReset
}

// pending is what wait still waits for: sockets held (live, lingering,
// or cut and not yet closed) and dials running.
func (ss *sockets) pending() (socks, dials int) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	return len(ss.conns), ss.dials
}

// cut closes every socket held, lingering or live, without a word to
// the peer (abortConn); reset: with a TCP reset (resetConn, for a pod
// whose network is going: a socket closed after its FIN stays in
// FIN_WAIT, retransmitting into the removed interface).
func (ss *sockets) cut(reset bool) {
	ss.mu.Lock()
	ss.cutDone = true
	ss.cutReset = ss.cutReset || reset
	all := maps.Clone(ss.conns)
	ss.mu.Unlock()
	for c, raw := range all {
		if reset {
			resetConn(c, raw)
		} else {
			abortConn(c)
		}
	}
}

// wait waits until no socket is held and no dial runs, or ctx ends
// (false).
func (ss *sockets) wait(ctx context.Context) bool {
	for {
		if socks, dials := ss.pending(); socks+dials == 0 {
			// Passed on, as waitQuiet's: Close and Abort may both wait.
			ss.kick()
			return true
		}
		select {
		case <-ss.left:
		case <-ctx.Done():
			return false
		}
	}
}
