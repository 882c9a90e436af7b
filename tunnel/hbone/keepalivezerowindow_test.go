package hbone

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"os/exec"
	"regexp"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"golang.org/x/sys/unix"
)

// zeroWindowCfg: a PingTimeout longer than the gaps between the answers
// to the kernel's zero-window probes in zeroWindowNetns (~0.86 s), so a
// keepalive that took any ACK arriving for the link's progress would
// hold the connection to the cap, 20 s after the PING, where one that
// reads the byte counters closes it ~2 s after. PingTimeouts of 300 to
// 500 ms are shorter than those gaps: both kinds of keepalive close at
// about the same time there, and the test could not tell them apart.
var zeroWindowCfg = Config{PingInterval: 100 * time.Millisecond, PingTimeout: 2 * time.Second}

// zeroWindowNetns makes a network namespace, gone with the test, whose
// loopback is up and whose tcp_retries2 is 2, and returns its name.
//
// Linux times its zero-window probes from the RTO (200 ms at least)
// doubled per probe sent, up to tcp_retries2 doublings, and an answer
// does not undo them (tcp_ack_probe rearms at the backed-off delay).
// With the default 15 the gaps between answers grow (0.2, 0.4, 0.8,
// 1.6 s, ...) until any PingTimeout sees a quiet gap and a keepalive
// reading ACK arrival closes too, only later. At 2 they stop at 4 ×
// RTO: a probe, and its answer, every ~0.86 s for as long as the peer's
// kernel lives. At 1 this kernel (6.18) aborted the connection at the
// second probe (ETIMEDOUT), answered or not.
func zeroWindowNetns(t *testing.T) string {
	t.Helper()
	name := fmt.Sprintf("hbzwin-%d-%d", os.Getpid(), time.Now().UnixNano()%1e9)
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	run("ip", "netns", "add", name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	run("ip", "-n", name, "link", "set", "lo", "up")
	run("ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv4.tcp_retries2=2")
	return name
}

// TestKeepaliveClosesZeroWindowPeer: a peer whose agent stopped reading
// right after the handshake, its receive buffer a few KiB (SO_RCVBUF
// set on its listener, so before the connection and its window scale),
// while our stream has megabytes to send. Its window is zero a fifth of
// a second in (checkZeroWindowPremise), and from then on its kernel
// answers our kernel's zero-window probes with pure ACKs, every ~0.86 s
// (zeroWindowNetns), acknowledging no new byte: the path and the peer's
// kernel are alive, its agent is stuck. Keepalive takes only
// tcpi_bytes_acked and tcpi_bytes_received for the link's progress
// (linkWatch), neither moves, so it closes the connection PingTimeout
// after the PING, as for a dead peer, and well before the cap
// (maxPingWaitFactor × PingTimeout). A keepalive that took the ACKs
// arriving (tcpi_last_ack_recv) for progress held it to the cap: closed
// with "no PING answer within 20.1s".
//
// What the test asserts is the reason and that its wait is under the
// cap, not how fast; the premise (the window zero, no byte acknowledged
// and an ACK arriving in every stretch a keepalive could call quiet,
// while the PING waited) is checked from TCP_INFO, so that a kernel
// probing on another schedule fails the test instead of passing it
// without telling the two apart.
func TestKeepaliveClosesZeroWindowPeer(t *testing.T) {
	testenv.RequireRoot(t)
	cfg := zeroWindowCfg
	ns := zeroWindowNetns(t)
	in := func(fn func() error) {
		t.Helper()
		if err := testenv.InNetns(ns, fn); err != nil {
			t.Fatal(err)
		}
	}
	ccfg, scfg := testTLS(t)
	var ln net.Listener
	in(func() (err error) {
		lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
			var serr error
			if err := rc.Control(func(fd uintptr) {
				// The kernel doubles it and keeps a floor: ~4 KiB
				// of window, filled by the first segments.
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, 4096)
			}); err != nil {
				return err
			}
			return serr
		}}
		ln, err = lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
		return err
	})
	t.Cleanup(func() { ln.Close() })
	go func() {
		raw, err := ln.Accept()
		if err != nil {
			return
		}
		handRolledServer(t, func(tc *tls.Conn) {
			// Never reads again; closed at the test's end.
		})(raw.(*net.TCPConn), scfg)
	}()
	var raw net.Conn
	in(func() (err error) {
		raw, err = net.Dial("tcp", ln.Addr().String())
		return err
	})
	rc, err := raw.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	c := clientOn(t, raw, ccfg, cfg)

	samples := make(chan []tcpSample, 1)
	go func() { samples <- sampleTCPInfo(c, rc) }()
	maxWait := maxPingWait(cfg.PingTimeout)
	// Generous: the cap, the ticks around it and the close's 1 s write
	// deadline, and as much again. Only a connection never closed
	// reaches it.
	pourUntilClosed(t, c, 2*maxWait, "a peer whose window is zero", 0)
	if t.Failed() {
		return
	}
	m := regexp.MustCompile(`no PING answer within (\S+)$`).FindStringSubmatch(c.Err().Error())
	if m == nil {
		t.Fatalf("closed with %v; want keepalive's timeout naming its wait", c.Err())
	}
	waited, err := time.ParseDuration(m[1])
	if err != nil {
		t.Fatalf("the wait in %q: %v", c.Err(), err)
	}
	if waited >= maxWait {
		t.Errorf("closed with %q: held to the cap (%v) by a peer that acknowledged no byte; want the PING's timeout, %v", c.Err(), maxWait, cfg.PingTimeout)
	}
	ping := c.pingSent.Load()
	if ping == 0 {
		t.Fatal("no PING outstanding at the close")
	}
	// The PING's time, with the monotonic reading the samples' have.
	at := clockBase.Add(time.Duration(ping))
	checkZeroWindowPremise(t, cfg, <-samples, at, at.Add(waited))
	t.Logf("closed: %v", c.Err())
}

