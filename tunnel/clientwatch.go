package tunnel

import (
	"context"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// clientWatchDelay is how long a dial runs before its client is watched
// (watchClient). Most dials end well within it (a connect in the
// cluster, a pooled HBONE connection's new stream), and those pay only
// for a timer armed and stopped; a client that goes away is noticed
// within about this much.
const clientWatchDelay = 20 * time.Millisecond

// TCP_INFO's tcpi_state values (include/net/tcp_states.h).
const (
	tcpStateClose     = 7 // reset (or never connected)
	tcpStateCloseWait = 8 // the peer's FIN received, ours not sent
)

// clientWatch cancels a dial made for an accepted connection when its
// client goes away first: a dial towards a black-holed destination (an
// app whose port a firewall drops, a NetworkPolicy on 15008, a port scan)
// otherwise runs to the connect timeout for nobody, holding a SYN-SENT
// socket, a goroutine, an accept slot and a count in the pod's share.
//
// Gone is a reset, or a FIN before the client sent a single byte. A FIN
// after data is a client that wrote its request and half-closed
// (shutdown(SHUT_WR)): it waits for the answer, so the dial goes on. The
// bytes may already be ours (the outbound first read) or still queued, so
// the watch asks the kernel (TCP_INFO: the state, and tcpi_data_segs_in,
// segments with payload; tcpi_bytes_received counts the FIN too) and
// never reads: the socket is left whole for the splice that follows.
//
// A quick dial costs a pooled timer re-armed and stopped, no goroutine.
// A slow one has its client's socket added to one epoll set shared by
// every watch of the process (clientWatcher), which one goroutine reads
// through the runtime's poller: no goroutine per watched connection
// either (a flood of clients to a black hole pends up to MaxPendingConns
// dials per pod).
type clientWatch struct {
	c      *net.TCPConn
	cancel context.CancelFunc
	t      *time.Timer
	state  atomic.Int32 // watchIdle, watchRunning, watchStopped
	gone   atomic.Bool
	done   chan struct{} // closed when run has ended (the watch is set or failed)
	// Set by run while registered, under watcher.mu after.
	fd  int
	id  uint64
	reg bool
}

const (
	watchIdle = iota
	watchRunning
	watchStopped
)

// clientWatches are reused with their timer: a new timer and its
// closure were three allocations and ~300 ns a connection of the ~600 the
// watch cost a quick dial (BenchmarkClientWatch); re-armed, ~20-150 ns.
var clientWatches = sync.Pool{New: func() any {
	w := &clientWatch{}
	w.t = time.AfterFunc(time.Hour, w.run)
	w.t.Stop()
	return w
}}

// watchClient watches c until stop, calling cancel if its client goes
// away meanwhile.
func watchClient(c *net.TCPConn, cancel context.CancelFunc) *clientWatch {
	w := clientWatches.Get().(*clientWatch)
	w.c, w.cancel = c, cancel
	w.gone.Store(false)
	w.state.Store(watchIdle)
	w.t.Reset(clientWatchDelay)
	return w
}

// watchDuring runs dial with c's client watched (watchClient) and
// reports whether the client went away meanwhile. The watch ends even
// when dial panics (the connection's recover then resets c): left in
// the set, it stayed there for good, counted in
// ambit_tunnel_client_watch_active and holding the number of a
// descriptor the agent had closed (TestClientWatchEndsOnPanic).
func watchDuring(c *net.TCPConn, cancel context.CancelFunc, dial func()) (gone bool) {
	w := watchClient(c, cancel)
	defer func() { gone = w.stop() }()
	dial()
	return gone
}

// run starts the watch (on the timer's goroutine, which it then leaves).
func (w *clientWatch) run() {
	// Set before the state says running: stop reads it only then.
	w.done = make(chan struct{})
	if !w.state.CompareAndSwap(watchIdle, watchRunning) {
		return
	}
	defer close(w.done)
	rc, err := w.c.SyscallConn()
	if err != nil {
		return
	}
	// The descriptor stays valid while registered: stop unregisters
	// before the caller can close c.
	_ = rc.Control(func(fd uintptr) { watcher.add(w, int(fd)) })
}

// stop ends the watch and reports whether the client went away; cancel
// is not called after it returns.
func (w *clientWatch) stop() bool {
	if w.t.Stop() {
		w.release()
		return false
	}
	if w.state.CompareAndSwap(watchIdle, watchStopped) {
		// The timer's goroutine has begun and will find the watch
		// stopped, but may still touch w: not reused.
		return false
	}
	<-w.done
	watcher.remove(w)
	gone := w.gone.Load()
	w.release()
	return gone
}

// release gives w back for reuse once nothing else can touch it.
func (w *clientWatch) release() {
	w.c, w.cancel = nil, nil
	clientWatches.Put(w)
}

// clientWatcher is the epoll set of the watched clients. Edge-triggered:
// an event is new data, a FIN or a reset, each looked at once, not a
// socket that stays readable. The set's own descriptor is read through
// the runtime's poller (it is pollable: readable when events wait), so
// its goroutine parks like any reader, holding no thread.
type clientWatcher struct {
	mu sync.Mutex
	// -1 until set up, at the first watch. A set that could not be
	// (EMFILE: a flood of clients to a black hole, every one a slow
	// dial, is when descriptors run out) is tried again at the next:
	// meanwhile those dials run their course.
	epfd int
	next uint64
	m    map[uint64]*clientWatch

	// For the metrics (metrics.go), process-wide as the set is. Moved
	// on the slow path only (a dial past clientWatchDelay): a quick dial
	// touches none of them.
	active      atomic.Int64  // clients in the set now
	started     atomic.Uint64 // clients added to the set
	gone        atomic.Uint64 // found gone, their dial cancelled
	unavailable atomic.Uint64 // slow dials not watched: no set, or not added
}

var watcher = clientWatcher{epfd: -1}

func (cw *clientWatcher) add(w *clientWatch, fd int) {
	cw.mu.Lock()
	defer cw.mu.Unlock()
	if cw.epfd < 0 && !cw.startLocked() {
		cw.unavailable.Add(1)
		return
	}
	cw.next++
	id := cw.next
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLET, Fd: int32(id), Pad: int32(id >> 32)}
	w.fd, w.id = fd, id
	cw.m[id] = w
	// Added with its present state: a client already gone is an event
	// at once.
	if unix.EpollCtl(cw.epfd, unix.EPOLL_CTL_ADD, fd, &ev) != nil {
		delete(cw.m, id)
		cw.unavailable.Add(1)
		return
	}
	w.reg = true
	cw.active.Add(1)
	cw.started.Add(1)
}

