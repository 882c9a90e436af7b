package agent

import (
	"strings"
	"time"
)

// defaultLiveRetryEvery: a failed live enrollment (the CA down when a
// namespace turned ambient, a namespace refused as another pod's, a
// rule failure) was tried again only at the pod's next event or a
// resync, and the kube view's resync is off: a pod whose failure had
// cleared stayed outside the mesh, in plaintext, until something touched
// it. Half a minute keeps the retries cheap (one pass over the failed
// pods, usually none) and the wait short against a kubelet's own
// back-off.
const defaultLiveRetryEvery = 30 * time.Second

// noteLive records how a pod's live enrollment ended: failed pods are
// tried again by retryLive, others forgotten.
func (a *Agent) noteLive(namespace, name string, failed bool) {
	k := namespace + "/" + name
	a.mu.Lock()
	defer a.mu.Unlock()
	if failed {
		a.liveFailed[k] = struct{}{}
	} else {
		delete(a.liveFailed, k)
	}
}

// retryLive queues every pod whose last live enrollment failed.
func (a *Agent) retryLive() {
	a.mu.Lock()
	keys := make([]key, 0, len(a.liveFailed))
	for k := range a.liveFailed {
		ns, name, _ := strings.Cut(k, "/")
		keys = append(keys, key{kind: keyPod, namespace: ns, name: name})
	}
	a.mu.Unlock()
	for _, k := range keys {
		a.queue.add(k)
	}
}
