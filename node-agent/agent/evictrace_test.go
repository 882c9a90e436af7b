package agent

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/admin"
	"github.com/ambit-mesh/ambit/node-agent/hostrules"
	"github.com/ambit-mesh/ambit/node-agent/inventory"
	"github.com/ambit-mesh/ambit/node-agent/netnsfind"
	"github.com/ambit-mesh/ambit/node-agent/state"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

// gatedUninstall is the Redirector whose Uninstall in the namespace of
// inode ino, once, removes the rules and then says so (entered) and
// waits for release before it returns.
type gatedUninstall struct {
	Rules
	ino              uint64
	entered, release chan struct{}
	once             sync.Once
}

func (g *gatedUninstall) Uninstall(ctx context.Context, f *os.File) error {
	err := g.Rules.Uninstall(ctx, f)
	if ino, _ := netnsfind.Inode(f); ino == g.ino {
		g.once.Do(func() {
			close(g.entered)
			<-g.release
		})
	}
	return err
}

// TestEvictionOfAnotherPodLeavesTheADDsPodAlone: apps/web is found by
// live enrollment in the namespace apps/other's ADD then brings; the ADD
// evicts web in the background, under web's lock. The eviction read
// other's serving (enrolled()) holding a.mu alone, which other's
// unenrollment clears holding other's lock alone: a data race that
// go test -race reports, for a result unused when the claim evicted is
// another pod's. Only real time orders the two here: the unenrollment
// is held in its rule removal until the eviction has removed web's
// record, seen by a stat, which the race detector counts as no
// synchronisation with the agent.
func TestEvictionOfAnotherPodLeavesTheADDsPodAlone(t *testing.T) {
	testenv.RequireRoot(t)
	hr, _ := testHostRules(t, hostrules.Config{})
	stale := netip.MustParseAddr("10.89.20.3")
	on := newNetns(t, "10.89.20.3/24")
	gate := &gatedUninstall{ino: inodeOfNetns(t, on), entered: make(chan struct{}), release: make(chan struct{})}
	var released sync.Once
	release := func() { released.Do(func() { close(gate.release) }) }
	defer release() // before the agent stops (t.Cleanup)
	var view *staleLocalView
	h := startAgent(t, "", invAmbient, func(o *Options) {
		o.Host = hr
		o.Rules = gate
		view = &staleLocalView{Source: o.View.(*inventory.Source), name: "apps/web", uid: "uid-web"}
		o.View = view
	})
	if h.a.stripe("apps", "web") == h.a.stripe("apps", "other") {
		t.Fatal("apps/web and apps/other share a lock stripe: the test holds web's while other's ADD runs")
	}
	view.set(stale)
	h.a.Resync()
	if st := settled(t, h, "web"); st.State != admin.StateEnrolled {
		t.Fatalf("apps/web found by its (stale) IP: %s %s %q; the setting needs it served", st.State, st.Reason, st.Message)
	}
	// The eviction waits for web's lock until other's unenrollment is
	// in its rule removal.
	unlockWeb := h.a.lock("apps", "web")
	locked := true
	defer func() {
		if locked {
			unlockWeb()
		}
	}()
	if resp, err := h.call(cniproto.OpAdd, "apps", "other", "cid-other", on, "10.89.20.3/24"); err != nil || resp.Decision != cniproto.Enroll {
		t.Fatalf("ADD apps/other: %+v %v", resp, err)
	}
	h.writeInventory(invAmbient + "  - namespace: apps\n    name: other\n    labels: {ambit.dev/dataplane-mode: none}\n")
	if err := h.inv.Reload(); err != nil {
		t.Fatal(err)
	}
	h.a.Resync()
	select {
	case <-gate.entered:
	case <-time.After(15 * time.Second):
		t.Fatal("apps/other's unenrollment did not reach its rule removal")
	}
	unlockWeb()
	locked = false
	// Polled without a pause: the race detector reports a race only
	// while the eviction's read is still in its goroutine's access
	// history, which the rest of the eviction (logs, status) fills.
	webRecord := filepath.Join(h.a.store.Dir(), state.FileName(foundPrefix+"apps/web"))
	for end := time.Now().Add(15 * time.Second); ; runtime.Gosched() {
		if _, err := os.Stat(webRecord); os.IsNotExist(err) {
			break
		}
		if time.Now().After(end) {
			t.Fatal("apps/web not evicted (its found: record is still there)")
		}
	}
	release()
	eventually(t, "apps/other unenrolled", func() bool {
		p := h.podNow("apps/other")
		return p != nil && !p.enrolled()
	})
}
