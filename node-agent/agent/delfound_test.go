package agent

import (
	"context"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/e2e/lab"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

// TestDelResetsFoundSandboxFirst: a sandbox the agent found by live
// enrollment (a "found:" record, its container ID unknown until its DEL)
// gets its DEL through the chain while its app holds a captured
// connection. The app must learn at once, as for a sandbox known since
// its ADD: its connections are reset while the rules still translate
// them. Before, the early reset looked up the DEL's container ID only,
// the found sandbox was reset after its rules were gone, the reset of
// the app's connection left from 127.0.0.1:15001 untranslated, and the
// app never learned.
func TestDelResetsFoundSandboxFirst(t *testing.T) {
	d := newDelNode(t, "10.98.4.0/24")
	anchor, _ := d.add(t, "anchor")
	web, _ := d.add(t, "web")

	// The agent loses web's record, as if it had never seen its ADD (a GC
	// whose list misses it; web's rules stay), and finds web again by
	// its IP.
	gc := &cniproto.Request{Version: cniproto.Version, Op: cniproto.OpGC,
		Valid: []cniproto.Attachment{{ContainerID: anchor.ContainerID, IfName: "eth0"}}}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if resp, err := cniproto.Call(ctx, d.h.sock, gc, nil); err != nil || resp.Error != "" {
		t.Fatalf("GC: %+v %v", resp, err)
	}
	d.h.writeInventory(invAmbient + fmt.Sprintf("    uid: %s\n    ips: [%v]\n  - namespace: apps\n    name: anchor\n    uid: %s\n    ips: [%v]\n",
		web.UID, web.IP, anchor.UID, anchor.IP))
	if err := d.h.inv.Reload(); err != nil {
		t.Fatal(err)
	}
	d.h.a.Resync()
	waitFound(t, d.h)
	c := held(t, web, anchor.IP)

	d.del(t, web)
	endsSoon(t, c, "the found sandbox's app connection")
	noSocketsSoon(t, web, netip.Addr{}, "the found sandbox's connections outlived its DEL")
}

// TestReAddDrainCutByDel: a second ADD of a served sandbox's container ID
// that brings another netns (the runtime made its namespace again)
// serves the sandbox anew and drains the old serving, whose app
// connection lives on. The DEL of that container ID must cut that drain
// too: the pod's network is going. Before, the drain stayed with the
// pod the ADD replaced, out of the DEL's reach, and ran on for
// drainTimeout past the removal of the pod's interface.
func TestReAddDrainCutByDel(t *testing.T) {
	d := newDelNode(t, "10.98.5.0/24")
	anchor, web, c := d.anchored(t, "web")

	again := newNetns(t, "10.98.5.200/32")
	req := &cniproto.Request{Version: cniproto.Version, Op: cniproto.OpAdd, Pod: cniproto.Pod{
		Namespace: "apps", Name: "web", UID: web.UID, ContainerID: web.ContainerID, IfName: "eth0",
		Netns: again.path, IPs: []netip.Prefix{netip.MustParsePrefix("10.98.5.200/32")}}}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if resp, err := cniproto.Call(ctx, d.h.sock, req, again.file); err != nil || resp.Error != "" || resp.Decision != cniproto.Enroll {
		t.Fatalf("second ADD of web's container ID: %+v %v", resp, err)
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := lab.AskOn(c, "drained"); err != nil {
		t.Fatalf("web's connection after the second ADD: %v (cut, not drained)", err)
	}

	d.del(t, web)
	noSocketsSoon(t, anchor, web.IP, "the resident pod still holds its end of web's drained connection")
	noSocketsSoon(t, web, netip.Addr{}, "web's drained connections outlived its DEL")
	endsSoon(t, c, "web's app connection drained by the agent")
}
