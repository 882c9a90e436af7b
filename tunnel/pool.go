package tunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2/hpack"

	"github.com/ambit-mesh/ambit/tunnel/hbone"
)

// poolKey: connections are shared only between the same source identity,
// the same expected destination identity and the same address.
type poolKey struct {
	src, dst string
	addr     netip.AddrPort
}

type poolEntry struct {
	conns   []pooledConn
	dialing *poolDial // the dial in flight new callers wait for, if any
}

// poolDial is a dial shared by the callers that found no connection with
// room. It runs on its own goroutine, not on a caller's: each caller
// waits only as long as its own context allows (its app may go away),
// and the dial is cancelled only when no one waits for it any more.
type poolDial struct {
	done    chan struct{} // closed when the dial has ended
	err     error         // set before done is closed
	waiters int           // under pool.mu
	cancel  context.CancelFunc
	tcpUp   atomic.Bool // the TCP connection is up, the handshake under way
}

// timeoutError is the error of a dial that did not end in time, with the
// same reasons as dial's.
func (d *poolDial) timeoutError(key poolKey, err error) error {
	if d.tcpUp.Load() {
		return &dialError{"tls", fmt.Errorf("HBONE handshake with %v (%s) timed out: %w", key.addr, key.dst, err)}
	}
	return &dialError{"connect_timeout", fmt.Errorf("HBONE connect to %v timed out (is a NetworkPolicy blocking port %d?): %w", key.addr, key.addr.Port(), err)}
}

// pooledConn is a pooled connection and what its handshake verified,
// checked again before the connection takes a new stream; raw is its
// TCP socket (nil from a PodNetwork of other connections), which only a
// reset needs (resetConn): hbone keeps it behind its own layers.
type pooledConn struct {
	*hbone.Conn
	ps  *peerState
	raw *net.TCPConn
}

// pool holds one pod's outbound HBONE connections (in-pod mode: a pool
// per pod, dialed from the pod's own network).
type pool struct {
	p    *Proxy
	net  PodNetwork
	mu   sync.Mutex
	m    map[poolKey]*poolEntry
	stop chan struct{}
	once sync.Once
	// resetting: closed by reset (Serving.Abort), so a connection dialled
	// meanwhile is reset too, not closed.
	resetting atomic.Bool
	// retiring are the connections taken out of m that have not closed
	// yet (a recheck retired them, takeIdle took them: each shutting
	// down, spared until its last stream ends), with their TCP socket:
	// closeWith ends them too. Out of m, a reset did not reach them, and
	// one carrying a stream closed only once that stream ended, with
	// close_notify and a FIN (TestResetReachesARetiringConnection).
	retiring map[*hbone.Conn]*net.TCPConn
	// socks holds every connection dialled until its socket is closed,
	// past the pool's forgetting it at Done (its owner's, the Serving's:
	// an idle eviction's linger outlives the connection's place here).
	socks *sockets
}

func newPool(p *Proxy, n PodNetwork) *pool {
	pl := &pool{p: p, net: n, m: make(map[poolKey]*poolEntry), stop: make(chan struct{}),
		retiring: make(map[*hbone.Conn]*net.TCPConn), socks: newSockets(p.m)}
	go pl.janitor()
	return pl
}

// open opens a CONNECT stream to authority on a pooled connection for
// key, dialing (once for all concurrent callers) when none has room.
func (pl *pool) open(ctx context.Context, key poolKey, authority string, hdr []hpack.HeaderField, first []byte) (*hbone.Stream, int, error) {
	// Kept across attempts: once a dial this open waited for failed,
	// a stalled connection serves it, waiting for its write lock up to
	// ctx, the connect timeout. Reset on each attempt, the open gave
	// up on the stalled lock (ErrNoCapacity) a millisecond later and
	// dialed again: up to 8 dials to a peer refusing them, and a wrong
	// reason ("no pooled connection would take a stream").
	dialFailed := false
	for attempt := 0; attempt < 8; attempt++ {
		c, behindStall, err := pl.pick(ctx, key, &dialFailed)
		if err != nil {
			return nil, 0, err
		}
		var s *hbone.Stream
		var sent int
		if behindStall {
			s, sent, err = c.OpenStreamDataBehindStall(ctx, authority, hdr, first)
		} else {
			s, sent, err = c.OpenStreamDataContext(ctx, authority, hdr, first)
		}
		if err == nil {
			return s, sent, nil
		}
		if errors.Is(err, context.DeadlineExceeded) {
			// The pooled connection's writer is stuck (its peer's
			// node died mid-transfer): fail in the connect timeout,
			// as a dial to the dead node would, not when keepalive
			// closes the connection.
			return nil, 0, &dialError{"connect_timeout", fmt.Errorf("HBONE stream to %v (%s): the pooled connection accepted no write within the connect timeout (peer unreachable?): %w", key.addr, key.dst, err)}
		}
		if !errors.Is(err, hbone.ErrNoCapacity) && !errors.Is(err, hbone.ErrConnClosed) {
			return nil, 0, err
		}
	}
	return nil, 0, errors.New("tunnel: no pooled connection would take a stream")
}

