package testenv

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"io"
	"net"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestServeInNetns: the app answers inside the named netns, greets each
// connection, echoes with Echo and, with Drain, takes everything sent
// without answering it, closing once the sender is done.
func TestServeInNetns(t *testing.T) {
	RequireRoot(t)
	b := make([]byte, 4)
	rand.Read(b)
	name := "amb-tenv-" + hex.EncodeToString(b)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	if out, err := exec.Command("ip", "-n", name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("lo up: %v: %s", err, out)
	}
	ServeInNetns(t, name, "127.0.0.1:8080", "echo-app", Echo)
	ServeInNetns(t, name, "127.0.0.1:8081", "drain-app", Drain)

	c := dialInNetns(t, name, "127.0.0.1:8080")
	r := bufio.NewReader(c)
	if got, err := r.ReadString('\n'); err != nil || got != "echo-app\n" {
		t.Fatalf("greeting: %q, %v; want \"echo-app\\n\"", got, err)
	}
	c.Write([]byte("ping\n"))
	if got, err := r.ReadString('\n'); err != nil || got != "ping\n" {
		t.Fatalf("echo: %q, %v; want \"ping\\n\"", got, err)
	}
	c.Close()

	d := dialInNetns(t, name, "127.0.0.1:8081")
	// More than the socket buffers hold: only a reader on the other side
	// lets the write finish.
	if _, err := d.Write(bytes.Repeat([]byte("x"), 16<<20)); err != nil {
		t.Fatalf("writing to the draining app: %v", err)
	}
	d.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(d)
	if err != nil || string(got) != "drain-app\n" {
		t.Fatalf("drain: read %q, %v; want only the greeting, then EOF", got, err)
	}
	d.Close()
}

// TestServeInNetnsMissing: a netns that does not exist is an error that
// names it, not a listener in the test's own netns.
func TestServeInNetnsMissing(t *testing.T) {
	RequireRoot(t)
	l, err := listenInNetns("amb-tenv-missing", "127.0.0.1:0")
	if err == nil {
		l.Close()
		t.Fatal("listened for a netns that does not exist")
	}
	if !strings.Contains(err.Error(), "amb-tenv-missing") {
		t.Fatalf("error does not name the netns: %v", err)
	}
}

func dialInNetns(t *testing.T, name, addr string) net.Conn {
	t.Helper()
	var c net.Conn
	if err := InNetns(name, func() (err error) {
		c, err = net.DialTimeout("tcp", addr, 5*time.Second)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}
