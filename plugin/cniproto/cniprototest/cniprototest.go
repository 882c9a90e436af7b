// Package cniprototest runs stand-in agents for tests of ambit-cni and of
// its protocol: a unix SOCK_SEQPACKET listener whose every connection is
// handed to a function. It does not import cniproto, so cniproto's own
// tests can use it.
package cniprototest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"testing"

	"golang.org/x/sys/unix"
)

// Serve listens at path and calls handle with each accepted connection,
// closing it afterwards, until the test ends.
func Serve(t testing.TB, path string, handle func(c *net.UnixConn)) {
	t.Helper()
	l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.AcceptUnix()
			if err != nil {
				return
			}
			handle(c)
			c.Close()
		}
	}()
}

// OldAgent answers like an agent from before gc requests could exceed
// 64 KiB: one fixed 64 KiB+1 buffer, a truncated request refused with the
// error text those agents sent, anything else answered "skip".
func OldAgent(c *net.UnixConn) {
	buf := make([]byte, 64<<10+1)
	oob := make([]byte, unix.CmsgSpace(4*4))
	_, _, flags, _, err := c.ReadMsgUnix(buf, oob)
	answer := `{"version":1,"decision":"skip"}`
	if err == nil && flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
		answer = `{"version":1,"error":"request exceeds 65536 bytes or carries too much control data"}`
	}
	c.Write([]byte(answer))
}

// Version2Agent returns a stand-in for an agent of protocol version 2
// (before requests named the CNI network): it decodes each request as
// those agents did (strictly, versions 1 to 2), refuses any other in its
// own version with their error text, and answers the rest "skip" in the
// request's version. seen, if set, gets each request it accepted.
func Version2Agent(seen func(version int, op string, raw []byte)) func(c *net.UnixConn) {
	return func(c *net.UnixConn) {
		msg, err := ReadRequest(c)
		if err != nil {
			return
		}
		var req struct {
			Version     int             `json:"version"`
			Op          string          `json:"op"`
			Pod         json.RawMessage `json:"pod"`
			Valid       json.RawMessage `json:"valid,omitempty"`
			RuleBackend string          `json:"ruleBackend,omitempty"`
		}
		d := json.NewDecoder(bytes.NewReader(msg))
		d.DisallowUnknownFields()
		var answer any
		switch err := d.Decode(&req); {
		case err != nil:
			answer = map[string]any{"version": 2, "error": "malformed request: " + err.Error()}
		case req.Version < 1 || req.Version > 2:
			answer = map[string]any{"version": 2, "error": fmt.Sprintf("protocol version %d not supported (this side speaks 1 to 2): upgrade ambit-cni and ambit-agent together", req.Version)}
		default:
			if seen != nil {
				seen(req.Version, req.Op, msg)
			}
			answer = map[string]any{"version": req.Version, "decision": "skip"}
		}
		b, _ := json.Marshal(answer)
		c.Write(b)
	}
}

// ReadRequest reads one request datagram from c, as an agent does (up to
// 1 MiB, the gc bound), and closes the descriptors it carried (the pod's
// netns): a stand-in keeps none.
func ReadRequest(c *net.UnixConn) ([]byte, error) {
	buf := make([]byte, 1<<20+1)
	oob := make([]byte, unix.CmsgSpace(4*4))
	n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
	if err != nil {
		return nil, err
	}
	if msgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
		for _, m := range msgs {
			fds, _ := unix.ParseUnixRights(&m)
			for _, fd := range fds {
				unix.Close(fd)
			}
		}
	}
	return buf[:n], nil
}
