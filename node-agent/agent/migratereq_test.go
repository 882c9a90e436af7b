package agent

import (
	"testing"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/state"
)

// TestMigrateReqFollowsTheNamespace: the record's migrateReq flag says
// net.ipv4.tcp_migrate_req is set in the namespace the record names. When
// re-adoption finds the pod in another namespace (the recorded one is
// gone, the scan finds the pod's IP elsewhere: its sandbox was recreated
// while no agent ran), the flag said nothing about that one, and the
// sysctl must be written there. The flag used to travel with the record,
// and the new namespace kept tcp_migrate_req=0.
func TestMigrateReqFollowsTheNamespace(t *testing.T) {
	testenv.RequireRoot(t)
	dir := t.TempDir()
	h := startAgent(t, dir, invAmbient)
	old := newNetns(t, "10.63.29.2/24")
	enrollLikePlugin(t, h, "web", old, "10.63.29.2/24")
	if got := migrateReq(t, old); got != "1" {
		t.Fatalf("after enrollment tcp_migrate_req = %s, want 1", got)
	}
	h.stop()
	run(t, "ip", "netns", "delete", old.name)
	neu := newNetns(t, "10.63.29.2/24")
	if got := migrateReq(t, neu); got != "0" {
		t.Fatalf("a new namespace has tcp_migrate_req = %s, want the default 0", got)
	}
	h = startAgent(t, dir, invAmbient)
	<-h.a.Ready()
	store, err := state.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	recs, errs := store.List()
	if len(errs) > 0 || len(recs) != 1 || recs[0].Netns != neu.path {
		t.Fatalf("records after re-adoption: %+v %v (want one, moved to %s)", recs, errs, neu.path)
	}
	if got := migrateReq(t, neu); got != "1" {
		t.Fatalf("re-adopted into a new namespace: tcp_migrate_req = %s there, want 1 (record: migrateReq=%v)", got, recs[0].MigrateReq)
	}
}
