package tunnel

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2/hpack"
	"golang.org/x/sys/unix"

	"github.com/ambit-mesh/ambit/tunnel/balance"
	"github.com/ambit-mesh/ambit/tunnel/hbone"
)

// record is one connection's telemetry: metrics labels and the access log.
type record struct {
	dir, mode    string // outbound|inbound ; hbone|passthrough|plaintext
	src, dst     netip.AddrPort
	svc          netip.AddrPort // Service VIP when resolved from one
	hboneAddr    netip.AddrPort
	srcID, dstID string
	start        time.Time
	// phase says whether the connection was counted open, and ended:
	// the one word its handler, OnResponse (on another goroutine, for
	// 15001's HBONE) and recoverConn agree on. What recoverConn also
	// settles when the handler panics: live is its entry for
	// Reauthorize once stillAllowed registered it; closer its cut
	// (track) once it relays.
	phase  atomic.Uint32
	live   *liveConn
	closer *tracked
	series *connSeries // set by opened, before phase says open
	// slots is the accept slot the connection holds until established
	// (release); nil when it holds none.
	slots chan struct{}
}

// A record's phase. Atomic: a 15001 HBONE connection is counted open by
// its stream's OnResponse, on the pooled connection's read loop, which
// neither a handler that panicked nor one whose splice ended (the app
// reset as the 200 arrived) waits for. Whichever of opened and the
// handler's end (outbound's check, recoverConn) comes first decides
// whether the connection is counted open and then closed, or neither.
const (
	phasePending uint32 = iota
	phaseOpen
	phaseClosed  // finished ran, or outbound ended it unopened
	phaseSettled // recoverConn ran
)

func addrPortOf(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}

func (sv *Serving) logAttrs(r *record) []any {
	a := []any{"direction", r.dir, "mode", r.mode, "src", r.src.String(), "dst", r.dst.String()}
	if r.svc.IsValid() {
		a = append(a, "service", r.svc.String())
	}
	if r.hboneAddr.IsValid() {
		a = append(a, "hbone_addr", r.hboneAddr.String())
	}
	if r.srcID != "" {
		a = append(a, "src_identity", r.srcID)
	}
	if r.dstID != "" {
		a = append(a, "dst_identity", r.dstID)
	}
	return a
}

// testHookResponse, when set (tests only), runs first in a 15001 HBONE
// connection's OnResponse, with the status: on the goroutine that hears
// B's answer, the pooled connection's read loop once the handler
// splices.
var testHookResponse func(r *record, status int)

func (sv *Serving) opened(r *record) {
	// Stored before the phase says open: a handler that sees it open
	// (outbound's check) then reads it. Unread when the swap fails.
	cs := sv.p.m.series(r.dir, r.mode, r.srcID, r.dstID)
	r.series = cs
	if !r.phase.CompareAndSwap(phasePending, phaseOpen) {
		return // its handler ended it first (unopened, or it panicked)
	}
	cs.opened.Inc()
	cs.active.Inc()
}

// finished ends an established connection: metrics and the access log.
func (sv *Serving) finished(r *record, toApp, fromApp int64, err error) {
	r.phase.Store(phaseClosed)
	sv.countClose(r, r.series, toApp, fromApp, "", err)
}

// countClose counts an established connection's end and writes its
// access-log line; cs nil: looked up. reason is set only for an end that
// is not the connection's own ("internal_error": its handler panicked).
func (sv *Serving) countClose(r *record, cs *connSeries, toApp, fromApp int64, reason string, err error) {
	// The series its start took, unless a sweep dropped it meanwhile.
	cs = sv.p.m.ending(cs, r.dir, r.mode, r.srcID, r.dstID)
	cs.closed.Inc()
	cs.active.Dec()
	cs.sent.Add(float64(fromApp))
	cs.received.Add(float64(toApp))
	if !sv.log.Enabled(context.Background(), slog.LevelInfo) {
		return // the line would be dropped: do not format it
	}
	attrs := append(sv.logAttrs(r), "bytes_sent", fromApp, "bytes_received", toApp,
		"duration", time.Since(r.start).String())
	if reason != "" {
		attrs = append(attrs, "reason", reason)
	}
	if err != nil {
		attrs = append(attrs, "error", err.Error())
	}
	sv.log.LogAttrs(context.Background(), slog.LevelInfo, "connection complete", argsToAttrs(attrs)...)
}

// settlePanicked puts the books of r's connection straight after its
// handler panicked (recoverConn, on the handler's goroutine): the live
// entry unregistered and the connection cut (its app socket closed too,
// which the panicked splice would have closed), and, if it was counted
// open, its close counted (active_connections back down) with one
// access-log line, reason internal_error. Before, an established
// connection stayed open in the gauge for good and had no close and no
// line, and a panic after stillAllowed left its live entry for the next
// Reauthorize to revoke (TestSplicePanicCleansUp). Its bytes are lost
// with the splice's counts: counted 0.
func (sv *Serving) settlePanicked(r *record, v any) {
	if lc := r.live; lc != nil {
		sv.p.removeLive(lc)
		lc.kill()
	}
	if t := r.closer; t != nil {
		t.cut()
	}
	if r.phase.Swap(phaseSettled) == phaseOpen {
		// Not r.series: opened may be setting it on another goroutine.
		sv.countClose(r, nil, 0, 0, "internal_error",
			fmt.Errorf("the agent panicked while relaying it (%v); its bytes are not counted", v))
	}
}

