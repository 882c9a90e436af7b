package agent

import (
	"context"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/kube"
	"github.com/ambit-mesh/ambit/node-agent/state"
	"github.com/ambit-mesh/ambit/plugin/redirect"
)

func annotatedPod(name, node string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "apps", Name: name, UID: types.UID("uid-" + name),
			Annotations: map[string]string{kube.RedirectionAnnotation: kube.StateEnabled}},
		Spec: corev1.PodSpec{NodeName: node},
	}
}

// TestUnenrollAllWithoutAPI: the API server cannot be reached (a real
// client dialling a closed port). The local part is still done — rules
// out of every pod, records unenrolled — and the error says the
// annotations were not cleared, and why, so the uninstaller exits
// non-zero and its restart tries again.
func TestUnenrollAllWithoutAPI(t *testing.T) {
	testenv.RequireRoot(t)
	dir, _ := os.MkdirTemp("", "amb-agt-")
	t.Cleanup(func() { os.RemoveAll(dir) })
	h := startAgent(t, dir, invAmbient)
	pod := newNetns(t, "10.73.1.2/24")
	enrollLikePlugin(t, h, "web-0", pod, "10.73.1.2/24")
	h.stop()

	// A port nothing listens on: connection refused at once.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	client, err := kubernetes.NewForConfig(&rest.Config{Host: "http://" + addr, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	clear := func(ctx context.Context) ([]string, error) { return kube.ClearRedirections(ctx, client, "node-1") }
	err = UnenrollAll(context.Background(), dir, "/proc", Rules{}, clear, quietLogger())
	if err == nil || !strings.Contains(err.Error(), "API server") || !strings.Contains(err.Error(), "connection refused") || !strings.Contains(err.Error(), kube.RedirectionAnnotation) {
		t.Fatalf("UnenrollAll with the API server unreachable = %v, want an error saying the annotations were not cleared", err)
	}
	t.Logf("reported: %v", err)
	withNS(pod.file, func(n ns.NetNS) error {
		if found, _ := redirect.Installed(context.Background(), n); len(found) > 0 {
			t.Errorf("the local part was not done: rules left %v", found)
		}
		return nil
	})
	recs, _ := state.Open(dir)
	list, _ := recs.List()
	for _, r := range list {
		if r.Enrolled {
			t.Fatalf("record still enrolled: %+v", r)
		}
	}
}
