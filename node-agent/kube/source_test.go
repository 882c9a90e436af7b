package kube

import (
	"context"
	"errors"
	"net/netip"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/client-go/tools/record"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/cluster"
)

func ns(name string, labels map[string]string) *corev1.Namespace {
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}
}

func pod(namespace, name, uid, node string, ips []string, labels, ann map[string]string) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: namespace, UID: types.UID("uid-" + uidOr(uid, name)), Labels: labels, Annotations: ann},
		Spec:       corev1.PodSpec{NodeName: node, ServiceAccountName: "sa-" + name},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning},
	}
	for _, ip := range ips {
		p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: ip})
	}
	return p
}

func uidOr(uid, name string) string {
	if uid != "" {
		return uid
	}
	return name
}

var enabled = map[string]string{RedirectionAnnotation: "enabled"}

// events collects what a subscriber receives.
type events struct {
	mu  sync.Mutex
	got []cluster.Event
}

func (e *events) add(ev cluster.Event) { e.mu.Lock(); e.got = append(e.got, ev); e.mu.Unlock() }
func (e *events) list() []cluster.Event {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]cluster.Event(nil), e.got...)
}

// eventually is testenv.Eventually (10 s, 5 ms polls).
var eventually = testenv.Eventually

func startSource(t *testing.T, client *fake.Clientset, cfg Config) (*Source, *events) {
	t.Helper()
	cfg.Client = client
	if cfg.NodeName == "" {
		cfg.NodeName = "node-a"
	}
	if cfg.Recorder == nil {
		cfg.Recorder = record.NewFakeRecorder(100)
	}
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ev := &events{}
	s.Subscribe(ev.add)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() { cancel(); s.Close() })
	s.Start(ctx)
	wctx, wcancel := context.WithTimeout(ctx, 10*time.Second)
	defer wcancel()
	if err := s.WaitSynced(wctx); err != nil {
		t.Fatal(err)
	}
	return s, ev
}

func TestNewRejectsIncompleteConfig(t *testing.T) {
	if _, err := New(Config{NodeName: "n"}); err == nil || !strings.Contains(err.Error(), "Client") {
		t.Fatalf("missing client: %v", err)
	}
	if _, err := New(Config{Client: fake.NewClientset()}); err == nil || !strings.Contains(err.Error(), "NodeName") {
		t.Fatalf("missing node: %v", err)
	}
}

func TestLocalPodInformerUsesNodeFieldSelector(t *testing.T) {
	client := fake.NewClientset()
	var mu sync.Mutex
	var selectors []string
	client.PrependReactor("list", "pods", func(a k8stesting.Action) (bool, runtime.Object, error) {
		mu.Lock()
		selectors = append(selectors, a.(k8stesting.ListAction).GetListRestrictions().Fields.String())
		mu.Unlock()
		return false, nil, nil
	})
	startSource(t, client, Config{NodeName: "node-x"})
	mu.Lock()
	defer mu.Unlock()
	sort := map[string]bool{}
	for _, s := range selectors {
		sort[s] = true
	}
	if !sort["spec.nodeName=node-x"] || !sort[""] {
		t.Fatalf("pod list selectors = %q: want one node-scoped and one cluster-wide", selectors)
	}
}