// panicOf is the panic hbone recovered that ended a stream alone
// (its drain's, its OnResponse's), if err is one.
func panicOf(err error) *hbone.PanicError {
	if err == nil {
		return nil
	}
	var pe *hbone.PanicError
	if errors.As(err, &pe) {
		return pe
	}
	return nil
}

// streamPanicked settles r's connection, whose stream hbone ended after
// a panic it recovered on that stream's own code (drain, OnResponse),
// as recoverConn settles a handler's panic: one
// failed_total{reason="internal_error"} with the connection's direction
// and identities, one error line with the stack, and, if it was counted
// open, its close with reason internal_error (its bytes are known here).
// hbone tells only Splice's caller of such a panic, not Config.OnPanic:
// before, hbonePanicked counted it under "unknown" and the connection's
// end was counted again with the panic as its error, as a plain close
// (drain) or as a second failure, hbone_stream (OnResponse, which then
// closed the pooled connection, on its read loop)
// (TestHBONEStreamPanicCountedOnce).
func (sv *Serving) streamPanicked(r *record, pe *hbone.PanicError, toApp, fromApp int64) {
	sv.p.m.failed.WithLabelValues(r.dir, "internal_error", orUnknown(r.srcID), orUnknown(r.dstID)).Inc()
	sv.log.Error("HBONE stream panicked (hbone reset it; its connection goes on)",
		append(sv.logAttrs(r), "panic", fmt.Sprint(pe.Value), "stack", string(pe.Stack))...)
	// Pending: OnResponse panicked before it counted the connection
	// open, and never will now.
	if r.phase.CompareAndSwap(phasePending, phaseClosed) {
		return
	}
	r.phase.Store(phaseClosed)
	sv.countClose(r, r.series, toApp, fromApp, "internal_error", pe)
}

// failed counts a connection refused or failed before it was established
// and logs it (one access-log line, as for any connection).
func (sv *Serving) failed(r *record, reason string, err error) {
	sv.p.m.failed.WithLabelValues(r.dir, reason, orUnknown(r.srcID), orUnknown(r.dstID)).Inc()
	attrs := append(sv.logAttrs(r), "reason", reason, "duration", time.Since(r.start).String())
	if err != nil {
		attrs = append(attrs, "error", err.Error())
	}
	sv.log.LogAttrs(context.Background(), slog.LevelWarn, "connection failed", argsToAttrs(attrs)...)
}

// failedUnauthenticated is failed for a connection whose peer is not
// authenticated (a failed inbound handshake): counted every time, logged
// a few times a second at most (Proxy.hsLog), saying how many lines were
// left out.
func (sv *Serving) failedUnauthenticated(r *record, reason string, err error) {
	ok, suppressed := sv.p.hsLog.take(time.Now())
	if !ok {
		sv.p.m.failed.WithLabelValues(r.dir, reason, orUnknown(r.srcID), orUnknown(r.dstID)).Inc()
		return
	}
	if suppressed > 0 {
		err = fmt.Errorf("%w (and %d more failed handshakes not logged)", err, suppressed)
	}
	sv.failed(r, reason, err)
}

func argsToAttrs(a []any) []slog.Attr {
	out := make([]slog.Attr, 0, len(a)/2)
	for i := 0; i+1 < len(a); i += 2 {
		out = append(out, slog.Any(a[i].(string), a[i+1]))
	}
	return out
}

// reset aborts a TCP connection with RST, so the app sees a refusal
// rather than a clean (and misleading) end of stream.
func reset(c *net.TCPConn) {
	_ = c.SetLinger(0)
	_ = c.Close()
}

func (sv *Serving) isAgentPort(ap netip.AddrPort) bool {
	return sv.p.agentPorts[ap.Port()]
}

