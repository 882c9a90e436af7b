package agent

import (
	"context"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/admin"
	"github.com/ambit-mesh/ambit/node-agent/config"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

// TestStatusPanicFreesPodLock: a bug makes status panic while it reads a
// pod (under the pod's lock); net/http recovers it and the operator gets
// no answer. The pod must stay manageable: the runtime's next ADD of it
// is served at once. Before, the unlock was not deferred: the lock
// stripe stayed held for good, and every later ADD of the pod (and of
// the pods sharing its stripe) answered "its lock is held ... retry"
// after the request's time, and its DEL never ran.
func TestStatusPanicFreesPodLock(t *testing.T) {
	testenv.RequireRoot(t)
	h := startAgent(t, "", invAmbient, func(o *Options) {
		o.Config.RequestTimeout = config.Duration{Duration: 2 * time.Second}
	})
	n := newNetns(t, "10.95.2.2/24")
	enrollLikePlugin(t, h, "web", n, "10.95.2.2/24")
	sock := admin.SocketPath(h.dir, "00000000000000000001-panic")
	srv, err := admin.Listen(sock, admin.Sources{Pods: h.a.AdminPods}, quietLogger())
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()

	boom := func(p *pod) {
		if p.rec.Name == "web" {
			panic("a bug while reading the pod")
		}
	}
	testHookAdminPod.Store(&boom)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = admin.Fetch(ctx, sock)
	testHookAdminPod.Store(nil)
	if err == nil {
		t.Fatal("status answered although reading the pod panicked")
	}
	t.Logf("status while reading the pod panics: %v", err)

	start := time.Now()
	resp := h.callV(2, "", cniproto.OpAdd, "apps", "web", n)
	if resp.Error != "" || resp.Decision != cniproto.Enroll {
		t.Fatalf("repeated ADD after the panic: %+v after %v, want enrolled", resp, time.Since(start).Round(time.Millisecond))
	}
	st, err := admin.Fetch(ctx, sock)
	if err != nil {
		t.Fatal(err)
	}
	if p := podOf(st, "web"); p == nil || p.State != admin.StateEnrolled {
		t.Fatalf("status after the panic: %+v, want web enrolled (not busy)", p)
	}
}