var errPoolClosed = errors.New("tunnel: the pod is no longer served")

func (pl *pool) closed() bool {
	select {
	case <-pl.stop:
		return true
	default:
		return false
	}
}

// maxStallConns bounds the connections to one key that a stall makes
// the pool dial. Below ~10 Mbit/s per connection a bulk write blocks for
// writeStallAfter in the normal course (docs/tunnel.md), so on a slow
// link every concurrently writing stream could otherwise end up with a
// connection of its own: each costs a TLS handshake, its buffers and a
// keepalive, where HTTP/2 normally holds one per peer. Four leave room
// for a few bulk streams beside the interactive ones; past that, more
// connections over the same slow link would only split it further.
// Connections full of streams do not count: a full connection still
// dials, as it always did. A var for tests.
var maxStallConns = 4

// conn is pick for a caller of its own, with no dial failed yet.
func (pl *pool) conn(ctx context.Context, key poolKey) (*hbone.Conn, error) {
	dialFailed := false
	c, _, err := pl.pick(ctx, key, &dialFailed)
	return c, err
}

// pick picks a connection for a new stream to key, dialing when none
// will do; *dialFailed is set once a dial it waited for failed.
// behindStall: the pick may be WriteStalled and the caller has nowhere
// better to go (*dialFailed, or maxStallConns reached), so the open
// waits for its write lock up to ctx rather than give up.
func (pl *pool) pick(ctx context.Context, key poolKey, dialFailed *bool) (c *hbone.Conn, behindStall bool, err error) {
	limit := int(pl.p.hcfg.MaxStreamsPerConn)
	// The error of a dial this pick waited for: once one failed, a
	// connection with room (or a stalled one) serves, or a dial someone
	// else started is joined, but this pick dials no more. Looping to
	// dial again, with connections pooled but all full, it dialed a
	// refusing peer thousands of times a second until ctx ended, and
	// then reported connect_timeout.
	var failed error
	pl.mu.Lock()
	for {
		if pl.closed() {
			pl.mu.Unlock()
			return nil, false, errPoolClosed
		}
		// Looked up on every turn: while this caller waited for a
		// dial, the connection it pooled may have died and the
		// janitor dropped the entry. A dial started on that orphan
		// would be discarded (runDial), and the app told the pod is
		// no longer served.
		e := pl.m[key]
		if e == nil {
			e = &poolEntry{}
			pl.m[key] = e
		}
		live := e.conns[:0]
		var pick, stalled *hbone.Conn
		stalledN := 0 // stalled's ActiveStreams
		roomy := 0    // live connections with room for a stream, while pick is nil
		now := time.Now()
		for _, c := range e.conns {
			if !c.Usable() {
				continue
			}
			if err := pl.recheck(key, c.ps, now); err != nil {
				// No new streams; those open finish. (Also
				// routine: ahead of its certificates' expiry,
				// peerState.retireLead.)
				pl.p.log.Info("pooled HBONE connection retired: a certificate it was verified with expires or no longer verifies",
					"dst", key.addr, "dst_identity", key.dst, "error", err)
				pl.retiring[c.Conn] = c.raw
				go c.Shutdown(context.Background())
				continue
			}
			live = append(live, c)
			// Once a pick is found, roomy no longer matters: no
			// ActiveStreams (c.mu) for the connections after it, as
			// before the bound.
			if pick != nil {
				continue
			}
			n := c.ActiveStreams()
			if n >= limit {
				continue
			}
			roomy++
			if c.WriteStalled(now) {
				// Its writer has waited on a full socket for a
				// while (the peer alive but not draining): a
				// stream put here would wait behind it for the
				// write lock, up to the connect timeout, where a
				// connection of its own would carry it at once.
				// Kept: it goes on serving its streams.
				// The least loaded, should it serve after all.
				if stalled == nil || n < stalledN {
					stalled, stalledN = c.Conn, n
				}
				continue
			}
			pick = c.Conn
		}
		// A dial in flight is joined even at the bound: it costs
		// nothing more, and it was started below the bound.
		if pick == nil && stalled != nil && (*dialFailed || (e.dialing == nil && roomy >= maxStallConns)) {
			pick, behindStall = stalled, true
		}
		for i := len(live); i < len(e.conns); i++ {
			e.conns[i] = pooledConn{}
		}
		e.conns = live
		if pick != nil {
			pl.mu.Unlock()
			return pick, behindStall, nil
		}
		d := e.dialing
		if d == nil && failed != nil {
			pl.mu.Unlock()
			return nil, false, failed
		}
		if d == nil {
			dctx, cancel := context.WithCancel(context.Background())
			d = &poolDial{done: make(chan struct{}), cancel: cancel}
			e.dialing = d
			pl.socks.dialing()
			go pl.runDial(dctx, key, e, d)
		}
		d.waiters++
		pl.mu.Unlock()
		select {
		case <-d.done:
			if testDialWoken != nil {
				testDialWoken()
			}
		case <-ctx.Done():
			pl.mu.Lock()
			d.waiters--
			if d.waiters == 0 && e.dialing == d {
				// Its last waiter gave up (the apps went away): no
				// one wants the connection now, and towards a
				// black-holed peer the dial would hold a socket for
				// the connect timeout. A caller from now on starts
				// a dial of its own.
				e.dialing = nil
				d.cancel()
			}
			pl.mu.Unlock()
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				// The dial's own deadline is a little later:
				// say where it was, as its error would have.
				return nil, false, d.timeoutError(key, ctx.Err())
			}
			return nil, false, ctx.Err()
		}
		pl.mu.Lock()
		d.waiters--
		if d.err != nil && len(e.conns) == 0 {
			// Share the failure with everyone who waited for that dial.
			pl.mu.Unlock()
			return nil, false, d.err
		}
		if d.err != nil {
			*dialFailed = true
			failed = d.err
		}
	}
}

