package agent

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/config"
)

// TestLateDelCompletesRuntimeTeardown: the runtime's view (libcni and
// the real ambit-cni) of a DEL that waits on its pod's lock, held by
// another operation, when its request ends: at its deadline, or because
// the agent is told to stop. The agent finishes such a DEL in the
// background (detachable), so the runtime must see it succeed, as the
// plugin takes a DEL it got no answer to. libcni stops a chain's DEL at
// the first plugin that fails, and ambit-cni, chained last, is asked
// first: a failure there leaves the bridge's veth and the pod's IP with
// host-local, and the kubelet retries the teardown (the pod stays
// Terminating, a FailedKillPod event) for a DEL the agent does anyway.
//
// At the deadline the answer could never fail the DEL (the connection's
// write deadline is the request's: the plugin saw no answer). At a stop
// it did: the agent answered a retryable error ("not done by the
// request's deadline; it goes on in the background") and libcni's DEL
// failed with it.
func TestLateDelCompletesRuntimeTeardown(t *testing.T) {
	testenv.RequireRoot(t)
	cni := testenv.Binary(t, "ambit-cni")
	set := testenv.PluginSets(t)[0]
	h := startAgent(t, "", invAmbient, func(o *Options) {
		o.Config.RequestTimeout = config.Duration{Duration: 2 * time.Second}
	})
	node := labNode(t, h, set, cni, netip.MustParsePrefix("10.81.7.0/24"))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	web, err := node.AddPod(ctx, "apps", "web")
	if err != nil {
		t.Fatal(err)
	}
	db, err := node.AddPod(ctx, "apps", "db")
	if err != nil {
		t.Fatal(err)
	}
	if h.tun.Live() != 2 {
		t.Fatalf("agent serves %d pods after ADD, want 2", h.tun.Live())
	}

	// Another operation holds the lock of web's stripe (a slow ADD of
	// a new sandbox, a rule repair waiting on the xtables lock).
	unlock := holdLock(t, h.a, "apps", "web")
	start := time.Now()
	if err := web.Delete(ctx); err != nil {
		t.Fatalf("CNI DEL past the request's deadline: %v", err)
	}
	t.Logf("CNI DEL past the deadline answered after %v", time.Since(start).Round(time.Millisecond))
	unlock()
	eventually(t, "the detached DEL to release the pod", func() bool { return h.tun.Live() == 1 && h.a.podByName("apps/web") == nil })

	// The same at a stop: the DEL of db waits on its lock when the
	// agent is told to stop.
	unlock = holdLock(t, h.a, "apps", "db")
	deleted := make(chan error, 1)
	go func() { deleted <- db.Delete(ctx) }()
	eventually(t, "the DEL to wait on the lock", func() bool {
		h.a.live.mu.Lock()
		defer h.a.live.mu.Unlock()
		return len(h.a.live.inflight) == 1
	})
	stopped := make(chan struct{})
	go func() { h.stop(); close(stopped) }()
	select {
	case err := <-deleted:
		if err != nil {
			t.Fatalf("CNI DEL in flight when the agent stops: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("CNI DEL not answered")
	}
	select {
	case <-stopped:
		t.Fatal("the stop went on before the DEL it goes on with")
	case <-time.After(200 * time.Millisecond):
	}
	unlock()
	<-stopped
	if recs, _ := h.a.store.List(); len(recs) != 0 {
		t.Fatalf("records left after the DELs: %+v", recs)
	}
}
