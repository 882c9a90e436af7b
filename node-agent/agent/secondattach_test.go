package agent

import (
	"net/netip"
	"testing"

	"github.com/ambit-mesh/ambit/internal/testenv"
)

// TestSecondAttachmentOfAnUnservedSandboxKeepsTheRecord: the usual way a
// pod joins the mesh is a label on its running namespace (live
// enrollment); at its ADD it was not enrolled, and its record, kept to
// find it fast, says so. A Multus pod's second attachment (net1, same
// chain, same container ID) then brings its ADD and CHECK. They must not
// make the record net1's: labelled later, the pod is served by that
// record, and the DEL of net1 (hot-unplugged) then released the whole
// sandbox while eth0 ran on, its traffic uncaptured and its annotation
// "enabled"; a restarted agent re-adopting the record also learned
// net1's address as the pod's in place of eth0's.
func TestSecondAttachmentOfAnUnservedSandboxKeepsTheRecord(t *testing.T) {
	testenv.RequireRoot(t)
	h := startAgent(t, "", invPlain)
	n, eth0, net1 := twoAttachments(t, h, "10.81.7.0/24")
	if err := n.check(net1); err != nil {
		t.Fatalf("CHECK of the second attachment: %v", err)
	}
	ip0 := netip.MustParsePrefix(eth0.res.IPs[0].Address.String()).Addr()
	unlock := h.a.lock("apps", "multi")
	if q := h.a.podByName("apps/multi"); q == nil {
		t.Errorf("apps/multi has no record after its ADDs")
	} else if q.rec.IfName != "eth0" || len(q.rec.IPs) != 1 || q.rec.IPs[0] != ip0 {
		t.Errorf("record after net1's ADD and CHECK: interface %q, IPs %v; want eth0's, [%s]", q.rec.IfName, q.rec.IPs, ip0)
	}
	unlock()

	h.writeInventory(invAmbient)
	if err := h.inv.Reload(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "apps/multi served once its namespace is labelled", func() bool {
		unlock := h.a.lock("apps", "multi")
		defer unlock()
		q := h.a.podByName("apps/multi")
		return q != nil && q.enrolled()
	})
	if err := n.del(net1); err != nil {
		t.Fatalf("DEL of the second attachment: %v", err)
	}
	servedWithRules(t, h, "apps/multi", eth0)
	if _, line, err := dialFrom(t, eth0.ns, n.gw4.String()+":9"); err != nil || line != "captured:15001" {
		t.Fatalf("outbound after the DEL of net1: %q %v, want captured", line, err)
	}
	if err := n.del(eth0); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the pod released after the DEL of eth0", func() bool { return h.a.podByName("apps/multi") == nil && h.tun.Live() == 0 })
}