// recheck is Proxy.recheck, with a panic made the recheck's failure (the
// connection retired). It runs under pl.mu, and calls the identity
// manager's Roots: a panic there reached the connection handler's
// recover with the lock held, and the pod's every later open, the
// janitor and close hung for good (TestPoolRecheckPanic).
func (pl *pool) recheck(key poolKey, ps *peerState, now time.Time) (err error) {
	defer func() {
		if v := recover(); v != nil {
			pl.p.log.Error("rechecking a pooled HBONE connection's certificates panicked", "dst", key.addr.String(),
				"dst_identity", key.dst, "src_identity", key.src, "panic", fmt.Sprint(v), "stack", string(debug.Stack()))
			err = fmt.Errorf("rechecking its certificates panicked: %v", v)
		}
	}()
	return pl.p.recheck(ps, now)
}

// testDialWoken, when set (by a test, before the pool is used), runs in
// conn between a waiter's wake-up at the end of its dial and its taking
// the pool's lock again: the window in which the janitor may drop the
// entry.
var testDialWoken func()

// testDialDone, when set (by a test), runs in runDial between the
// dial's end and its taking the pool's lock: the window in which Close
// may close the pool and wait for the pod's sockets.
var testDialDone func()

// runDial runs d for e, pools its connection and wakes its waiters.
func (pl *pool) runDial(ctx context.Context, key poolKey, e *poolEntry, d *poolDial) {
	// Its connection, pooled or discarded, is among the sockets first.
	defer pl.socks.dialled()
	c, ps, raw, err := pl.dialRecovered(ctx, key, d)
	d.cancel()
	if testDialDone != nil {
		testDialDone()
	}
	var discard *hbone.Conn
	pl.mu.Lock()
	switch {
	case pl.closed():
		// close ran meanwhile (Close's cut) and cannot see this
		// connection: it must not outlive the pool. A dial it cut
		// short fails for the same reason.
		if err == nil {
			discard = c
		}
		err = errPoolClosed
	case err == nil && pl.m[key] != e:
		// Abandoned by its waiters, and the janitor has dropped the
		// entry since: nothing would ever use or evict it.
		discard, err = c, errPoolClosed
	}
	if e.dialing == d {
		e.dialing = nil
	}
	d.err = err
	if c != nil {
		// Under pl.mu: a close of the pool after this sees it held.
		pl.socks.add(c, raw)
	}
	if err == nil {
		// Pooled even when its waiters left: the next caller uses it.
		e.conns = append(e.conns, pooledConn{c, ps, raw})
		pl.p.m.poolConns.Inc()
		go func() { <-c.Done(); pl.p.m.poolConns.Dec(); pl.forget(key, c); pl.socks.ended(c) }()
	}
	close(d.done)
	pl.mu.Unlock()
	if discard != nil {
		// Past Close's deadline (the sockets cut), a clean close
		// would linger while Close waits for it, unbounded.
		switch cut, reset := pl.socks.wasCut(); {
		case pl.resetting.Load() || reset:
			resetConn(discard, raw)
		case cut:
			abortConn(discard)
		default:
			discard.Close()
		}
		pl.socks.ended(discard)
	}
}

