// Package cniprototest runs stand-in agents for tests of ambit-cni and of
// its protocol: a unix SOCK_SEQPACKET listener whose every connection is
// handed to a function. It does not import cniproto, so cniproto's own
// tests can use it.
package cniprototest

import (
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