func (cw *clientWatcher) remove(w *clientWatch) {
	cw.mu.Lock()
	defer cw.mu.Unlock()
	cw.removeLocked(w)
}

func (cw *clientWatcher) removeLocked(w *clientWatch) {
	if !w.reg {
		return
	}
	delete(cw.m, w.id)
	_ = unix.EpollCtl(cw.epfd, unix.EPOLL_CTL_DEL, w.fd, nil)
	w.reg = false
	cw.active.Add(-1)
}

// startLocked sets up the epoll set and its reader; false if it could
// not (the caller's dial runs its course).
func (cw *clientWatcher) startLocked() bool {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return false
	}
	if err := unix.SetNonblock(epfd, true); err != nil {
		unix.Close(epfd)
		return false
	}
	f := os.NewFile(uintptr(epfd), "ambit-client-watch")
	// Outside the runtime's poller (never seen: it takes an epoll
	// descriptor), the reader would fail at once rather than park.
	if f.SetReadDeadline(time.Time{}) != nil {
		f.Close()
		return false
	}
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return false
	}
	cw.epfd = epfd
	cw.m = make(map[uint64]*clientWatch)
	go func() {
		evs := make([]unix.EpollEvent, 64)
		// Returns only if the poller fails: the callback always asks
		// to wait again.
		_ = rc.Read(func(uintptr) bool {
			for {
				n, err := unix.EpollWait(epfd, evs, 0)
				if err == unix.EINTR {
					continue
				}
				if n <= 0 {
					return false // drained: park until the set is readable
				}
				cw.handle(evs[:n])
				if n < len(evs) {
					return false
				}
			}
		})
		// The set goes: its watches are no longer (their dials run
		// their course), and the next watch sets up another. Not
		// closed before no one can use its number.
		cw.mu.Lock()
		for _, w := range cw.m {
			w.reg = false
		}
		cw.active.Add(-int64(len(cw.m)))
		cw.epfd, cw.m = -1, nil
		cw.mu.Unlock()
		f.Close()
	}()
	return true
}

// handle looks at the clients that had an event. Under mu: a watch
// being stopped waits, so cancel is never called once stop returns and
// the descriptor cannot have been closed and reused meanwhile.
func (cw *clientWatcher) handle(evs []unix.EpollEvent) {
	cw.mu.Lock()
	defer cw.mu.Unlock()
	for _, ev := range evs {
		w := cw.m[uint64(uint32(ev.Fd))|uint64(uint32(ev.Pad))<<32]
		if w == nil {
			continue // removed after the event
		}
		ti, err := unix.GetsockoptTCPInfo(w.fd, unix.IPPROTO_TCP, unix.TCP_INFO)
		if err != nil {
			cw.removeLocked(w) // cannot tell: the dial runs its course
			continue
		}
		if ti.State == tcpStateClose || (ti.State == tcpStateCloseWait && ti.Data_segs_in == 0) {
			w.gone.Store(true)
			w.cancel()
			cw.removeLocked(w)
			cw.gone.Add(1)
		}
		// Else established, or half-closed after data: the next event
		// (more data, a reset) says more.
	}
}