// outbound handles a connection the pod's app made, captured on 15001.
func (sv *Serving) outbound(c *net.TCPConn, slots chan struct{}) {
	r := &record{dir: "outbound", src: addrPortOf(c.RemoteAddr()), srcID: sv.pod.Workload.Identity, start: connStart(c, time.Now()), slots: slots}
	defer sv.recoverConn(r, func() { reset(c) })
	defer r.release()
	// Counted against the source pod, refused before anything is spent
	// on it (no dial, no TLS): the app sees a reset at once.
	if ok, held, share := sv.admitConn(); !ok {
		sv.shed(r, held, share)
		reset(c)
		return
	}
	defer sv.connDone()
	dst, err := originalDst(c)
	if err != nil {
		sv.failed(r, "no_original_dst", err)
		reset(c)
		return
	}
	r.dst = dst
	local := addrPortOf(c.LocalAddr())
	switch {
	case dst.Addr().IsLoopback() || dst.Addr().IsUnspecified():
		sv.failed(r, "self_call", errors.New("loopback destination"))
		reset(c)
		return
	case dst == local || (sv.ownIPs[dst.Addr()] && sv.isAgentPort(dst)):
		sv.failed(r, "self_call", errors.New("destination is the agent itself"))
		reset(c)
		return
	}
	target := dst
	dir := sv.p.cfg.Directory
	if svc, ok := sv.p.services.ServiceByAddr(dst); ok {
		r.svc = dst
		if len(svc.Endpoints) == 0 {
			sv.failed(r, "no_endpoints", errors.New("service has no ready endpoint"))
			reset(c)
			return
		}
		// Random per connection, or the client pod's endpoint under
		// ClientIP affinity: the source pod's agent chooses, so
		// affinity is per client pod IP, as with kube-proxy.
		if a := svc.Affinity; a != nil {
			target = sv.p.affinity.Choose(r.src.Addr(), dst, a.Port, svc.Endpoints, a.Timeout, r.start)
		} else {
			target = balance.Random(svc.Endpoints)
		}
		r.dst = target
	}
	w, ok := dir.WorkloadByIP(target.Addr())
	if !ok || !w.Meshed {
		sv.passthrough(c, r, target)
		return
	}
	if w.Identity == "" {
		sv.failed(r, "no_identity", errors.New("meshed destination without an identity"))
		reset(c)
		return
	}
	r.mode = "hbone"
	r.dstID = w.Identity
	r.hboneAddr = netip.AddrPortFrom(target.Addr(), sv.p.hbonePort)
	key := poolKey{src: r.srcID, dst: w.Identity, addr: r.hboneAddr}
	// The app usually sends first, right after connecting: take what is
	// already there (never waiting) to send it with the CONNECT.
	var first []byte
	var bp *[]byte
	if rc, err := c.SyscallConn(); err == nil {
		bp = firstBufs.Get().(*[]byte)
		_ = rc.Read(func(fd uintptr) bool {
			if n, err := unix.Read(int(fd), *bp); err == nil && n > 0 {
				first = (*bp)[:n]
			}
			return true
		})
		if first == nil {
			// Nothing to send yet: do not hold 16 KiB through a dial
			// that may wait for the connect timeout.
			firstBufs.Put(bp)
			bp = nil
		}
	}
	// The first bytes travel with the CONNECT, outside Splice's count.
	nFirst := int64(len(first))
	ctx, cancel := context.WithTimeout(context.Background(), sv.p.connectTimeout)
	var opened *hbone.Stream
	var sent int
	gone := watchDuring(c, cancel, func() {
		opened, sent, err = sv.pool.open(ctx, key, target.String(), sv.requestHeaders(r), first)
	})
	s := opened // set once: the closures below copy it, not share it on the heap
	cancel()
	if err == nil && sent < len(first) {
		_, err = s.Write(first[sent:])
		if err != nil {
			s.Reset(hbone.ErrCodeCancel)
		}
	}
	if bp != nil {
		firstBufs.Put(bp)
	}
	if err != nil {
		reason := "hbone_connect"
		var de *dialError
		switch {
		case gone:
			// An app that gives up before the connect timeout on a
			// 15008 a NetworkPolicy blocks ends here, not in
			// connect_timeout: say so.
			reason, err = "client_gone", fmt.Errorf("the app went away after %v, before the HBONE connection to %v was up (is a NetworkPolicy blocking port %d?): %w",
				time.Since(r.start).Round(time.Millisecond), r.hboneAddr, r.hboneAddr.Port(), err)
		case errors.As(err, &de):
			reason = de.reason
		}
		sv.failed(r, reason, err)
		reset(c)
		return
	}
	r.release()
	s.OnResponse(func(st int) {
		if testHookResponse != nil {
			testHookResponse(r, st)
		}
		if st >= 200 && st <= 299 { // any 2xx opens the tunnel (hbone)
			sv.opened(r)
		}
	})
	res := sv.spliceTracked(r, s, c)
	if pe := panicOf(res.Err); pe != nil {
		sv.streamPanicked(r, pe, res.ToApp, nFirst+res.FromApp)
		return
	}
	// Open or not is the phase's to say, not a flag: OnResponse runs on
	// the pooled connection's read loop and may still be counting the
	// connection open now that the splice ended (the app reset as the
	// 200 arrived). Ended here as never open, it never will be; a flag
	// read then said not open, and the read loop went on to count it
	// open with no close to follow (TestOutboundOpenedAfterSpliceEnd).
	if r.phase.CompareAndSwap(phasePending, phaseClosed) {
		reason := "hbone_stream"
		err := res.Err
		// A refusal is the stream's to say too, not OnResponse's:
		// OnResponse set variables read here while the read loop could
		// still be writing them (the app reset as the 401 arrived), a
		// data race: the handler, first, counted a denial as
		// hbone_stream (TestOutboundRefusedAsSpliceEnds). hbone sets the
		// status before it closes the response channel Status looks at,
		// before it runs OnResponse. res.Err covers a refusal Splice
		// saw while that channel was being closed.
		var se hbone.StatusError
		if st := s.Status(); st != 0 && (st < 200 || st > 299) {
			reason = statusReason(st, s.ResponseHeader(refusedHeader))
			if err == nil {
				err = hbone.StatusError{Status: st}
			}
		} else if errors.As(res.Err, &se) {
			reason = statusReason(se.Status, s.ResponseHeader(refusedHeader))
		} else if errors.Is(res.Err, hbone.ErrPeerSilent) {
			// The pooled connection it went on was dead (hbone's
			// liveness probe): as a dial to that node would have.
			reason = "connect_timeout"
		}
		sv.failed(r, reason, err)
		return
	}
	sv.finished(r, res.ToApp, nFirst+res.FromApp, res.Err)
}

// spliceTracked splices the app's connection c to its outbound stream s,
// tracked for Close's cut meanwhile. The untrack is deferred: after a
// panic in the splice (recoverConn resets c and the agent goes on) the
// closer stayed in sv.closers until the pod's serving closed, one per
// panic (TestSplicePanicCleansUp). r keeps the closer, which recoverConn
// runs: it resets the stream too, which the panicked splice left open
// on the pooled connection, and the peer's side of it.
func (sv *Serving) spliceTracked(r *record, s *hbone.Stream, c *net.TCPConn) hbone.SpliceResult {
	closer := sv.track(func() { s.Reset(hbone.ErrCodeCancel); reset(c) })
	r.closer = closer
	defer sv.untrack(closer)
	return s.Splice(c)
}