func TestDirectoryMeshedIdentityHostNetworkAndIPReuse(t *testing.T) {
	hostNet := pod("kube-system", "proxy", "", "node-a", []string{"10.0.0.1"}, nil, nil)
	hostNet.Spec.HostNetwork = true
	done := pod("shop", "job", "old", "node-b", []string{"10.1.0.9"}, nil, enabled)
	done.Status.Phase = corev1.PodSucceeded
	client := fake.NewClientset(
		ns("shop", map[string]string{DefaultLabelKey: "ambient"}),
		pod("shop", "web", "", "node-b", []string{"10.1.0.5", "fd00::5"}, map[string]string{"app": "web"}, enabled),
		pod("shop", "fresh", "", "node-b", []string{"10.1.0.6"}, nil, map[string]string{RedirectionAnnotation: "pending"}),
		hostNet, done,
	)
	s, _ := startSource(t, client, Config{TrustDomain: "example.org"})

	wl, ok := s.WorkloadByIP(netip.MustParseAddr("fd00::5"))
	if !ok || wl.Name != "web" || wl.Identity != "spiffe://example.org/ns/shop/sa/sa-web" || !wl.Meshed || wl.Labels["app"] != "web" || len(wl.IPs) != 2 {
		t.Fatalf("web by v6: %+v %v", wl, ok)
	}
	if wl, ok := s.WorkloadByIP(netip.MustParseAddr("::ffff:10.1.0.5")); !ok || wl.Name != "web" {
		t.Fatalf("v4-mapped lookup: %+v %v", wl, ok)
	}
	// Pending is not enabled: the labels say ambient, but HBONE may not
	// answer yet, so the tunnel must not treat it as meshed.
	if wl, ok := s.WorkloadByIP(netip.MustParseAddr("10.1.0.6")); !ok || wl.Meshed {
		t.Fatalf("pending pod: %+v %v", wl, ok)
	}
	if _, ok := s.WorkloadByIP(netip.MustParseAddr("10.0.0.1")); ok {
		t.Fatal("host-network pod must not own the node IP")
	}
	if _, ok := s.WorkloadByIP(netip.MustParseAddr("10.1.0.9")); ok {
		t.Fatal("a terminal pod must not own its old IP")
	}
	// IP reuse: a new pod takes the finished job's IP.
	ctx := context.Background()
	reuse := pod("other", "new", "new", "node-b", []string{"10.1.0.9"}, nil, nil)
	if _, err := client.CoreV1().Pods("other").Create(ctx, reuse, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "new owner of 10.1.0.9", func() bool {
		wl, ok := s.WorkloadByIP(netip.MustParseAddr("10.1.0.9"))
		return ok && wl.UID == "uid-new" && !wl.Meshed
	})
	// Deleting the old pod afterwards must not remove the new owner.
	if err := client.CoreV1().Pods("shop").Delete(ctx, "job", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	// Annotating the new pod flips Meshed; that update also proves the
	// delete before it was processed (one informer, in order).
	reuse.Annotations = enabled
	if _, err := client.CoreV1().Pods("other").Update(ctx, reuse, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "new pod meshed", func() bool {
		wl, ok := s.WorkloadByIP(netip.MustParseAddr("10.1.0.9"))
		return ok && wl.UID == "uid-new" && wl.Meshed
	})
	if err := client.CoreV1().Pods("other").Delete(ctx, "new", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "10.1.0.9 gone", func() bool { _, ok := s.WorkloadByIP(netip.MustParseAddr("10.1.0.9")); return !ok })
}

func TestServiceIndexFollowsSlices(t *testing.T) {
	ports := []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr[int32](8080)}}
	client := fake.NewClientset(webService(),
		slice("web-a", "web", discoveryv1.AddressTypeIPv4, ports, ep("10.1.0.1", ptr(true))))
	s, _ := startSource(t, client, Config{})
	vip := netip.MustParseAddrPort("10.96.0.10:80")
	eps, ok := s.ServiceEndpoints(vip)
	if !ok || !reflect.DeepEqual(eps, aps("10.1.0.1:8080")) {
		t.Fatalf("initial: %v %v", eps, ok)
	}
	if _, ok := s.ServiceEndpoints(netip.MustParseAddrPort("10.96.0.10:81")); ok {
		t.Fatal("unknown port resolved")
	}
	ctx := context.Background()
	second := slice("web-b", "web", discoveryv1.AddressTypeIPv4, ports, ep("10.1.0.2", ptr(true)))
	if _, err := client.DiscoveryV1().EndpointSlices("shop").Create(ctx, second, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "second slice", func() bool {
		eps, _ := s.ServiceEndpoints(vip)
		return reflect.DeepEqual(eps, aps("10.1.0.1:8080", "10.1.0.2:8080"))
	})
	second.Endpoints[0].Conditions.Ready = ptr(false)
	if _, err := client.DiscoveryV1().EndpointSlices("shop").Update(ctx, second, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "not-ready endpoint dropped", func() bool {
		eps, _ := s.ServiceEndpoints(vip)
		return reflect.DeepEqual(eps, aps("10.1.0.1:8080"))
	})
	if err := client.CoreV1().Services("shop").Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "service removed", func() bool { _, ok := s.ServiceEndpoints(vip); return !ok })
}