// forget drops c, closed, from key's entry, and the entry once it holds
// nothing. Left to the next pick of the key or the janitor's sweep
// (every PoolIdleTimeout/4, 75 s by default), a closed connection kept
// its buffers (~90 KiB) and its peer's key in the pool that long: to a
// deleted pod there is no next pick, and a resident pod's pool held one
// of each for every peer pod deleted in the last 75 s
// (TestChurnLeavesNoResidue).
func (pl *pool) forget(key poolKey, c *hbone.Conn) {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	delete(pl.retiring, c)
	e := pl.m[key]
	if e == nil {
		return
	}
	kept := e.conns[:0]
	for _, pc := range e.conns {
		if pc.Conn != c {
			kept = append(kept, pc)
		}
	}
	clear(e.conns[len(kept):])
	e.conns = kept
	if len(kept) == 0 && e.dialing == nil {
		delete(pl.m, key)
	}
}

// dialError marks where an HBONE dial failed, for metrics.
type dialError struct {
	reason string
	err    error
}

func (e *dialError) Error() string { return e.err.Error() }
func (e *dialError) Unwrap() error { return e.err }

// dialRecovered is dial, with a panic made the dial's failure. The dial
// runs on its own goroutine, outside the connection handler's
// recoverConn, and calls our TLS callbacks (GetClientCertificate ->
// Certificates.Certificate, VerifyPeerCertificate): a panic there took
// the whole agent down (TestPoolDialPanic). As an error, it reaches
// every waiter, each of which counts its connection as internal_error,
// and runDial clears the entry's dial so the next caller dials afresh.
// The stack is logged here, once for all waiters.
func (pl *pool) dialRecovered(ctx context.Context, key poolKey, d *poolDial) (c *hbone.Conn, ps *peerState, raw *net.TCPConn, err error) {
	defer func() {
		if v := recover(); v != nil {
			pl.p.log.Error("outbound HBONE dial panicked", "dst", key.addr.String(), "dst_identity", key.dst,
				"src_identity", key.src, "panic", fmt.Sprint(v), "stack", string(debug.Stack()))
			c, ps, raw = nil, nil, nil
			err = &dialError{"internal_error", fmt.Errorf("HBONE dial to %v (%s) panicked: %v", key.addr, key.dst, v)}
		}
	}()
	return pl.dial(ctx, key, d)
}