// firstBufs hold an app's first bytes while its stream is opened.
var firstBufs = sync.Pool{New: func() any { b := make([]byte, 16<<10); return &b }}

// refusedHeader rides on our 401 when the server refused the stream
// because of the client's certificate (refuseStale), not its policy: its
// value is the server's reason (tls_expired, tls_untrusted); and on our
// 503 when the destination pod is over its share (over_share). HBONE has
// only the bare 401 for both, so without it the client counted a
// certificate refusal as a policy denial. Peers that do not know it
// ignore it: ztunnel's and Istio's clients look at the status only.
const refusedHeader = "ambit-refused"

// statusReason is the client's metrics reason for a CONNECT answered
// with st; why is the response's refusedHeader ("" when absent).
func statusReason(st int, why string) string {
	switch st {
	case 400:
		return "bad_request"
	case 401, 403:
		if st == 401 && why != "" {
			return refusedReason(why)
		}
		return "denied"
	case 503:
		if why == overShare {
			// The destination pod's agent shed it (share.go).
			return "upstream_over_share"
		}
		return "upstream_unavailable"
	}
	return "status_" + itoa(st)
}

// refusedReason is the client's reason for a 401 that says the server
// refused our certificate: tls_refused_ and the server's word for the
// cases the server sends (the peer's text never becomes a label as is,
// to keep the series bounded).
func refusedReason(why string) string {
	switch why {
	case "tls_expired":
		return "tls_refused_expired"
	case "tls_untrusted":
		return "tls_refused_untrusted"
	}
	return "tls_refused"
}

func itoa(i int) string {
	if i == 0 {
		return "0"
	}
	var b [20]byte
	n := len(b)
	neg := i < 0
	if neg {
		i = -i
	}
	for i > 0 {
		n--
		b[n] = byte('0' + i%10)
		i /= 10
	}
	if neg {
		n--
		b[n] = '-'
	}
	return string(b[n:])
}

// requestHeaders are sent with every CONNECT, like ztunnel's: where the
// connection comes from (Forwarded), who we are (baggage) and a fresh
// trace id (traceparent).
func (sv *Serving) requestHeaders(r *record) []hpack.HeaderField {
	var id [24]byte
	_, _ = rand.Read(id[:])
	return []hpack.HeaderField{
		{Name: "forwarded", Value: `for="` + r.src.String() + `"`},
		{Name: "baggage", Value: sv.baggage},
		{Name: "traceparent", Value: "00-" + hex.EncodeToString(id[:16]) + "-" + hex.EncodeToString(id[16:]) + "-00"},
	}
}

// passthrough relays a connection to a destination outside the mesh,
// from the pod's own network and marked, so it is not captured again.
func (sv *Serving) passthrough(c *net.TCPConn, r *record, target netip.AddrPort) {
	r.mode = "passthrough"
	ctx, cancel := context.WithTimeout(context.Background(), sv.p.connectTimeout)
	var up net.Conn
	var err error
	gone := sv.dialDuring(c, cancel, func() { up, err = sv.pod.Net.Dial(ctx, netip.Addr{}, target) })
	if err != nil {
		if gone {
			sv.failed(r, "client_gone", fmt.Errorf("the app went away after %v, before the connection to %v was up: %w",
				time.Since(r.start).Round(time.Millisecond), target, err))
		} else {
			sv.failed(r, "upstream_unreachable", sv.cutDial(r, err))
		}
		reset(c)
		return
	}
	r.release()
	sv.opened(r)
	fromApp, toApp, err := sv.relay(r, c, up)
	sv.finished(r, toApp, fromApp, err)
}

// dialDuring runs dial, a dial for the accepted connection c whose
// context cancel ends, with cancel tracked as Close's cut (cutDial) and
// c's client watched (watchDuring); it cancels the context once dial
// returns and reports whether the client went away. The untrack is
// deferred, like the watch's stop: a dial that panics (the connection's
// recover resets c and the agent goes on) left its cancel in sv.closers
// until the pod's serving closed (TestDialPanicUntracks).
func (sv *Serving) dialDuring(c *net.TCPConn, cancel context.CancelFunc, dial func()) bool {
	cut := sv.track(cancel)
	defer func() {
		sv.untrack(cut)
		cancel()
	}()
	return watchDuring(c, cancel, dial)
}

// cutDial says so when a dial's err is Close's or Abort's doing: the
// dial was tracked (track, its cancel as the cut) from its start, so
// past Close's deadline a dial still pending (a destination that drops
// SYNs, an app whose backlog is full) ends with the pod's other
// connections, rather than holding the pod's removal for up to the
// connect timeout. (15001's HBONE dials end with the pod's pool, which
// the cut closes.) Abort cuts them at once, with no drain to pass: the
// line says which did.
func (sv *Serving) cutDial(r *record, err error) error {
	sv.mu.Lock()
	cut, aborted := sv.cutting, sv.aborted
	sv.mu.Unlock()
	switch {
	case aborted:
		return fmt.Errorf("the pod's network going (its DEL) cut the dial after %v: %w",
			time.Since(r.start).Round(time.Millisecond), err)
	case cut:
		return fmt.Errorf("the pod's removal cut the dial after %v (its drain deadline had passed): %w",
			time.Since(r.start).Round(time.Millisecond), err)
	}
	return err
}

