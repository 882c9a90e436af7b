package agent

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"sync"
	"testing"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

// TestRecordsReadAcrossPodsAsTheyChange: a live enrollment that looks
// for its pod's namespace by IP (netnsTaken) copies the record of every
// registered pod holding a.mu alone, while a CHECK of one of them (here
// naming a network it was not known in) writes that pod's record under
// the pod's own lock. Both ran without an order between them: a copy
// racing with the assignment of a slice can tear its header, and
// go test -race reported it. Records are now written under a.mu too.
// The two loops run side by side with no synchronisation of their own,
// so each CHECK's write falls between two of the lookups' copies.
func TestRecordsReadAcrossPodsAsTheyChange(t *testing.T) {
	testenv.RequireRoot(t)
	h := startAgent(t, "", invAmbient)
	web := newNetns(t, "10.89.21.2/24")
	enrollLikePlugin(t, h, "web", web, "10.89.21.2/24")
	other := newNetns(t, "10.89.21.3/24")
	ino := inodeOfNetns(t, other)
	const rounds = 100
	var wg sync.WaitGroup
	wg.Add(2)
	errs := make(chan error, 2*rounds)
	go func() {
		defer wg.Done()
		for i := range rounds {
			f, err := os.Open(web.path)
			if err != nil {
				errs <- err
				return
			}
			// Version 1: the plugin does the rule work, the agent only
			// keeps its record (the networks the sandbox is known in).
			req := &cniproto.Request{Version: 1, Op: cniproto.OpCheck, Network: fmt.Sprintf("net-%d", i),
				Pod: cniproto.Pod{Namespace: "apps", Name: "web", UID: "uid-web", ContainerID: "cid-web", Netns: web.path}}
			if resp := h.a.add(context.Background(), req, f, true); resp.Error != "" {
				errs <- fmt.Errorf("CHECK %d: %s", i, resp.Error)
			}
		}
	}()
	go func() {
		defer wg.Done()
		for range rounds {
			if err := h.a.netnsTaken(ino, podKey{"apps", "other", "uid-other"}, []netip.Addr{netip.MustParseAddr("10.89.21.3")}); err != nil {
				errs <- fmt.Errorf("apps/other's namespace taken: %v", err)
			}
		}
	}()
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	p := h.podNow("apps/web")
	if p == nil || !p.enrolled() {
		t.Fatal("apps/web not served after its CHECKs")
	}
	for i := range rounds {
		if n := fmt.Sprintf("net-%d", i); !slices.Contains(p.rec.Networks, n) {
			t.Fatalf("apps/web's record does not name network %s after its CHECK: %v", n, p.rec.Networks)
		}
	}
}
