package cniproto

import (
	"context"
	"encoding/json"
	"net"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambit-mesh/ambit/internal/testenv"
)

// FuzzServe is the agent's socket end to end: any datagram, with zero,
// one or two descriptors attached, gets an answer the plugin decodes; the
// handler sees only valid requests, with a netns exactly when the op and
// version carry one; and no descriptor outlives the exchange (the handler
// here closes what it gets, as the agent's does when it is done).
func FuzzServe(f *testing.F) {
	type call struct {
		req   *Request
		netns bool
	}
	calls := make(chan call, 1)
	path := serve(f, func(ctx context.Context, req *Request, netns *os.File) *Response {
		calls <- call{req, netns != nil}
		if netns != nil {
			netns.Close()
		}
		return &Response{Decision: Skip}
	})
	ns, err := os.Open("/proc/self/ns/net")
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { ns.Close() })

	good, _ := json.Marshal(goodRequest())
	for _, s := range []string{string(good),
		`{"version":1,"op":"gc","valid":[{"containerID":"c","ifName":"eth0"}]}`,
		`{"version":2,"op":"del","pod":{"namespace":"a","name":"b","containerID":"c"}}`,
		`{"version":1,"op":"del","pod":{"namespace":"a","name":"b","containerID":"c"}}`,
		`{"version":2,"op":"check","pod":{"namespace":"a","name":"b","containerID":"c","netns":"/x","ifName":"eth0"}}`,
		`{"version":3,"op":"gc","network":"net-b","valid":[{"containerID":"c","ifName":"net1"}]}`,
		`{"version":3,"op":"del","network":"k8s-pod-network","pod":{"namespace":"a","name":"b","containerID":"c"}}`,
		`{"version":2,"op":"gc","network":"net-b"}`,
		`{"version":9,"op":"add"}`, `{"op":1}`, `not json`, `{}`, ` `} {
		for n := uint8(0); n < 3; n++ {
			f.Add([]byte(s), n)
		}
	}
	f.Fuzz(func(t *testing.T, b []byte, nfds uint8) {
		if len(b) == 0 || len(b) > MaxMessageSize+1 {
			t.Skip("an empty datagram reads as end of stream; sizes are large_test.go's")
		}
		before := testenv.OpenFDs(t)
		var fds []int
		for i := 0; i < int(nfds%3); i++ {
			fd, err := unix.FcntlInt(ns.Fd(), unix.F_DUPFD_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			fds = append(fds, fd)
		}
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
		_, _, err = c.WriteMsgUnix(b, oob, nil)
		for _, fd := range fds {
			unix.Close(fd)
		}
		if err != nil {
			t.Fatalf("send: %v", err)
		}
		buf := make([]byte, MaxMessageSize+1)
		n, err := c.Read(buf)
		if err != nil {
			t.Fatalf("no answer to %.80q: %v", b, err)
		}
		resp, err := DecodeResponse(buf[:n])
		if err != nil {
			t.Fatalf("answer %q to %.80q: %v", buf[:n], b, err)
		}
		c.Close()

		var got *call
		select {
		case cl := <-calls:
			got = &cl
		default:
		}
		req, derr := DecodeRequest(b)
		switch {
		case got == nil:
			if resp.Error == "" {
				t.Fatalf("%.80q with %d fds: no handler call, yet no error: %+v", b, len(fds), resp)
			}
		case derr != nil:
			t.Fatalf("handler called with %+v for %.80q, which does not decode: %v", got.req, b, derr)
		default:
			if len(fds) > 1 {
				t.Fatalf("handler called for a request with %d fds", len(fds))
			}
			wantNetns := len(fds) == 1 && (req.Op == OpAdd || req.Op == OpCheck || req.Op == OpDel && req.Version >= 2)
			if got.netns != wantNetns {
				t.Fatalf("%s v%d with %d fds reached the handler with netns=%v", req.Op, req.Version, len(fds), got.netns)
			}
			if (req.Op == OpAdd || req.Op == OpCheck) && len(fds) == 0 {
				t.Fatalf("%s without a netns reached the handler", req.Op)
			}
			if resp.Error != "" || resp.Decision != Skip {
				t.Fatalf("handler's answer came back as %+v", resp)
			}
		}
		// The server closes its end after answering: give it a moment.
		deadline := time.Now().Add(2 * time.Second)
		for testenv.OpenFDs(t) != before {
			if time.Now().After(deadline) {
				t.Fatalf("%d descriptors open before %.80q with %d fds, %d after", before, b, len(fds), testenv.OpenFDs(t))
			}
			time.Sleep(time.Millisecond)
		}
	})
}
