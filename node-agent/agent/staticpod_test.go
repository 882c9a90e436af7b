package agent

import (
	"context"
	"maps"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/cluster"
	"github.com/ambit-mesh/ambit/node-agent/inventory"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

// mirrorView gives apps/web as the API holds a static pod's mirror: a
// UID of the API server's own (api-web), and the kubelet's UID of the
// static pod, which the runtime passes to CNI (uid-web here), in the
// mirror annotation.
type mirrorView struct{ *inventory.Source }

func (v *mirrorView) Static() bool { return false }

func (v *mirrorView) Pod(ctx context.Context, namespace, name string) (cluster.Pod, bool, error) {
	p, ok, err := v.Source.Pod(ctx, namespace, name)
	if ok && namespace+"/"+name == "apps/web" {
		p.UID = "api-web"
		p.Annotations = maps.Clone(p.Annotations)
		if p.Annotations == nil {
			p.Annotations = map[string]string{}
		}
		p.Annotations[cluster.MirrorAnnotation] = "uid-web"
	}
	return p, ok, err
}

// A static pod's sandbox carries the kubelet's UID of the pod, never the
// mirror's: its ADD must be decided on the mirror, not answered "the
// view still has the previous pod of this name, retry" until the answer
// is due, for ever (since session 24's check of the sandbox's UID, such
// a pod never started, in any namespace, enrolled or not).
func TestStaticPodsMirrorIsTheSandboxsPod(t *testing.T) {
	testenv.RequireRoot(t)
	view := &mirrorView{}
	h := startAgent(t, "", invAmbient, func(o *Options) {
		view.Source = o.View.(*inventory.Source)
		o.View = view
		o.Config.RequestTimeout.Duration = 2 * time.Second
	})
	n := newNetns(t, "10.97.9.2/24")
	resp, err := h.call(cniproto.OpAdd, "apps", "web", "cid-web", n, "10.97.9.2/24")
	if err != nil {
		t.Fatal(err)
	}
	if resp.Error != "" || resp.Decision != cniproto.Enroll {
		t.Fatalf("ADD of a static pod answered %+v, want enrolled", resp)
	}
	p := h.podNow("apps/web")
	if p == nil || !p.enrolled() {
		t.Fatalf("apps/web not served: %+v", p)
	}
	// Recorded under the API's UID: the annotation writes carry it as
	// their precondition, and the live reconcile compares it with the
	// view's.
	if p.rec.UID != "api-web" {
		t.Errorf("served as UID %q, want the mirror's api-web", p.rec.UID)
	}
}