func (pl *pool) dial(ctx context.Context, key poolKey, d *poolDial) (*hbone.Conn, *peerState, *net.TCPConn, error) {
	ctx, cancel := context.WithTimeout(ctx, pl.p.connectTimeout)
	defer cancel()
	// Closing the pool (Close's cut, past its deadline) ends a dial in
	// flight too: towards a peer that drops SYNs, it would run to the
	// connect timeout while Close waits for its connection. Reset by
	// Abort, a connection in its handshake is reset as the pooled ones
	// are (resetConn): the handshake's failure closes it, which would
	// send a FIN.
	var rawTCP atomic.Pointer[net.TCPConn]
	go func() {
		select {
		case <-pl.stop:
			if tc := rawTCP.Load(); tc != nil && pl.resetting.Load() {
				_ = tc.SetLinger(0)
			}
			cancel()
		case <-ctx.Done():
		}
	}()
	raw, err := pl.net.Dial(ctx, netip.Addr{}, key.addr)
	tc, _ := raw.(*net.TCPConn)
	if tc != nil && err == nil {
		rawTCP.Store(tc)
		if pl.closed() && pl.resetting.Load() {
			// Reset before the watch above could see it.
			_ = tc.SetLinger(0)
		}
	}
	if err != nil {
		// podnet reports the deadline as the socket's "i/o timeout" or
		// as the context's, whichever fired first: towards a dead node
		// the reason flipped between connect and connect_timeout.
		if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return nil, nil, nil, d.timeoutError(key, err)
		}
		return nil, nil, nil, &dialError{"connect", fmt.Errorf("HBONE connect to %v: %w", key.addr, err)}
	}
	d.tcpUp.Store(true)
	// hbone.Client closes raw when the handshake fails, not when one of
	// its callbacks panics: the socket would leak (dialRecovered).
	handshaken := false
	defer func() {
		if !handshaken {
			raw.Close()
		}
	}()
	ps := &peerState{}
	c, err := hbone.Client(ctx, raw, pl.p.clientTLS(key.src, key.dst, ps), pl.p.hcfg)
	if err != nil {
		return nil, nil, nil, &dialError{tlsReason(err), fmt.Errorf("HBONE handshake with %v (%s): %w", key.addr, key.dst, err)}
	}
	handshaken = true
	return c, ps, tc, nil
}

// janitor closes connections idle for longer than the pool timeout.
func (pl *pool) janitor() {
	idle := pl.p.poolIdle
	t := time.NewTicker(max(idle/4, 10*time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-pl.stop:
			return
		case <-t.C:
		}
		pl.sweep(time.Now(), idle)
	}
}

// sweep is one round of the janitor: connections idle since before
// now-idle are shut down, dead ones forgotten, and entries left with
// neither connection nor dial dropped.
func (pl *pool) sweep(now time.Time, idle time.Duration) {
	// Not waited for: a stream opened on one since the selection (its
	// caller picked it just before) is spared by the GOAWAY, and
	// waiting for it held the janitor, so every later round for the
	// pod, for as long as that stream lived
	// (TestSweepGoesOnPastAStreamOpenedMeanwhile).
	for _, c := range pl.takeIdle(now, idle) {
		go c.Shutdown(context.Background())
	}
}

// shutdownIdle takes the connections that carry no stream out of the
// pool and shuts them down (GOAWAY, close_notify, FIN), waiting until
// ctx at most for them to close; one on which a caller opened a stream
// meanwhile closes once that stream ends, after shutdownIdle returns.
// The pool stays open, and an open after it dials afresh. See
// Serving.CloseIdleOutbound.
func (pl *pool) shutdownIdle(ctx context.Context) {
	idle := pl.takeIdle(time.Now(), 0)
	// Shutdown unbounded, each waited for up to ctx only: a stream
	// opened on one since the selection (its caller picked it just
	// before) is spared by the GOAWAY and ends when its app is done,
	// the connection closing after it. Shutdown(ctx) closed it at the
	// bound, cutting that stream 500 ms after it opened, on a pod
	// that may stay (unenrollment)
	// (TestShutdownIdleSparesAStreamOpenedMeanwhile).
	for _, c := range idle {
		go c.Shutdown(context.Background())
	}
	for _, c := range idle {
		select {
		case <-c.Done():
		case <-ctx.Done():
			return
		}
	}
}