// relay copies both ways between two TCP connections (splice(2) under
// the hood), carrying half-closes, until both directions end. r keeps
// the closer for recoverConn.
func (sv *Serving) relay(r *record, app *net.TCPConn, other net.Conn) (fromApp, toApp int64, err error) {
	closer := sv.track(func() {
		// Before app's reset: it wakes the copies, whose own closes of
		// other must send the reset too.
		sv.resetIfAborted(other)
		reset(app)
		other.Close()
	})
	r.closer = closer
	defer sv.untrack(closer)
	var wg sync.WaitGroup
	var errTo error
	wg.Add(1)
	go func() {
		defer wg.Done()
		toApp, errTo = io.Copy(app, other)
		if errTo != nil {
			reset(app)
			other.Close()
			return
		}
		_ = app.CloseWrite()
	}()
	var errFrom error
	fromApp, errFrom = io.Copy(other, app)
	if errFrom != nil {
		reset(app)
		if tc, ok := other.(*net.TCPConn); ok {
			_ = tc.SetLinger(0)
		}
		other.Close()
	} else if cw, ok := other.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
	wg.Wait()
	app.Close()
	other.Close()
	if errFrom != nil {
		return fromApp, toApp, errFrom
	}
	return fromApp, toApp, errTo
}

// resetIfAborted makes c close with a reset (SO_LINGER 0) once Abort
// ran: the pod's network is going, and a FIN from the far side of a
// plaintext relay (a delivery to the app, a passthrough's destination)
// waited behind whatever its peer had not taken, for a window that may
// never open again or an answer the removed interface no longer takes;
// its socket stayed in the pod's namespace in FIN_WAIT, its peer not
// told (TestAbortResetsAPassthroughsFarSide). Close's cut closes it as
// before: the pod's network stays to carry the FIN.
func (sv *Serving) resetIfAborted(c net.Conn) {
	sv.mu.Lock()
	aborted := sv.aborted
	sv.mu.Unlock()
	if tc, ok := c.(*net.TCPConn); ok && aborted {
		_ = tc.SetLinger(0)
	}
}

