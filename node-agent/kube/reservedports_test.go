package kube

import (
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambit-mesh/ambit/node-agent/cluster"
)

// The agent refuses to enroll a pod that declares a port it listens on
// in every enrolled pod; the trimmed pod must still say so: TCP ports
// 15001/15006/15008 of any container, init and sidecar containers
// included, and nothing else of the containers.
func TestTrimKeepsDeclaredReservedPorts(t *testing.T) {
	always := corev1.ContainerRestartPolicyAlways
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "shop"},
		Spec: corev1.PodSpec{
			InitContainers: []corev1.Container{
				{Name: "init", Image: "busybox", Ports: []corev1.ContainerPort{{ContainerPort: 15001}}},
				{Name: "proxy", RestartPolicy: &always, Ports: []corev1.ContainerPort{{ContainerPort: 9000}, {ContainerPort: 15006, Protocol: corev1.ProtocolTCP}}},
			},
			Containers: []corev1.Container{
				{Name: "app", Image: "nginx", Ports: []corev1.ContainerPort{{ContainerPort: 8080}, {ContainerPort: 15008, Name: "hbone"}}},
				{Name: "dns", Ports: []corev1.ContainerPort{{ContainerPort: 15008, Protocol: corev1.ProtocolUDP}}},
				{Name: "plain", Ports: []corev1.ContainerPort{{ContainerPort: 80}}},
			},
		},
	}
	obj, err := TrimPod(p)
	if err != nil {
		t.Fatal(err)
	}
	tp := obj.(*corev1.Pod)
	for _, c := range append(slices.Clone(tp.Spec.InitContainers), tp.Spec.Containers...) {
		if c.Image != "" || len(c.Ports) != 1 {
			t.Errorf("trimmed container %+v: want its name and its reserved port only", c)
		}
	}
	want := []cluster.DeclaredPort{{Container: "init", Port: 15001}, {Container: "proxy", Port: 15006}, {Container: "app", Port: 15008}}
	for _, in := range []*corev1.Pod{tp, p} {
		if got := toPod(in).ReservedPorts; !slices.Equal(got, want) {
			t.Errorf("ReservedPorts = %v, want %v", got, want)
		}
	}
	// Most pods declare none: nothing kept.
	plain := &corev1.Pod{Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Ports: []corev1.ContainerPort{{ContainerPort: 8080}}}}}}
	obj, _ = TrimPod(plain)
	if tp := obj.(*corev1.Pod); tp.Spec.Containers != nil || toPod(tp).ReservedPorts != nil {
		t.Errorf("a pod without reserved ports kept %+v", tp.Spec.Containers)
	}
}
