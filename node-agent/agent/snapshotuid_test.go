package agent

import (
	"context"
	"net"
	"net/netip"
	"testing"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/admin"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

// TestStatusFailureIsThePodsOwn: a pod whose ADD failed is deleted and a
// pod of the same name comes back (a StatefulSet's web-0) with another
// UID: until its own ADD says otherwise, status shows it pending, not
// failed with its predecessor's reason (a fixed manifest would look
// broken still). The failure itself is shown while it is the pod's.
func TestStatusFailureIsThePodsOwn(t *testing.T) {
	testenv.RequireRoot(t)
	h := startAgent(t, "", invAmbient)
	n := newNetns(t, "10.94.0.2/24")
	var hold net.Listener
	inNetns(t, n, func() (err error) { hold, err = net.Listen("tcp", "0.0.0.0:15006"); return err })
	defer hold.Close()
	if resp, err := h.call(cniproto.OpAdd, "apps", "db-0", "cid-db-0", n, "10.94.0.2/24"); err != nil || resp.Error == "" {
		t.Fatalf("ADD of a pod holding 15006: %+v %v, want an error", resp, err)
	}
	find := func() *admin.Pod {
		for _, p := range h.a.AdminPods(context.Background()) {
			if p.Namespace == "apps" && p.Name == "db-0" {
				return &p
			}
		}
		return nil
	}
	if p := find(); p == nil || p.State != admin.StateFailed || p.Reason != eventPortInUse {
		t.Fatalf("after the failed ADD: %+v, want failed (%s)", p, eventPortInUse)
	}
	// The pod is deleted (kubelet's DEL of its sandbox), and the
	// controller makes it again: the cluster view has the new UID, and
	// no ADD of it reached the agent yet.
	if resp, err := h.call(cniproto.OpDel, "apps", "db-0", "cid-db-0", nil); err != nil || resp.Error != "" {
		t.Fatalf("DEL: %+v %v", resp, err)
	}
	h.inv.Learn("apps", "db-0", "uid-db-0-second", []netip.Addr{netip.MustParseAddr("10.94.0.77")})
	p := find()
	if p == nil || p.State == admin.StateFailed {
		t.Fatalf("the new db-0 (another UID, no ADD yet): %+v, want pending, not its predecessor's failure", p)
	}
	if p.State != admin.StatePending || p.UID != "uid-db-0-second" {
		t.Fatalf("the new db-0: %+v, want pending with its own UID", p)
	}
}