// inboundPlain handles plaintext arriving for the pod's app on 15006.
func (sv *Serving) inboundPlain(c *net.TCPConn, slots chan struct{}) {
	w := sv.workload()
	r := &record{dir: "inbound", mode: "plaintext", src: addrPortOf(c.RemoteAddr()), dstID: w.Identity, start: connStart(c, time.Now()), slots: slots}
	defer sv.recoverConn(r, func() { reset(c) })
	defer r.release()
	// Counted against the destination pod; refused with a reset, the
	// app never dialled.
	if ok, held, share := sv.admitConn(); !ok {
		sv.shed(r, held, share)
		reset(c)
		return
	}
	defer sv.connDone()
	dst, err := originalDst(c)
	if err != nil {
		sv.failed(r, "no_original_dst", err)
		reset(c)
		return
	}
	r.dst = dst
	if !sv.ownIPs[dst.Addr()] {
		sv.failed(r, "ip_mismatch", errors.New("destination is not this pod"))
		reset(c)
		return
	}
	if sv.isAgentPort(dst) {
		sv.failed(r, "self_call", errors.New("destination is an agent port"))
		reset(c)
		return
	}
	sv.plaintextFromMesh(r)
	info := ConnInfo{SrcIP: r.src.Addr(), Dst: w, DstPort: dst.Port(), Plaintext: true}
	if v := sv.p.authorize(info); !v.Allow {
		sv.failed(r, "denied", errors.New("policy "+v.Policy+": "+v.Reason))
		reset(c)
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	var dialed net.Conn
	gone := sv.dialDuring(c, cancel, func() { dialed, err = sv.dialApp(ctx, r.src.Addr(), dst, true) })
	app := dialed // set once: the closures below copy it, not share it on the heap
	if err != nil {
		if gone {
			sv.failed(r, "client_gone", fmt.Errorf("the client went away after %v, before the connection to the app was up: %w",
				time.Since(r.start).Round(time.Millisecond), err))
		} else {
			sv.failed(r, "upstream_unreachable", sv.cutDial(r, err))
		}
		reset(c)
		return
	}
	lc := &liveConn{info: info, rec: r, kill: func() { reset(c); app.Close() }, sv: sv}
	if !sv.stillAllowed(lc) {
		reset(c)
		app.Close()
		return
	}
	r.release()
	sv.opened(r)
	fromClient, toClient, err := sv.relayLive(c, app, lc)
	// For inbound, "sent" is what the local app sent back.
	sv.finished(r, fromClient, toClient, err)
}

// plaintextFromMesh counts and logs (a line a second at most) a
// plaintext connection whose source IP is a meshed pod's. Between two
// meshed pods every connection should be HBONE: plaintext here means the
// source's capture was skipped (an app marking its socket with the
// agent's SO_MARK: CAP_NET_ADMIN, or CAP_NET_RAW since Linux 5.17, the
// runtimes' default for root containers) or the source's agent did not
// take this pod for meshed (its view lagging, "not yet annotated").
// Strict mode refuses it anyway; permissive serves it, and without this
// nobody was told (TestPlaintextFromMeshedPodIsCounted).
func (sv *Serving) plaintextFromMesh(r *record) {
	src := r.src.Addr()
	if sv.ownIPs[src] {
		return
	}
	sw, ok := sv.p.cfg.Directory.WorkloadByIP(src)
	if !ok || !sw.Meshed {
		return
	}
	sv.p.m.plainFromMesh.WithLabelValues(orUnknown(sw.Identity), orUnknown(r.dstID)).Inc()
	if ok, suppressed := sv.p.plainLog.take(time.Now()); ok {
		sv.log.Warn("plaintext from a meshed pod: its capture was skipped (an app setting SO_MARK, which CAP_NET_RAW or CAP_NET_ADMIN allows) or its agent does not know this pod as meshed",
			append(sv.logAttrs(r), "src_pod", sw.Namespace+"/"+sw.Name, "src_pod_identity", sw.Identity, "not_logged_since", suppressed)...)
	}
}

// relayLive relays the live connection lc (registered by stillAllowed)
// and unregisters it once the relay ends, before the caller's finished,
// so a policy change cannot revoke what is already logged as complete.
// Deferred: after a panic in the relay (recoverConn resets the client and
// the agent goes on) lc stayed in p.live until the process exited, and
// the next policy change that refused it counted a policy_revoked for a
// connection long gone (TestSplicePanicCleansUp).
func (sv *Serving) relayLive(c *net.TCPConn, app net.Conn, lc *liveConn) (fromClient, toClient int64, err error) {
	defer sv.p.removeLive(lc)
	return sv.relay(lc.rec, c, app)
}

// stillAllowed registers lc for Reauthorize and checks it once more. The
// connection was authorized before its app dial, which can take seconds
// (up to the connect timeout): a policy change or relabelling meanwhile
// re-checked every live connection but this one, not yet registered, so
// it would have lived on under a policy that refuses it. Checked after
// registering, a change is seen either here or by that re-check. A
// refusal unregisters lc and is counted; the caller closes.
func (sv *Serving) stillAllowed(lc *liveConn) bool {
	// Kept in the record before it is registered: a panic from here on
	// (the re-check runs the Authorizer; then the response, the splice)
	// unregisters it in recoverConn.
	lc.rec.live = lc
	sv.p.addLive(lc)
	v := sv.p.authorize(lc.current())
	if v.Allow {
		return true
	}
	sv.p.removeLive(lc)
	sv.failed(lc.rec, "denied", errors.New("policy "+v.Policy+": "+v.Reason+" (changed while connecting to the app)"))
	return false
}

// dialApp connects to the pod's app from the client's address, within
// the connect timeout and until parent ends; plaintext when the client's
// connection came to 15006 (see OwnPortDialer).
func (sv *Serving) dialApp(parent context.Context, src netip.Addr, dst netip.AddrPort, plaintext bool) (net.Conn, error) {
	if sv.p.cfg.NoOriginalSource || src.Is4() != dst.Addr().Is4() || sv.ownIPs[src] {
		src = netip.Addr{}
	}
	ctx, cancel := context.WithTimeout(parent, sv.p.connectTimeout)
	defer cancel()
	var c net.Conn
	var err error
	if od, ok := sv.pod.Net.(OwnPortDialer); ok && plaintext && src.IsValid() {
		app := dst.Port()
		c, err = od.DialLocalOwnPort(ctx, src, dst, func(p uint16) bool { return p == app || sv.appPorts.has(p) })
	} else if ld, ok := sv.pod.Net.(LocalDialer); ok {
		c, err = ld.DialLocal(ctx, src, dst)
	} else {
		c, err = sv.pod.Net.Dial(ctx, src, dst)
	}
	if err == nil {
		// Only a port an app answered on: a scan of closed ports must
		// not fill the set.
		sv.appPorts.add(dst.Port())
	}
	return c, err
}

// inboundHBONE serves one mTLS HBONE connection on 15008.
func (sv *Serving) inboundHBONE(raw *net.TCPConn) {
	w := sv.pod.Workload
	peer := addrPortOf(raw.RemoteAddr())
	start := connStart(raw, time.Now())
	// The handshake is bounded in time (its context; the client's
	// HTTP/2 preface after it is hbone's to bound) and in number (p.hs,
	// until verify below).
	pending := sv.p.hs.add(sv, raw)
	// Cut already (Close past its deadline, Abort): the cut's eviction
	// of the pod's pending handshakes may have looked before this one
	// was added (accepted as the listener closed), which then waited for
	// its peer up to the handshake timeout, holding the pod's release,
	// and closed with a FIN (TestAbortResetsAHandshakeAcceptedAsItBegan).
	// Looked at once added: either the eviction sees it or this sees the
	// cut, and the eviction resets it (a socket Abort's resets missed).
	sv.mu.Lock()
	cut := sv.cutting
	sv.mu.Unlock()
	if cut {
		sv.p.hs.evictPod(sv)
	}
	// Deferred too, for a panic in the TLS callbacks (GetCertificate,
	// VerifyPeerCertificate): the accept loop's recover alone left the
	// entry pending and counted (TestHandshakePanicEndsPending). done
	// is idempotent; the call after hbone.Server reads its result.
	defer sv.p.hs.done(pending)
	ctx, cancel := context.WithTimeout(context.Background(), sv.p.hsTimeout)
	defer cancel()
	var peerID string
	ps := &peerState{}
	// A stream refused because the client's certificate no longer
	// passes asks for the connection to go away (the wait below): the
	// client then dials again with its current certificate, instead of
	// having every stream refused on a connection it keeps pooled.
	retire := make(chan struct{}, 1)
	// The handshake's progress, for the pending bound (waitsOnUs).
	tcfg := sv.p.serverTLS(w.Identity, ps)
	getCert, verifyPeer := tcfg.GetCertificate, tcfg.VerifyPeerCertificate
	tcfg.GetCertificate = func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
		pending.reached(phaseHello)
		return getCert(hello)
	}
	tcfg.VerifyPeerCertificate = func(raw [][]byte, chains [][]*x509.Certificate) error {
		pending.reached(phaseFlight)
		return verifyPeer(raw, chains)
	}
	hc, err := hbone.Server(ctx, raw, tcfg, sv.p.hcfg,
		func(tc *tls.Conn) error {
			// No longer pending (nor evictable) from here: the peer
			// is authenticated, its HTTP/2 preface is hbone's to
			// bound.
			if !sv.p.hs.finish(pending) {
				return errEvicted
			}
			peerID = peerIdentity(tc)
			return nil
		},
		func(s *hbone.Stream) {
			defer sv.recoverConn(nil, func() { s.Reset(hbone.ErrCodeInternal) })
			if err := sv.p.recheck(ps, time.Now()); err != nil {
				sv.refuseStale(s, peerID, peer, err)
				select {
				case retire <- struct{}{}:
				default:
				}
				return
			}
			sv.inboundStream(s, peerID, peer)
		})
	cancel()
	evicted := sv.p.hs.done(pending)
	if err != nil {
		r := &record{dir: "inbound", mode: "hbone", src: peer, dstID: w.Identity, start: start}
		reason := tlsReason(err)
		switch {
		case evicted:
			reason = "handshake_evicted"
		case errors.Is(err, context.DeadlineExceeded):
			reason = "handshake_timeout"
		}
		sv.failedUnauthenticated(r, reason, err)
		return
	}
	sv.mu.Lock()
	closing, closeCtx := sv.closing, sv.closeCtx
	sv.hconns[hc] = struct{}{}
	sv.mu.Unlock()
	// Held past its end while its socket lingers (sockets): Close
	// waits for it, Abort resets it. Deferred, so a panic below does
	// not hold it for ever.
	sv.pool.socks.add(hc, raw)
	defer sv.pool.socks.ended(hc)
	// Cut only past Close's deadline: without waiting on the peer
	// (abortConn), which a Shutdown already under way may be doing.
	tr := sv.track(func() { abortConn(hc) })
	if closing {
		// Accepted before the listener closed, handshaken after Close
		// began: the client may already be opening streams on it, so
		// go away gracefully, within Close's deadline.
		go hc.Shutdown(closeCtx)
	}
	idle := make(chan struct{}, 1)
	stopIdle := sv.watchIdle(hc, idle)
	select {
	case <-retire:
		hc.Shutdown(context.Background())
	case <-idle:
		sv.p.m.idleClosed.Inc()
		sv.log.Debug("closing an idle HBONE connection", "src", peer.String(), "src_identity", peerID,
			"idle_timeout", sv.p.idleTimeout.String())
		hc.Shutdown(context.Background())
	case <-hc.Done():
	}
	stopIdle()
	<-hc.Done()
	sv.untrack(tr)
	sv.mu.Lock()
	delete(sv.hconns, hc)
	sv.kickLocked()
	sv.mu.Unlock()
}

