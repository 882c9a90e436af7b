package agent

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/prometheus/client_golang/prometheus/testutil"

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

// TestLockWaitAnsweredToRuntime: an ADD that gives up waiting for its
// pod's lock at the request's deadline must reach the runtime as what it
// is: retryable ("try again later", code 11), naming the lock. Its
// answer used to be written at the very deadline the server set on the
// connection, so it never got through: libcni reported ambit-cni's
// protocol error 101, "ambit-agent ... closed the connection without
// answering", which reads as an agent crash, and the agent counted a
// malformed exchange ("writing answer: i/o timeout"). The same for a
// DEL finished in the background: its answer now reaches the plugin.
func TestLockWaitAnsweredToRuntime(t *testing.T) {
	testenv.RequireRoot(t)
	cni := testenv.Binary(t, "ambit-cni")
	set := testenv.PluginSets(t)[0]
	h := startAgent(t, "", invAmbient, func(o *Options) {
		o.Config.RequestTimeout = config.Duration{Duration: time.Second}
	})
	node := labNode(t, h, set, cni, netip.MustParsePrefix("10.81.9.0/24"))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	db, err := node.AddPod(ctx, "apps", "db")
	if err != nil {
		t.Fatal(err)
	}
	unlock := holdLock(t, h.a, "apps", "web")
	_, err = node.AddPod(ctx, "apps", "web")
	var cerr *types.Error
	if !errors.As(err, &cerr) || cerr.Code != types.ErrTryAgainLater || !strings.Contains(cerr.Msg, "its lock is held") {
		t.Fatalf("CNI ADD while the pod's lock is held past the deadline: %v, want code %d naming the lock", err, types.ErrTryAgainLater)
	}
	unlock()
	unlock = holdLock(t, h.a, "apps", "db")
	if err := db.Delete(ctx); err != nil {
		t.Fatalf("CNI DEL past the deadline: %v", err)
	}
	unlock()
	if v := testutil.ToFloat64(h.a.m.requests.WithLabelValues("unknown", "malformed")); v != 0 {
		t.Errorf("%v exchanges failed (answers written past the connection's deadline)", v)
	}
	if v := testutil.ToFloat64(h.a.m.failures.WithLabelValues("lock-wait")); v != 1 {
		t.Errorf("enrollment failures for lock-wait: %v, want 1", v)
	}
}
