package kube

import (
	"net/http"
	"net/netip"
	"sync"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

// podWatches takes over the pod watches of a fake clientset (the local
// and the cluster-wide informer each open one), so a test can cut them
// with 410 Gone and have both informers list again.
type podWatches struct {
	mu      sync.Mutex
	current []*watch.FakeWatcher
	opened  chan struct{}
}

func takeOverPodWatches(client *fake.Clientset) *podWatches {
	w := &podWatches{opened: make(chan struct{}, 16)}
	client.PrependWatchReactor("pods", func(k8stesting.Action) (bool, watch.Interface, error) {
		fw := watch.NewFakeWithChanSize(16, false)
		w.mu.Lock()
		w.current = append(w.current, fw)
		w.mu.Unlock()
		w.opened <- struct{}{}
		return true, fw, nil
	})
	return w
}

// expire ends every open pod watch with 410 Gone and waits until each
// informer has listed and watches again.
func (w *podWatches) expire(t *testing.T) {
	t.Helper()
	w.mu.Lock()
	cur := w.current
	w.current = nil
	w.mu.Unlock()
	for _, fw := range cur {
		fw.Error(&metav1.Status{Status: metav1.StatusFailure, Code: http.StatusGone, Reason: metav1.StatusReasonExpired, Message: "too old resource version"})
	}
	for range cur {
		<-w.opened
	}
}

func (w *podWatches) add(obj *corev1.Pod) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, fw := range w.current {
		fw.Add(obj.DeepCopy())
	}
}

// A StatefulSet pod deleted and made again under its name (new UID, new
// IP) while the agent's pod watch was down: the relist sees one object
// under the key, so the informer reports an update from the old pod to
// the new one, not a deletion. The old pod's directory entry stayed for
// good: its IP kept resolving to a meshed web-0 nobody serves, and when
// that IP went to another pod, the stale entry (never deleting, never
// terminal) won over the new owner once it terminated.
func TestPodRecreatedAcrossARelistLeavesNoStaleIP(t *testing.T) {
	old := pod("shop", "web-0", "old", "node-b", []string{"10.1.0.5"}, nil, enabled)
	client := fake.NewClientset(old)
	watches := takeOverPodWatches(client)
	s, _ := startSource(t, client, Config{})
	<-watches.opened
	<-watches.opened
	oldIP := netip.MustParseAddr("10.1.0.5")
	if wl, ok := s.WorkloadByIP(oldIP); !ok || wl.UID != "uid-old" {
		t.Fatalf("before: %+v %v", wl, ok)
	}

	gvr := corev1.SchemeGroupVersion.WithResource("pods")
	if err := client.Tracker().Delete(gvr, "shop", "web-0"); err != nil {
		t.Fatal(err)
	}
	if err := client.Tracker().Add(pod("shop", "web-0", "new", "node-b", []string{"10.1.0.6"}, nil, enabled)); err != nil {
		t.Fatal(err)
	}
	watches.expire(t)
	// Once the marker resolves, the relist before it was handled.
	watches.add(pod("shop", "marker", "", "node-b", []string{"10.1.0.99"}, nil, nil))
	eventually(t, "the marker pod", func() bool { _, ok := s.WorkloadByIP(netip.MustParseAddr("10.1.0.99")); return ok })

	if wl, ok := s.WorkloadByIP(netip.MustParseAddr("10.1.0.6")); !ok || wl.UID != "uid-new" {
		t.Fatalf("the new web-0's IP: %+v %v", wl, ok)
	}
	if wl, ok := s.WorkloadByIP(oldIP); ok {
		t.Fatalf("after the relist 10.1.0.5 still resolves to %s/%s uid %s (meshed %v): the pod that had it is gone", wl.Namespace, wl.Name, wl.UID, wl.Meshed)
	}

	// The old IP given to another pod, which then terminates: its IP
	// must not fall back to the long-gone web-0.
	other := pod("shop", "job", "", "node-b", []string{"10.1.0.5"}, nil, nil)
	watches.add(other)
	eventually(t, "job owns 10.1.0.5", func() bool { wl, ok := s.WorkloadByIP(oldIP); return ok && wl.UID == "uid-job" })
	now := metav1.Now()
	other.DeletionTimestamp = &now
	watches.add(other)
	watches.add(pod("shop", "marker2", "", "node-b", []string{"10.1.0.98"}, nil, nil))
	eventually(t, "the second marker", func() bool { _, ok := s.WorkloadByIP(netip.MustParseAddr("10.1.0.98")); return ok })
	if wl, ok := s.WorkloadByIP(oldIP); !ok || wl.UID != "uid-job" {
		t.Fatalf("the terminating job's IP resolves to %s/%s uid %s, want the job", wl.Namespace, wl.Name, wl.UID)
	}
}
