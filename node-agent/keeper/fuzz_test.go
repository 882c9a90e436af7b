package keeper

import (
	"encoding/json"
	"math"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambit-mesh/ambit/internal/testenv"
)

// rawCall sends one datagram with fds attached and returns the answer
// (nil when the keeper closed without one).
func rawCall(t *testing.T, path string, b []byte, fds []int) []byte {
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	if _, _, err := c.WriteMsgUnix(b, oob, nil); err != nil {
		t.Fatalf("send: %v", err)
	}
	buf := make([]byte, maxMsgSize)
	n, err := c.Read(buf)
	if err != nil {
		if strings.Contains(err.Error(), "timeout") {
			t.Fatalf("no answer to %.80q", b)
		}
		return nil
	}
	return buf[:n]
}

// FuzzServe: any datagram, with none, a listening, a non-listening or too
// many sockets attached, gets a JSON answer (an error unless it was a
// well-formed request), and once everything is pruned the keeper holds no
// descriptor: a malformed request never leaks the sockets it carried.
func FuzzServe(f *testing.F) {
	path := startKeeper(f)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { ln.Close() })
	lnFile, err := ln.(*net.TCPListener).File()
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { lnFile.Close() })
	udp, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { udp.Close() })
	udpFile, err := udp.(*net.UDPConn).File()
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { udpFile.Close() })
	pruneAll, _ := json.Marshal(request{Op: opPrune, Gen: math.MaxUint64})

	for _, s := range []string{`{"op":"begin"}`, `{"op":"put","key":"c1","gen":5}`, `{"op":"put","key":"","gen":5}`,
		`{"op":"drop","key":"c1"}`, `{"op":"prune","gen":7}`, `{"op":"count"}`, `{"op":"x"}`, `{"op":1}`, `not json`, `{}`} {
		for sel := uint8(0); sel < 4; sel++ {
			f.Add([]byte(s), sel)
		}
	}
	f.Add([]byte(`{"op":"put","key":"`+strings.Repeat("k", maxKeyLen+1)+`","gen":1}`), uint8(1))
	f.Add([]byte(strings.Repeat(" ", maxMsgSize)+`{"op":"count"}`), uint8(1))
	f.Fuzz(func(t *testing.T, b []byte, sel uint8) {
		if len(b) == 0 || len(b) > 64<<10 {
			t.Skip("an empty datagram reads as end of stream; larger ones only test the kernel")
		}
		before := testenv.OpenFDs(t)
		var src *os.File
		n := 0
		switch sel % 4 {
		case 1:
			src, n = lnFile, 1
		case 2:
			src, n = udpFile, 1
		case 3:
			src, n = lnFile, maxFDs+1
		}
		var fds []int
		for i := 0; i < n; i++ {
			fd, err := unix.FcntlInt(src.Fd(), unix.F_DUPFD_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			fds = append(fds, fd)
		}
		answer := rawCall(t, path, b, fds)
		closeFDs(fds)
		var r response
		if err := json.Unmarshal(answer, &r); err != nil {
			t.Fatalf("answer %q to %.80q: %v", answer, b, err)
		}
		var req request
		if json.Unmarshal(b, &req) != nil {
			if r.Error == "" {
				t.Fatalf("malformed request %.80q answered %+v", b, r)
			}
		} else if req.Op == opPut && r.Error == "" && (req.Key == "" || req.Gen == 0 || n != 1 || src != lnFile) {
			t.Fatalf("put %q with %d sockets accepted: %+v", b, n, r)
		}
		if r := rawCall(t, path, pruneAll, nil); r == nil || strings.Contains(string(r), "error") {
			t.Fatalf("prune: %q", r)
		}
		// The keeper closes its end of a connection after answering: give
		// it a moment before counting. Fewer than before is no leak: an
		// earlier test's keeper may close what it kept meanwhile (its
		// expiry runs on a timer in this same process).
		deadline := time.Now().Add(2 * time.Second)
		for testenv.OpenFDs(t) > before {
			if time.Now().After(deadline) {
				t.Fatalf("%d descriptors open before %.80q, %d after", before, b, testenv.OpenFDs(t))
			}
			time.Sleep(time.Millisecond)
		}
	})
}
