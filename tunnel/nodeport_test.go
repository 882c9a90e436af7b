package tunnel_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"io"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/record"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/kube"
	"github.com/ambit-mesh/ambit/tunnel"
	"github.com/ambit-mesh/ambit/tunnel/internal/meshtest"
)

// TestNodePortEncrypted: A's app connects to a node's address and a
// nodePort (v4 and v6), as an app given a NodePort URL does. The
// agents resolve it with node-agent/kube's Source (a fake API server
// holding a Node, a NodePort Service, its EndpointSlices and the two
// pods) to B's endpoint, and the connection goes over HBONE: B's app
// sees A's pod IP, the link carries only port 15008 and no byte of the
// payload. Before NodePorts were resolved it was passed through to the
// node (kube-proxy's DNAT, then plaintext to B).
func TestNodePortEncrypted(t *testing.T) {
	testenv.RequireRoot(t)
	client := fake.NewClientset()
	src, err := kube.New(kube.Config{Client: client, NodeName: "node-a", Recorder: record.NewFakeRecorder(10),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() { cancel(); src.Close() })
	src.Start(ctx)
	wctx, wcancel := context.WithTimeout(ctx, 10*time.Second)
	defer wcancel()
	if err := src.WaitSynced(wctx); err != nil {
		t.Fatal(err)
	}
	m := meshtest.New(t, meshtest.Options{Config: tunnel.Config{Directory: src}})
	go peerEcho(m.B.Listen(t, "[::]:8080"))

	// The node's addresses are off the pods' link: routed (default
	// route) and captured like any destination.
	nodeIP4, nodeIP6 := netip.MustParseAddr("172.31.77.2"), netip.MustParseAddr("fd00:77::2")
	const nodePort = 30080
	pod := func(n *meshtest.Node) *corev1.Pod {
		var ips []corev1.PodIP
		for _, ip := range n.Workload.IPs {
			ips = append(ips, corev1.PodIP{IP: ip.String()})
		}
		return &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: n.Workload.Name, Namespace: n.Workload.Namespace, UID: types.UID("uid-" + n.Workload.Name),
				Annotations: map[string]string{kube.RedirectionAnnotation: "enabled"}},
			Spec:   corev1.PodSpec{ServiceAccountName: n.Workload.ServiceAccount, NodeName: "node-" + n.Workload.Namespace},
			Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ips[0].IP, PodIPs: ips},
		}
	}
	ns := m.B.Workload.Namespace
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: ns},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeNodePort, ClusterIP: "10.96.77.10", ClusterIPs: []string{"10.96.77.10", "fd00:96::77:10"},
			Ports: []corev1.ServicePort{{Name: "http", Port: 80, NodePort: nodePort, Protocol: corev1.ProtocolTCP}}},
	}
	port, name := int32(8080), "http"
	eps := func(family discoveryv1.AddressType, ip netip.Addr) *discoveryv1.EndpointSlice {
		return &discoveryv1.EndpointSlice{
			ObjectMeta:  metav1.ObjectMeta{Name: "web-" + strings.ToLower(string(family)), Namespace: ns, Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
			AddressType: family,
			Ports:       []discoveryv1.EndpointPort{{Name: &name, Port: &port}},
			Endpoints: []discoveryv1.Endpoint{{Addresses: []string{ip.String()}, NodeName: ptrTo("node-b"),
				TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: ns, Name: m.B.Workload.Name, UID: types.UID("uid-" + m.B.Workload.Name)}}},
		}
	}
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-b"}, Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{
		{Type: corev1.NodeInternalIP, Address: nodeIP4.String()}, {Type: corev1.NodeInternalIP, Address: nodeIP6.String()}}}}
	for _, create := range []func() error{
		func() error {
			_, err := client.CoreV1().Pods(m.A.Workload.Namespace).Create(ctx, pod(m.A), metav1.CreateOptions{})
			return err
		},
		func() error {
			_, err := client.CoreV1().Pods(ns).Create(ctx, pod(m.B), metav1.CreateOptions{})
			return err
		},
		func() error { _, err := client.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{}); return err },
		func() error {
			_, err := client.CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{})
			return err
		},
		func() error {
			_, err := client.DiscoveryV1().EndpointSlices(ns).Create(ctx, eps(discoveryv1.AddressTypeIPv4, m.B.Pod.IP4), metav1.CreateOptions{})
			return err
		},
		func() error {
			_, err := client.DiscoveryV1().EndpointSlices(ns).Create(ctx, eps(discoveryv1.AddressTypeIPv6, m.B.Pod.IP6), metav1.CreateOptions{})
			return err
		},
	} {
		if err := create(); err != nil {
			t.Fatal(err)
		}
	}
	targets := []netip.AddrPort{netip.AddrPortFrom(nodeIP4, nodePort), netip.AddrPortFrom(nodeIP6, nodePort)}
	deadline := time.Now().Add(10 * time.Second)
	for _, np := range targets {
		for {
			s, ok := src.ServiceByAddr(np)
			w, meshed := src.WorkloadByIP(m.B.Pod.IP4)
			if ok && len(s.Endpoints) == 1 && meshed && w.Meshed && w.Identity == m.B.Workload.Identity {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("the Source did not resolve %v (%v %v) or B (%+v %v)", np, s, ok, w, meshed)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}

	var mark [8]byte
	rand.Read(mark[:])
	marker := "AMBIT-NODEPORT-" + hex.EncodeToString(mark[:])
	payload := strings.Repeat(marker, 20000)
	stop := capture(t, m.A.Pod)
	for i, np := range targets {
		c, err := m.A.Dial(np)
		if err != nil {
			t.Fatal(err)
		}
		if got, want := ask(t, c, "who"), m.A.Workload.IPs[i].String(); got != want {
			t.Errorf("via %v: B's app saw %q, want A's pod IP %s", np, got, want)
		}
		c.Close()
		c, err = m.A.Dial(np)
		if err != nil {
			t.Fatal(err)
		}
		if got := ask(t, c, "echo\n"+payload); got != strings.TrimSpace(payload) {
			t.Fatalf("via %v: echo of %d bytes came back as %d bytes", np, len(payload), len(got))
		}
		c.Close()
	}
	raw, text := stop()
	onlyHBONEOnTheWire(t, raw, text, "AMBIT-NODEPORT")
	waitMetric(t, m.A, "ambit_tunnel_connections_closed_total", map[string]string{"direction": "outbound", "mode": "hbone"}, 4)
	waitMetric(t, m.B, "ambit_tunnel_connections_closed_total", map[string]string{"direction": "inbound", "mode": "hbone"}, 4)
}

func ptrTo[T any](v T) *T { return &v }
