package enrollment

import (
	"testing"

	"github.com/ambit-mesh/ambit/node-agent/cluster"
	"github.com/ambit-mesh/ambit/node-agent/config"
)

func TestDecide(t *testing.T) {
	const key = "ambit.dev/dataplane-mode"
	p := NewPolicy(key, []string{"kube-system"})
	amb := &cluster.Namespace{Name: "apps", Labels: map[string]string{key: "ambient"}}
	plain := &cluster.Namespace{Name: "apps", Labels: map[string]string{"team": "x"}}
	sys := &cluster.Namespace{Name: "kube-system", Labels: map[string]string{key: "ambient"}}
	pod := func(ns string, labels map[string]string) cluster.Pod {
		return cluster.Pod{Namespace: ns, Name: "p", Labels: labels}
	}
	cases := []struct {
		name   string
		pod    cluster.Pod
		ns     *cluster.Namespace
		enroll bool
		reason string
	}{
		{"namespace ambient", pod("apps", nil), amb, true, ReasonNamespaceOptIn},
		{"namespace plain", pod("apps", nil), plain, false, ReasonNotLabelled},
		{"pod opts out of ambient namespace", pod("apps", map[string]string{key: "none"}), amb, false, ReasonPodOptOut},
		{"pod opts in, plain namespace", pod("apps", map[string]string{key: "ambient"}), plain, true, ReasonPodOptIn},
		{"pod opts in, unknown namespace", pod("apps", map[string]string{key: "ambient"}), nil, true, ReasonPodOptIn},
		{"unknown namespace", pod("apps", nil), nil, false, ReasonUnknownNamespace},
		{"excluded namespace even labelled", pod("kube-system", nil), sys, false, ReasonExcluded},
		{"excluded namespace beats pod label", pod("kube-system", map[string]string{key: "ambient"}), sys, false, ReasonExcluded},
		{"hostNetwork never", cluster.Pod{Namespace: "apps", HostNetwork: true, Labels: map[string]string{key: "ambient"}}, amb, false, ReasonHostNetwork},
		{"terminal never", cluster.Pod{Namespace: "apps", Terminal: true}, amb, false, ReasonTerminal},
		{"other label value ignored", pod("apps", map[string]string{key: "sidecar"}), amb, true, ReasonNamespaceOptIn},
		{"other key ignored", pod("apps", map[string]string{"istio.io/dataplane-mode": "ambient"}), plain, false, ReasonNotLabelled},
	}
	for _, c := range cases {
		d := p.Decide(c.pod, c.ns)
		if d.Enroll != c.enroll || d.Reason != c.reason {
			t.Errorf("%s: got %+v, want enroll=%v reason=%s", c.name, d, c.enroll, c.reason)
		}
	}
}

func TestConfigurableKey(t *testing.T) {
	p := NewPolicy("istio.io/dataplane-mode", nil)
	ns := &cluster.Namespace{Name: "a", Labels: map[string]string{"istio.io/dataplane-mode": "ambient"}}
	if !p.Decide(cluster.Pod{Namespace: "a"}, ns).Enroll {
		t.Fatal("namespace with the configured key not enrolled")
	}
	ns.Labels = map[string]string{"ambit.dev/dataplane-mode": "ambient"}
	if p.Decide(cluster.Pod{Namespace: "a"}, ns).Enroll {
		t.Fatal("default key honoured although another was configured")
	}
	if !p.NamespaceEnrolled(cluster.Namespace{Name: "a", Labels: map[string]string{"istio.io/dataplane-mode": "ambient"}}) {
		t.Fatal("NamespaceEnrolled disagrees with Decide")
	}
	if p.Excluded("kube-system") {
		t.Fatal("no exclusions configured, kube-system excluded")
	}
}

