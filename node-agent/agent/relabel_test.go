package agent

import (
	"maps"
	"sync"
	"testing"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
	"github.com/ambit-mesh/ambit/tunnel"
)

// labelTunnel is echoTunnel whose servings record the labels the agent
// gives them: at Serve, then through SetLabels.
type labelTunnel struct {
	echoTunnel
	mu     sync.Mutex
	labels map[string]string
}

type labelServing struct {
	Serving
	t *labelTunnel
}

func (l *labelTunnel) Serve(p tunnel.Pod) (Serving, error) {
	s, err := l.echoTunnel.Serve(p)
	if err != nil {
		return nil, err
	}
	l.set(p.Workload.Labels)
	return &labelServing{s, l}, nil
}

func (l *labelTunnel) set(labels map[string]string) {
	l.mu.Lock()
	l.labels = maps.Clone(labels)
	l.mu.Unlock()
}

func (l *labelTunnel) get() map[string]string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.labels
}

func (s *labelServing) SetLabels(labels map[string]string) { s.t.set(labels) }

// TestRelabelledPodReachesTheTunnel: a served pod's label change reaches
// its tunnel serving, where policy selectors read them. Before, the
// agent did nothing for an enrolled pod whose labels changed: a DENY
// selecting the new labels never applied to it (timed out here with the
// enrollment's labels).
func TestRelabelledPodReachesTheTunnel(t *testing.T) {
	testenv.RequireRoot(t)
	lt := &labelTunnel{}
	inv := invAmbient + "    labels: {app: web}\n"
	h := startAgent(t, "", inv, func(o *Options) { o.Tunnel = lt })
	pod, _ := newPair(t, "10.64.0.2", "10.64.0.1")
	resp, err := h.call(cniproto.OpAdd, "apps", "web", "cid-relabel", pod, "10.64.0.2/24")
	if err != nil || resp.Decision != cniproto.Enroll {
		t.Fatalf("ADD: %+v %v", resp, err)
	}
	if got := lt.get(); got["app"] != "web" {
		t.Fatalf("served with labels %v", got)
	}
	h.writeInventory(invAmbient + "    labels: {app: web, quarantine: \"true\"}\n")
	if err := h.inv.Reload(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the tunnel sees the new labels", func() bool { return lt.get()["quarantine"] == "true" })
}