// watchIdle sends on idle once hc has had no stream open for the
// Proxy's idle timeout (nothing when there is none); stop ends the
// watch. One timer per connection and no goroutine: it fires at most once
// per timeout while streams come and go, and then waits for what is left
// of the timeout since the last stream ended (hbone's IdleSince).
func (sv *Serving) watchIdle(hc *hbone.Conn, idle chan<- struct{}) (stop func()) {
	d := sv.p.idleTimeout
	if d <= 0 {
		return func() {}
	}
	var mu sync.Mutex
	var t *time.Timer
	stopped := false
	check := func() {
		next := d // streams open: it cannot expire sooner than d from now
		if since := hc.IdleSince(); !since.IsZero() {
			next = d - time.Since(since)
		}
		if next <= 0 {
			select {
			case idle <- struct{}{}:
			default:
			}
			return
		}
		mu.Lock()
		if !stopped {
			t.Reset(next)
		}
		mu.Unlock()
	}
	mu.Lock()
	t = time.AfterFunc(d, check)
	mu.Unlock()
	return func() {
		mu.Lock()
		stopped = true
		t.Stop()
		mu.Unlock()
	}
}

// hbonePanicked hears of a panic on an HBONE connection's read loop,
// control-frame writer or keepalive (hbone.Config.OnPanic), which run on
// goroutines of hbone's, outside the connection handlers' recover; the
// read loop parses what the peer sends. hbone has closed the connection,
// its streams failing; the agent goes on. Counted and logged once per
// panic, as recoverConn does for a handler; the stack says where. Its
// labels are unknown: the panic is the HBONE connection's, not one app
// connection's. The app connections it ends are counted by their own
// ends (a close, or hbone_stream for one not yet open), not as panics.
// A panic that ends one stream alone (its drain, its OnResponse) is its
// handler's to count (streamPanicked).
func (p *Proxy) hbonePanicked(c *hbone.Conn, v any, stack []byte) {
	p.m.failed.WithLabelValues("unknown", "internal_error", "unknown", "unknown").Inc()
	p.log.Error("HBONE connection's own goroutine panicked (read loop, control-frame writer, keepalive): the connection is closed",
		"peer", c.NetConn().RemoteAddr().String(), "panic", fmt.Sprint(v), "stack", string(stack))
}

// errEvicted: the handshake was closed to make room (handshakes) just as
// it succeeded.
var errEvicted = errors.New("tunnel: pending handshake evicted")

// refuseStale answers a stream on a connection whose client no longer
// passes the checks of its handshake (recheck): 401, counted with the
// handshake's reasons (tls_expired, tls_untrusted), which the 401 carries
// in refusedHeader so the client does not count a policy denial.
func (sv *Serving) refuseStale(s *hbone.Stream, peerID string, peer netip.AddrPort, err error) {
	r := &record{dir: "inbound", mode: "hbone", src: peer, srcID: peerID, dstID: sv.pod.Workload.Identity, start: time.Now()}
	reason := tlsReason(err)
	s.Respond(401, []hpack.HeaderField{{Name: refusedHeader, Value: reason}})
	sv.failed(r, reason, err)
}