// TestOwnOptOutWithAnotherKey: a platform moving from Istio configures
// enrollLabel istio.io/dataplane-mode (docs/install.md). Ambit's own CA
// pod carries ambit.dev/dataplane-mode=none (manifests/base/ca), which
// that key does not read: in a namespace labelled ambient under Istio's
// key the CA pod was enrolled, and the agents' CSRs to it captured.
func TestOwnOptOutWithAnotherKey(t *testing.T) {
	p := NewPolicy("istio.io/dataplane-mode", nil)
	ns := &cluster.Namespace{Name: "ambit-system", Labels: map[string]string{"istio.io/dataplane-mode": "ambient"}}
	ca := cluster.Pod{Namespace: "ambit-system", Name: "ambit-ca-x", Labels: map[string]string{OwnLabelKey: "none"}}
	if d := p.Decide(ca, ns); d.Enroll || d.Reason != ReasonPodOptOut {
		t.Errorf("CA pod labelled %s=none under key istio.io/dataplane-mode: %+v, want not enrolled (%s)", OwnLabelKey, d, ReasonPodOptOut)
	}
	ca.Labels["istio.io/dataplane-mode"] = "ambient"
	if d := p.Decide(ca, ns); d.Enroll {
		t.Errorf("our own opt-out lost to the configured key's ambient: %+v", d)
	}
	// Only "none" of our key counts: its "ambient" does not enroll under
	// another key (TestConfigurableKey).
	other := cluster.Pod{Namespace: "apps", Labels: map[string]string{OwnLabelKey: "ambient"}}
	if d := p.Decide(other, &cluster.Namespace{Name: "apps"}); d.Enroll {
		t.Errorf("our key's ambient enrolled under another key: %+v", d)
	}
}

func TestOwnLabelKeyIsTheDefault(t *testing.T) {
	if OwnLabelKey != config.DefaultEnrollLabel {
		t.Fatalf("OwnLabelKey %q, config.DefaultEnrollLabel %q: the manifests' opt-outs use the default", OwnLabelKey, config.DefaultEnrollLabel)
	}
}

// TestIstioServedPodsAreNotEnrolled: moving namespace by namespace from
// Istio, a namespace labelled ambient for Ambit still holds pods Istio
// serves. A sidecar pod enrolled could not start (its Envoy binds
// 15001/15006, which our listeners hold); a pod istio-cni redirected would
// be captured twice. The reason is Istio's whatever the pod's labels, and
// the earlier rules keep their precedence.
func TestIstioServedPodsAreNotEnrolled(t *testing.T) {
	for _, key := range []string{OwnLabelKey, "istio.io/dataplane-mode"} {
		p := NewPolicy(key, []string{"kube-system"})
		amb := &cluster.Namespace{Name: "apps", Labels: map[string]string{key: "ambient"}}
		sidecar := map[string]string{IstioSidecarAnnotation: `{"initContainers":["istio-init"],"containers":["istio-proxy"]}`}
		redirected := func(v string) map[string]string { return map[string]string{IstioRedirectionAnnotation: v} }
		pod := func(ns string, labels, ann map[string]string) cluster.Pod {
			return cluster.Pod{Namespace: ns, Name: "p", Labels: labels, Annotations: ann}
		}
		cases := []struct {
			name   string
			pod    cluster.Pod
			ns     *cluster.Namespace
			enroll bool
			reason string
		}{
			{"sidecar in ambient namespace", pod("apps", nil, sidecar), amb, false, ReasonIstioSidecar},
			{"sidecar opting in by label", pod("apps", map[string]string{key: "ambient"}, sidecar), nil, false, ReasonIstioSidecar},
			{"sidecar status of any value", pod("apps", nil, map[string]string{IstioSidecarAnnotation: ""}), amb, false, ReasonIstioSidecar},
			{"istio-cni enabled", pod("apps", nil, redirected("enabled")), amb, false, ReasonIstioAmbient},
			{"istio-cni pending (its rules are in)", pod("apps", map[string]string{key: "ambient"}, redirected("pending")), amb, false, ReasonIstioAmbient},
			{"istio's old opt-out captures nothing", pod("apps", nil, redirected("disabled")), amb, true, ReasonNamespaceOptIn},
			{"istio's value bounded away by the trim", pod("apps", nil, redirected("")), amb, true, ReasonNamespaceOptIn},
			{"other istio annotation", pod("apps", nil, map[string]string{"sidecar.istio.io/inject": "false"}), amb, true, ReasonNamespaceOptIn},
			{"hostNetwork first", cluster.Pod{Namespace: "apps", HostNetwork: true, Annotations: sidecar}, amb, false, ReasonHostNetwork},
			{"terminal first", cluster.Pod{Namespace: "apps", Terminal: true, Annotations: redirected("enabled")}, amb, false, ReasonTerminal},
			{"excluded namespace first", pod("kube-system", nil, sidecar), &cluster.Namespace{Name: "kube-system", Labels: map[string]string{key: "ambient"}}, false, ReasonExcluded},
		}
		for _, c := range cases {
			if d := p.Decide(c.pod, c.ns); d.Enroll != c.enroll || d.Reason != c.reason {
				t.Errorf("key %s, %s: got %+v, want enroll=%v reason=%s", key, c.name, d, c.enroll, c.reason)
			}
		}
	}
}
