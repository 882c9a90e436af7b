package agent

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

// invFound lists apps/web with its IP and UID, so the agent enrolls the
// running pod it finds without ever seeing its ADD (live enrollment, the
// "found:" path, as after an agent outage).
const invFound = `namespaces:
  - name: apps
    labels: {ambit.dev/dataplane-mode: ambient}
workloads:
  - namespace: apps
    name: web
    uid: uid-web
    serviceAccount: web-sa
    ips: [10.73.0.2]
`

// delReq sends a DEL of apps/web for container cid naming netns path,
// with f as the netns it brings (nil: none, the namespace is gone).
func delReq(t *testing.T, h *harness, cid, path string, f *os.File) {
	t.Helper()
	req := &cniproto.Request{Version: cniproto.Version, Op: cniproto.OpDel, Pod: cniproto.Pod{Namespace: "apps", Name: "web", UID: "uid-web", ContainerID: cid, Netns: path}}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := cniproto.Call(ctx, h.sock, req, f)
	if err != nil || resp.Error != "" {
		t.Fatalf("DEL %s: %+v %v", cid, resp, err)
	}
}

// served returns the sandbox of apps/web the agent serves, nil if none;
// read under the pod's lock, which a DEL holds while it releases.
func served(h *harness) *pod {
	unlock := h.a.lock("apps", "web")
	defer unlock()
	if p := h.a.podByName("apps/web"); p != nil && p.enrolled() {
		return p
	}
	return nil
}

// waitFound waits until the agent serves apps/web as a sandbox it found.
func waitFound(t *testing.T, h *harness) *pod {
	t.Helper()
	var p *pod
	eventually(t, "apps/web enrolled live", func() bool {
		p = served(h)
		return p != nil && strings.HasPrefix(p.rec.ContainerID, foundPrefix)
	})
	return p
}

// dialIn connects from inside n and returns the first line read. Unlike
// dialFrom, its thread goes back to the host netns: a locked goroutine
// that ends on the main thread leaves that thread parked in n, and
// /proc/self/ns/net (which the netns scan skips as the agent's own)
// would then be n, so live enrollment could no longer find the pod.
func dialIn(n *testNetns, addr string) (string, error) {
	type result struct {
		c   net.Conn
		err error
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			done <- result{err: err}
			return // thread left locked: it ends with the goroutine
		}
		defer orig.Close()
		if err := netns.Set(netns.NsHandle(n.file.Fd())); err != nil {
			done <- result{err: err}
			return
		}
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
		done <- result{c, err}
	}()
	r := <-done
	if r.err != nil {
		return "", r.err
	}
	defer r.c.Close()
	r.c.SetReadDeadline(time.Now().Add(3 * time.Second))
	line, err := bufio.NewReader(r.c).ReadString('\n')
	return strings.TrimSpace(line), err
}

func listenersAnswer(t *testing.T, n *testNetns) error {
	t.Helper()
	for _, port := range []string{"15001", "15006", "15008"} {
		line, err := dialIn(n, "127.0.0.1:"+port)
		if err != nil {
			return err
		}
		if line != "captured:"+port {
			return fmt.Errorf("port %s answered %q", port, line)
		}
	}
	return nil
}

// A pod's new sandbox was enrolled live while the DEL of its old sandbox,
// already gone, was still to come. That DEL used to release the new
// sandbox (matched by pod name alone): its rules stayed and its
// listeners closed, so all its traffic was refused. A DEL that does not
// show it is about the found sandbox (no netns, another netns path,
// another netns) now leaves it served; one that does still releases it.
func TestDelOfGoneSandboxKeepsFoundSandbox(t *testing.T) {
	testenv.RequireRoot(t)
	n := newNetns(t, "10.73.0.2/24")
	h := startAgent(t, "", invFound)
	p := waitFound(t, h)
	if err := listenersAnswer(t, n); err != nil {
		t.Fatalf("found sandbox's listeners: %v", err)
	}
	old := newNetns(t) // an older sandbox whose netns still exists
	delReq(t, h, "cid-gone", "", nil)
	delReq(t, h, "cid-gone-path", "/var/run/netns/amb-agt-gone-"+suffix(), nil)
	delReq(t, h, "cid-old", old.path, old.file)
	if q := served(h); q != p {
		t.Fatalf("after DELs of older sandboxes apps/web is served by %v, want the found sandbox", q)
	}
	if got := h.tun.Live(); got != 1 {
		t.Fatalf("%d servings after DELs of older sandboxes, want 1", got)
	}
	if err := listenersAnswer(t, n); err != nil {
		t.Fatalf("found sandbox's listeners after DELs of older sandboxes: %v", err)
	}
	if err := (Rules{}).Verify(context.Background(), n.file, *p.specCopy()); err != nil {
		t.Fatalf("found sandbox's rules after DELs of older sandboxes: %v", err)
	}

	// Its own DEL, netns bind mount already removed (no fd), the path
	// spelt through /run: released.
	delReq(t, h, "cid-real", "/run/netns/"+n.name, nil)
	if served(h) != nil {
		t.Fatalf("after its own DEL (path only) apps/web is still served")
	}
	eventually(t, "listeners closed after its own DEL", func() bool { return h.tun.Live() == 0 })

	// Found again; its own DEL bringing the netns: released, rules gone.
	h.a.Resync()
	waitFound(t, h)
	delReq(t, h, "cid-real", n.path, n.file)
	if served(h) != nil {
		t.Fatalf("after its own DEL (with the netns) apps/web is still served")
	}
	eventually(t, "listeners closed after its own DEL", func() bool { return h.tun.Live() == 0 })
	if _, err := dialIn(n, "127.0.0.1:15001"); err == nil {
		t.Fatal("listener still open after the sandbox's DEL")
	}
	if got := installed(t, n); len(got) != 0 {
		t.Fatalf("redirection left after the sandbox's DEL: %v", got)
	}
}

// A DEL of a sandbox the agent never knew, while a newer sandbox of the
// pod is enrolled, used to make the static inventory forget the IPs it
// learned at the newer one's ADD.
func TestDelOfUnknownSandboxKeepsLearnedIPs(t *testing.T) {
	testenv.RequireRoot(t)
	h := startAgent(t, "", invAmbient)
	n := newNetns(t, "10.73.1.2/24")
	if resp, err := h.call(cniproto.OpAdd, "apps", "web", "cid-new", n, "10.73.1.2/24"); err != nil || resp.Decision != cniproto.Enroll {
		t.Fatalf("ADD: %+v %v", resp, err)
	}
	delReq(t, h, "cid-gone", "", nil)
	cp, ok, _ := h.inv.Pod(context.Background(), "apps", "web")
	if want := netip.MustParseAddr("10.73.1.2"); !ok || len(cp.IPs) != 1 || cp.IPs[0] != want {
		t.Fatalf("inventory's apps/web after a DEL of an unknown sandbox: %v %v, want IPs [%v]", ok, cp.IPs, want)
	}
	if err := listenersAnswer(t, n); err != nil {
		t.Fatalf("newer sandbox's listeners: %v", err)
	}
}