// inboundStream serves one CONNECT: checks, policy, dial the app from the
// client's address, splice.
func (sv *Serving) inboundStream(s *hbone.Stream, peerID string, peer netip.AddrPort) {
	w := sv.workload()
	r := &record{dir: "inbound", mode: "hbone", src: peer, srcID: peerID, dstID: w.Identity, start: time.Now()}
	defer sv.recoverConn(r, func() { s.Reset(hbone.ErrCodeInternal) })
	sv.enter()
	defer sv.leave()
	req := s.Request
	if req.Method != "CONNECT" {
		s.Respond(400, nil)
		sv.failed(r, "bad_request", errors.New("method "+req.Method+" is not CONNECT"))
		return
	}
	dst, err := ParseAuthority(req.Authority)
	if err != nil {
		s.Respond(400, nil)
		sv.failed(r, "bad_request", err)
		return
	}
	r.dst = dst
	if !sv.ownIPs[dst.Addr()] {
		s.Respond(400, nil)
		sv.failed(r, "ip_mismatch", errors.New("authority "+req.Authority+" is not this pod"))
		return
	}
	if sv.isAgentPort(dst) {
		s.Respond(400, nil)
		sv.failed(r, "self_call", errors.New("authority names an agent port"))
		return
	}
	info := ConnInfo{SrcIdentity: peerID, SrcIP: peer.Addr(), Dst: w, DstPort: dst.Port()}
	if v := sv.p.authorize(info); !v.Allow {
		s.Respond(401, nil)
		sv.failed(r, "denied", errors.New("policy "+v.Policy+": "+v.Reason))
		return
	}
	// Counted against the destination pod. Refused with 503, ztunnel's
	// answer for an upstream it cannot serve, and not REFUSED_STREAM,
	// which says the stream may be retried as is (x/net's transport
	// retries it at once: a refusal would become a loop); nor 429,
	// which blames this client when it is the pod's load, all its
	// clients together. refusedHeader says why, for our clients' metrics.
	if ok, held, share := sv.admitConn(); !ok {
		s.Respond(503, []hpack.HeaderField{{Name: refusedHeader, Value: overShare}})
		sv.shed(r, held, share)
		return
	}
	defer sv.connDone()
	ctx, cancel := streamContext(s)
	app, err := sv.dialApp(ctx, peer.Addr(), dst, false)
	gone := ctx.Err() != nil
	cancel()
	if err != nil {
		if gone {
			// The client reset the stream (or its connection died)
			// while we dialled: nobody to answer.
			sv.failed(r, "hbone_stream", fmt.Errorf("stream reset while connecting to the app: %w", err))
			return
		}
		s.Respond(503, nil)
		sv.failed(r, "upstream_unreachable", err)
		return
	}
	lc := &liveConn{info: info, rec: r, kill: func() { s.Reset(hbone.ErrCodeCancel); app.Close() }, sv: sv}
	if !sv.stillAllowed(lc) {
		s.Respond(401, nil)
		app.Close()
		return
	}
	if err := s.Respond(200, []hpack.HeaderField{{Name: "baggage", Value: sv.baggage}}); err != nil {
		sv.p.removeLive(lc)
		app.Close()
		sv.failed(r, "hbone_stream", err)
		return
	}
	toApp, fromApp, err := sv.spliceLive(s, app, lc)
	if pe := panicOf(err); pe != nil {
		sv.streamPanicked(r, pe, toApp, fromApp)
		return
	}
	sv.finished(r, toApp, fromApp, err)
}

// spliceLive splices the stream s to the app for the live connection lc
// (registered by stillAllowed), tracked for Close's cut meanwhile. The
// untrack and the unregistering are deferred, as in relayLive: a panic
// in the splice (recoverConn resets s) left both behind. They still run
// before the caller's finished (see relayLive).
func (sv *Serving) spliceLive(s *hbone.Stream, app net.Conn, lc *liveConn) (toApp, fromApp int64, err error) {
	closer := sv.track(lc.kill)
	lc.rec.closer = closer
	defer sv.p.removeLive(lc)
	defer sv.untrack(closer)
	sv.opened(lc.rec)
	if tc, ok := app.(*net.TCPConn); ok {
		res := s.Splice(tc)
		return res.ToApp, res.FromApp, res.Err
	}
	return genericSplice(s, app)
}

// streamContext is a context that ends when the server stream s is
// reset by its client or its connection dies (or cancel is called):
// the app dial of a stream the client gave up on is abandoned at once,
// rather than holding a descriptor, a goroutine and the pod's share for
// up to the connect timeout (an app whose backlog is full, a port a
// firewall black-holes). On a server stream hbone closes the response
// channel Response waits on only then (reset, connection closed), so
// Response is that wait; it costs a goroutine for the dial's duration.
func streamContext(s *hbone.Stream) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		_, _, _ = s.Response(ctx)
		cancel()
	}()
	return ctx, cancel
}

// genericSplice joins a stream and any net.Conn (a PodNetwork that does
// not hand out TCP connections).
func genericSplice(s *hbone.Stream, app net.Conn) (toApp, fromApp int64, err error) {
	done := make(chan struct{})
	go func() {
		toApp, _ = io.Copy(app, s)
		if cw, ok := app.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
		}
		close(done)
	}()
	fromApp, err = io.Copy(s, app)
	s.CloseWrite()
	<-done
	app.Close()
	s.Close()
	return
}