func TestEventsForLocalPodsAndNamespaces(t *testing.T) {
	web := pod("shop", "web", "", "node-a", []string{"10.1.0.5"}, map[string]string{"app": "web"}, nil)
	client := fake.NewClientset(ns("shop", nil), web)
	s, ev := startSource(t, client, Config{})
	if got := ev.list(); len(got) != 0 {
		t.Fatalf("initial list raised events: %v", got)
	}
	if got := s.LocalPods(); len(got) != 1 || got[0].Name != "web" || got[0].IPs[0] != netip.MustParseAddr("10.1.0.5") {
		t.Fatalf("LocalPods = %+v", got)
	}
	ctx := context.Background()
	pods := client.CoreV1().Pods("shop")
	// A status-only change (conditions) is not an event...
	web.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}
	if _, err := pods.UpdateStatus(ctx, web, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	// ...a label change, an annotation change and a new IP are.
	web.Labels[DefaultLabelKey] = "none"
	if _, err := pods.Update(ctx, web, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	web.Annotations = map[string]string{RedirectionAnnotation: "enabled", "unrelated": "x"}
	if _, err := pods.Update(ctx, web, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	web.Status.PodIPs = append(web.Status.PodIPs, corev1.PodIP{IP: "fd00::5"})
	if _, err := pods.UpdateStatus(ctx, web, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := pods.Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	want := []cluster.Event{
		{Kind: cluster.PodChanged, Namespace: "shop", Name: "web", UID: "uid-web"},
		{Kind: cluster.PodChanged, Namespace: "shop", Name: "web", UID: "uid-web"},
		{Kind: cluster.PodChanged, Namespace: "shop", Name: "web", UID: "uid-web"},
		{Kind: cluster.PodDeleted, Namespace: "shop", Name: "web", UID: "uid-web"},
	}
	eventually(t, "pod events", func() bool { return len(ev.list()) >= len(want) })
	if got := ev.list(); !reflect.DeepEqual(got, want) {
		t.Fatalf("events:\n got %+v\nwant %+v", got, want)
	}
	// Namespace: a label change is an event, an annotation change is not.
	n, _ := client.CoreV1().Namespaces().Get(ctx, "shop", metav1.GetOptions{})
	n.Annotations = map[string]string{"note": "x"}
	if _, err := client.CoreV1().Namespaces().Update(ctx, n, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	n.Labels = map[string]string{DefaultLabelKey: "ambient"}
	if _, err := client.CoreV1().Namespaces().Update(ctx, n, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "namespace event", func() bool { return len(ev.list()) >= len(want)+1 })
	got := ev.list()[len(want):]
	if !reflect.DeepEqual(got, []cluster.Event{{Kind: cluster.NamespaceChanged, Namespace: "shop"}}) {
		t.Fatalf("namespace events: %+v", got)
	}
	if nsv, ok := s.Namespace("shop"); !ok || nsv.Labels[DefaultLabelKey] != "ambient" {
		t.Fatalf("Namespace(shop) = %+v %v", nsv, ok)
	}
}

func TestAmbientAndOptInNamespaces(t *testing.T) {
	term := pod("batch", "done", "", "node-b", []string{"10.1.2.1"}, map[string]string{DefaultLabelKey: "ambient"}, nil)
	term.Status.Phase = corev1.PodFailed
	client := fake.NewClientset(
		ns("mesh", map[string]string{DefaultLabelKey: "ambient"}),
		ns("plain", nil),
		ns("mixed", nil),
		ns("batch", nil),
		ns("excluded", map[string]string{DefaultLabelKey: "ambient"}),
		pod("mesh", "a", "", "node-b", []string{"10.1.0.1"}, map[string]string{DefaultLabelKey: "ambient"}, nil),
		pod("plain", "b", "", "node-b", []string{"10.1.0.2"}, nil, nil),
		// Opts in by pod label on another node: the namespace still counts.
		pod("mixed", "c", "", "node-c", []string{"10.1.0.3"}, map[string]string{DefaultLabelKey: "ambient"}, nil),
		term,
		pod("excluded", "d", "", "node-b", []string{"10.1.0.4"}, map[string]string{DefaultLabelKey: "ambient"}, nil),
		pod("unknown-ns", "e", "", "node-b", []string{"10.1.0.5"}, map[string]string{DefaultLabelKey: "ambient"}, nil),
	)
	s, _ := startSource(t, client, Config{Decide: LabelDecider(DefaultLabelKey, "excluded")})
	if got := s.AmbientNamespaces(); !reflect.DeepEqual(got, []string{"mesh"}) {
		t.Fatalf("AmbientNamespaces = %v", got)
	}
	if got := s.OptInNamespaces(); !reflect.DeepEqual(got, []string{"mixed", "unknown-ns"}) {
		t.Fatalf("OptInNamespaces = %v", got)
	}
	if !s.WouldEnroll(cluster.Pod{Namespace: "mesh", Name: "x"}) ||
		s.WouldEnroll(cluster.Pod{Namespace: "mesh", Name: "x", Labels: map[string]string{DefaultLabelKey: "none"}}) ||
		s.WouldEnroll(cluster.Pod{Namespace: "plain", Name: "x"}) {
		t.Fatal("WouldEnroll disagrees with the rule")
	}
}

func TestPodFallsBackToOneBoundedGet(t *testing.T) {
	client := fake.NewClientset(pod("shop", "new", "", "node-a", []string{"10.1.0.7"}, nil, nil))
	// Not started: the caches are empty, as for a pod created a moment ago.
	s, err := New(Config{Client: client, NodeName: "node-a", GetTimeout: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	p, ok, err := s.Pod(ctx, "shop", "new")
	if err != nil || !ok || p.UID != "uid-new" || p.ServiceAccount != "sa-new" {
		t.Fatalf("GET fallback: %+v %v %v", p, ok, err)
	}
	if _, ok, err := s.Pod(ctx, "shop", "missing"); ok || err != nil {
		t.Fatalf("missing pod: %v %v", ok, err)
	}
	// An API server error is reported, naming the pod.
	client.PrependReactor("get", "pods", func(a k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, errors.New("connection refused")
	})
	if _, _, err := s.Pod(ctx, "shop", "other"); err == nil || !strings.Contains(err.Error(), "shop/other") {
		t.Fatalf("API error not reported: %v", err)
	}
}