// takeIdle takes out of the pool, and returns, the connections that
// carry no stream and have not since before now-idle; dead ones are
// forgotten, and entries left with neither connection nor dial
// dropped. A caller whose pick returned one just before may still open
// a stream on it.
func (pl *pool) takeIdle(now time.Time, idle time.Duration) []*hbone.Conn {
	var taken []*hbone.Conn
	pl.mu.Lock()
	for k, e := range pl.m {
		kept := e.conns[:0]
		for _, c := range e.conns {
			if s := c.IdleSince(); !s.IsZero() && now.Sub(s) >= idle {
				taken = append(taken, c.Conn)
				pl.retiring[c.Conn] = c.raw
				continue
			}
			if c.Usable() {
				kept = append(kept, c)
			}
		}
		clear(e.conns[len(kept):]) // the dropped ones' buffers go with them
		e.conns = kept
		if len(kept) == 0 && e.dialing == nil {
			delete(pl.m, k)
		}
	}
	pl.mu.Unlock()
	if testEvictSelected != nil {
		testEvictSelected(taken)
	}
	return taken
}

// testEvictSelected, when set (by a test), runs in takeIdle between its
// selection of idle connections and their shutdown (sweep,
// shutdownIdle): the window in which a caller that picked one may open
// a stream on it.
var testEvictSelected func([]*hbone.Conn)

// size is the number of pooled connections.
func (pl *pool) size() int {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	n := 0
	for _, e := range pl.m {
		n += len(e.conns)
	}
	return n
}

// close closes the pool and its connections, each with TLS's
// close_notify (closeConns: all at once).
func (pl *pool) close() { pl.closeWithin(context.Background()) }

// closeWithin is close within ctx: past it, the closes still waiting on
// their peers are cut (closeConns). It says whether all ended in time.
func (pl *pool) closeWithin(ctx context.Context) bool {
	return closeConns(ctx, conns(pl.take()))
}

// abort closes the pool and its connections without waiting on any peer
// (Close's cut, past its deadline; see abortConn).
func (pl *pool) abort() { pl.closeWith(func(c pooledConn) { abortConn(c.Conn) }) }

func (pl *pool) closeWith(closeConn func(pooledConn)) {
	for _, c := range pl.take() {
		closeConn(c)
	}
}

// take closes the pool to new dials and takes every connection out of
// it, retiring ones included, for the caller to close.
func (pl *pool) take() []pooledConn {
	pl.once.Do(func() { close(pl.stop) })
	pl.mu.Lock()
	var all []pooledConn
	for _, e := range pl.m {
		all = append(all, e.conns...)
	}
	for c, raw := range pl.retiring {
		all = append(all, pooledConn{Conn: c, raw: raw})
	}
	pl.m = map[poolKey]*poolEntry{}
	clear(pl.retiring)
	pl.mu.Unlock()
	return all
}

// conns is pcs's HBONE connections.
func conns(pcs []pooledConn) []*hbone.Conn {
	out := make([]*hbone.Conn, len(pcs))
	for i, c := range pcs {
		out[i] = c.Conn
	}
	return out
}

// reset closes the pool to new dials and resets its connections, with
// streams or not (Serving.Abort: the pod's network is going); a dial in
// flight is cut, its connection reset.
func (pl *pool) reset() {
	pl.resetting.Store(true)
	pl.closeWith(func(c pooledConn) { resetConn(c.Conn, c.raw) })
}

// resetConn closes c, whose TCP socket is raw (nil: closed as abortConn
// does), with a TCP reset (SO_LINGER 0), no close_notify and no GOAWAY:
// for a pod whose network is going (Serving.Abort says why a reset).
// The peer's reads fail at once; the socket is gone, nothing left to
// retransmit.
func resetConn(c *hbone.Conn, raw *net.TCPConn) {
	if raw != nil {
		_ = raw.SetLinger(0)
	}
	abortConn(c)
}

// abortConn closes c without a word to its peer. crypto/tls's Close
// writes close_notify under a 5 s write deadline of its own (it replaces
// any deadline set before), so against a peer that stopped reading, its
// socket buffer full, closing took 5 s, one connection after another.
// Closing the TCP connection under the TLS first makes that write fail
// at once. Only for cutting: a healthy peer whose close has time gets
// close_notify (Close, Shutdown).
func abortConn(c *hbone.Conn) {
	nc := c.NetConn()
	if tc, ok := nc.(*tls.Conn); ok {
		nc = tc.NetConn()
	}
	nc.Close()
	c.Close()
}
