package agent

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
)

// TestShutdownNotHeldUpByAnotherPodsLock: the shutdown detaches each
// pod under its lock, which a forget still at work in the background
// (an eviction, a superseded sandbox, its rule removal waiting on the
// xtables lock) may hold a while. Pods one after another, the first
// pod found locked held up every pod after it in the map's order: their
// listeners stayed open (taking a share of the new connections an
// agent serving beside should get) and their drain got what was left
// of drainTimeout, if any.
// Half of the pods' locks are held here; every other pod must be let
// go meanwhile. (The order is the map's: without the fix a run passes
// only with every held pod after every other one.) shutdown is called
// itself, not through Run's end: Run first waits for its loops, which a
// record pass or reconcile waiting on a held lock would hold up.
func TestShutdownNotHeldUpByAnotherPodsLock(t *testing.T) {
	testenv.RequireRoot(t)
	h := startAgent(t, "", invAmbient)
	const n = 12
	enrollPods(t, h, n, "10.89.22")
	held := map[*sync.Mutex]bool{}
	for i := 0; i < n; i += 2 {
		held[h.a.stripe("apps", fmt.Sprintf("web-%d", i))] = true
	}
	stay := 0 // pods of a held stripe
	for i := range n {
		if held[h.a.stripe("apps", fmt.Sprintf("web-%d", i))] {
			stay++
		}
	}
	if stay == n {
		t.Fatal("every pod shares a stripe with a held one")
	}
	var unlocks []func()
	for m := range held {
		m.Lock()
		unlocks = append(unlocks, sync.OnceFunc(m.Unlock))
	}
	unlockAll := func() {
		for _, u := range unlocks {
			u()
		}
	}
	t.Cleanup(unlockAll)
	done := make(chan struct{})
	go func() { defer close(done); h.a.shutdown(false) }()
	deadline := time.Now().Add(15 * time.Second)
	for live := h.tun.Live(); live != stay; live = h.tun.Live() {
		if time.Now().After(deadline) {
			unlockAll()
			<-done
			t.Fatalf("%d pods served while the locks of %d are held, want %d: the shutdown waited on a held lock before letting go of the other pods", live, stay, stay)
		}
		time.Sleep(20 * time.Millisecond)
	}
	unlockAll()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		t.Fatal("shutdown not done once the locks were let go")
	}
	if live := h.tun.Live(); live != 0 {
		t.Fatalf("%d pods still served after the shutdown", live)
	}
}