// tcpSample is TCP_INFO of our socket as read at at.
type tcpSample struct {
	at      time.Time
	lastAck time.Time // when the last ACK arrived (tcpi_last_ack_recv before at)
	acked   uint64    // tcpi_bytes_acked
	sndWnd  uint32    // tcpi_snd_wnd, the peer's window
}

// sampleTCPInfo reads TCP_INFO of rc every 5 ms until c closes.
func sampleTCPInfo(c *Conn, rc syscall.RawConn) []tcpSample {
	var out []tcpSample
	for {
		select {
		case <-c.Done():
			return out
		case <-time.After(5 * time.Millisecond):
		}
		var info *unix.TCPInfo
		var err error
		if cerr := rc.Control(func(fd uintptr) {
			info, err = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
		}); cerr != nil || err != nil {
			return out
		}
		at := time.Now()
		out = append(out, tcpSample{
			at:      at,
			lastAck: at.Add(-time.Duration(info.Last_ack_recv) * time.Millisecond),
			acked:   info.Bytes_acked,
			sndWnd:  info.Snd_wnd,
		})
	}
}

// checkZeroWindowPremise fails the test unless the peer stalled early
// in the wait of the PING sent at ping (closed at end): its window zero
// by PingTimeout/2 after the PING at the latest and from then on, no
// new byte acknowledged since, and ACKs (the probes' answers) arriving
// all along: no stretch of the wait without one as long as keepalive's
// quiet limit less a tick (keepalive looks at ticks, so an ACK-reading
// one could see the last ACK up to a tick late), so an ACK-reading
// keepalive would not have closed the connection. The PING may leave
// before the window is zero: the last few hundred bytes wait for the
// first probe (the window then smaller than a segment), ~200 ms after
// the pour began, as does a PING at the second tick.
func checkZeroWindowPremise(t *testing.T, cfg Config, samples []tcpSample, ping, end time.Time) {
	t.Helper()
	zero := -1
	for i, s := range samples {
		if s.sndWnd == 0 {
			zero = i
			break
		}
	}
	if zero < 0 || samples[zero].at.After(ping.Add(cfg.PingTimeout/2)) {
		t.Fatalf("premise: the peer's window was not zero by %v after the PING (%d samples)", cfg.PingTimeout/2, len(samples))
	}
	z := samples[zero]
	// The ACK times the samples saw, to the ms (the kernel's unit),
	// the same ACK in later samples folded.
	var acks []time.Time
	for _, s := range samples {
		if s.at.After(end) {
			break
		}
		if !s.at.Before(z.at) && (s.sndWnd != 0 || s.acked != z.acked) {
			t.Fatalf("premise: %v after the PING the peer's window was %d and %d bytes acknowledged (%d when it was first zero, at %v, the PING at 0): its window did not stay zero", s.at.Sub(ping).Round(time.Millisecond), s.sndWnd, s.acked, z.acked, z.at.Sub(ping).Round(time.Millisecond))
		}
		if s.lastAck.After(ping) && (len(acks) == 0 || s.lastAck.Sub(acks[len(acks)-1]) > 20*time.Millisecond) {
			acks = append(acks, s.lastAck)
		}
	}
	sort.Slice(acks, func(i, j int) bool { return acks[i].Before(acks[j]) })
	quiet := cfg.PingTimeout - cfg.PingInterval/2 - cfg.PingInterval
	prev, longest := ping, time.Duration(0)
	for _, a := range append(acks, end) {
		if d := a.Sub(prev); d > longest {
			longest = d
		}
		prev = a
	}
	if len(acks) == 0 || longest >= quiet {
		t.Fatalf("premise: %d ACKs arrived in the %v the PING waited, the longest stretch without one %v (want one at least, and under %v): the kernel's zero-window probes did not come often enough to tell a keepalive reading ACKs from one reading the counters", len(acks), end.Sub(ping).Round(time.Millisecond), longest.Round(time.Millisecond), quiet)
	}
	t.Logf("the PING waited %v; the peer's window zero from %v on (the PING at 0), %d bytes acknowledged from then on; %d ACKs meanwhile, the longest stretch without one %v", end.Sub(ping).Round(time.Millisecond), z.at.Sub(ping).Round(time.Millisecond), z.acked, len(acks), longest.Round(time.Millisecond))
}
