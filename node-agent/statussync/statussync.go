package statussync

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/client-go/util/workqueue"

	"github.com/ambit-mesh/ambit/node-agent/cluster"
)

// Writer writes the annotation (kube.Source.SetRedirection; "" removes
// it). The pod's UID, when set, must make the write fail for another pod
// of the same name.
type Writer interface {
	SetRedirection(ctx context.Context, pod cluster.Pod, state string) error
}

// Reader says what a pod carries now, from a cache (no API call):
// kube.Source.Redirection. found is false for a pod the cache does not
// hold.
type Reader interface {
	Redirection(namespace, name string) (uid, state string, found bool)
}

// Options configure a Syncer. Zero durations take the defaults.
type Options struct {
	Writer Writer
	// Reader, if nil, leaves the Syncer without a view of the pods: it
	// writes each wanted state until one write succeeds, and has no
	// periodic pass (the static inventory, whose writer only logs).
	Reader Reader
	// Interval between periodic passes; default 5s.
	Interval time.Duration
	// Settle: for this long after a successful write, a cache that still
	// shows the old value is taken as not caught up yet rather than as a
	// lost write; default 2s. Keep it below Interval.
	Settle time.Duration
	// MinRetry and MaxRetry bound the per-pod backoff after a failed
	// write; default 200ms and 10s.
	MinRetry, MaxRetry time.Duration
	// Timeout bounds one write; default 5s.
	Timeout time.Duration
	// Workers write in parallel (each pod by one at a time); default 4.
	// The client's rate limiter, not this, bounds the rate.
	Workers    int
	Registerer prometheus.Registerer
	Logger     *slog.Logger
}

// Syncer keeps the annotation of each pod it is told about at the state
// wanted last. Its methods never block on the API server.
type Syncer struct {
	o Options
	q workqueue.TypedRateLimitingInterface[string]

	mu   sync.Mutex
	want map[string]*entry // namespace/name

	writes     *prometheus.CounterVec
	outOfSync  prometheus.Gauge
	passesDone chan struct{} // tests: a value after each periodic pass
}

// entry is one pod's wanted state and what the last write achieved.
type entry struct {
	pod   cluster.Pod // namespace, name, UID only
	state string
	// wrote: the API server acknowledged written at at.
	wrote   bool
	written string
	at      time.Time
	// failures in a row, for the logs.
	failures int
}

// New returns a Syncer; Run starts it.
func New(o Options) (*Syncer, error) {
	if o.Writer == nil {
		return nil, errors.New("statussync: Options.Writer is required")
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&o.Interval, 5*time.Second)
	def(&o.Settle, 2*time.Second)
	def(&o.MinRetry, 200*time.Millisecond)
	def(&o.MaxRetry, 10*time.Second)
	def(&o.Timeout, 5*time.Second)
	if o.MaxRetry < o.MinRetry {
		o.MaxRetry = o.MinRetry
	}
	if o.Workers <= 0 {
		o.Workers = 4
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	s := &Syncer{
		o: o,
		q: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.NewTypedItemExponentialFailureRateLimiter[string](o.MinRetry, o.MaxRetry),
			workqueue.TypedRateLimitingQueueConfig[string]{}),
		want: map[string]*entry{},
		writes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ambit_agent_status_writes_total",
			Help: "Writes of pods' ambit.dev/redirection annotation, by result: ok, error (retried with backoff), gone (the pod was deleted or replaced; dropped).",
		}, []string{"result"}),
		outOfSync: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "ambit_agent_status_out_of_sync_pods",
			Help: "Pods whose ambit.dev/redirection annotation differed from what the agent wants at the last periodic pass (being written or retried).",
		}),
	}
	if o.Registerer != nil {
		if err := o.Registerer.Register(s.writes); err != nil {
			return nil, err
		}
		if err := o.Registerer.Register(s.outOfSync); err != nil {
			return nil, err
		}
	}
	return s, nil
}

func keyOf(namespace, name string) string { return namespace + "/" + name }

// Set wants state for pod from now on ("" = no annotation). The latest
// call wins; the write happens in the background.
func (s *Syncer) Set(pod cluster.Pod, state string) {
	k := keyOf(pod.Namespace, pod.Name)
	s.mu.Lock()
	e := s.want[k]
	if e == nil || (pod.UID != "" && e.pod.UID != pod.UID) {
		// A new pod of that name: what was written was written to the
		// old one.
		e = &entry{}
		s.want[k] = e
	}
	e.pod = cluster.Pod{Namespace: pod.Namespace, Name: pod.Name, UID: pod.UID}
	e.state = state
	s.mu.Unlock()
	s.q.Add(k)
}

// Forget stops keeping the pod's annotation (the pod or its sandbox is
// gone); nothing is written. uid, if set, forgets only that pod, not a
// newer one of the same name.
func (s *Syncer) Forget(namespace, name, uid string) {
	k := keyOf(namespace, name)
	s.mu.Lock()
	if e := s.want[k]; e != nil && (uid == "" || e.pod.UID == "" || e.pod.UID == uid) {
		delete(s.want, k)
	}
	s.mu.Unlock()
}

// Changed tells that the pod changed in the cache (an informer event):
// it is compared again, and written if it differs.
func (s *Syncer) Changed(namespace, name string) {
	k := keyOf(namespace, name)
	s.mu.Lock()
	_, ok := s.want[k]
	s.mu.Unlock()
	if ok {
		s.q.Add(k)
	}
}

// Wanted returns the state wanted for the pod, if any (tests, debugging).
func (s *Syncer) Wanted(namespace, name string) (string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e := s.want[keyOf(namespace, name)]; e != nil {
		return e.state, true
	}
	return "", false
}

// Run writes until ctx ends; a write in flight then is abandoned.
func (s *Syncer) Run(ctx context.Context) {
	var wg sync.WaitGroup
	for range s.o.Workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for s.next(ctx) {
			}
		}()
	}
	if s.o.Reader != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t := time.NewTicker(s.o.Interval)
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
					s.pass()
				}
			}
		}()
	}
	<-ctx.Done()
	s.q.ShutDown()
	wg.Wait()
}

// snapshot is an entry's fields read under the lock.
type snapshot struct {
	e *entry
	entry
}

func (s *Syncer) get(k string) (snapshot, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.want[k]
	if e == nil {
		return snapshot{}, false
	}
	return snapshot{e: e, entry: *e}, true
}

// inSync reports whether the pod carries the wanted state, as far as the
// Syncer can tell. A pod the cache does not hold needs no removal, but
// may need "enabled" (a pod created a moment ago; a deleted pod answers
// 404 and is dropped).
func (s *Syncer) inSync(v snapshot) bool {
	if s.o.Reader == nil {
		return v.wrote && v.written == v.state
	}
	uid, cur, found := s.o.Reader.Redirection(v.pod.Namespace, v.pod.Name)
	if !found {
		return v.state == ""
	}
	if v.pod.UID != "" && uid != v.pod.UID {
		// The cache holds another pod of that name (an older one not
		// yet deleted, or a newer one): let the UID-carrying write
		// decide.
		return false
	}
	return cur == v.state
}

// confirmed records that the cache showed the wanted state: a later
// difference is a change, not a cache that has yet to catch up.
func (s *Syncer) confirmed(v snapshot) {
	s.mu.Lock()
	if s.want[keyOf(v.pod.Namespace, v.pod.Name)] == v.e && v.e.state == v.state {
		v.e.at = time.Time{}
	}
	s.mu.Unlock()
}

// settling: the last write put the wanted state less than Settle ago, so
// a cache that disagrees has probably not caught up yet.
func (s *Syncer) settling(v snapshot) bool {
	return v.wrote && v.written == v.state && !v.at.IsZero() && time.Since(v.at) < s.o.Settle
}

// next processes one pod from the queue; false once the queue is shut.
func (s *Syncer) next(ctx context.Context) bool {
	k, shutdown := s.q.Get()
	if shutdown {
		return false
	}
	defer s.q.Done(k)
	v, ok := s.get(k)
	in := ok && s.inSync(v)
	if in {
		s.confirmed(v)
	}
	if !ok || in || s.settling(v) {
		// Forgotten, right already, or written a moment ago (the
		// periodic pass looks again).
		s.q.Forget(k)
		return true
	}
	wctx, cancel := context.WithTimeout(ctx, s.o.Timeout)
	err := s.o.Writer.SetRedirection(wctx, v.pod, v.state)
	cancel()
	if err != nil && ctx.Err() != nil {
		return true // stopping
	}
	log := s.o.Logger.With("pod", k, "state", v.state)
	s.mu.Lock()
	current := s.want[k] == v.e && v.e.pod.UID == v.pod.UID
	var failures int
	if current {
		if err == nil {
			failures = v.e.failures
			v.e.wrote, v.e.written, v.e.at, v.e.failures = true, v.state, time.Now(), 0
		} else if gone(err) {
			delete(s.want, k)
		} else {
			v.e.failures++
			failures = v.e.failures
		}
	}
	s.mu.Unlock()
	switch {
	case err == nil:
		s.writes.WithLabelValues("ok").Inc()
		s.q.Forget(k)
		if failures > 0 {
			log.Info("pod status annotation written after failed attempts", "failures", failures)
		} else if v.wrote && v.written == v.state {
			// Written before and found different since: someone
			// removed or changed it, or the write was lost.
			log.Info("pod status annotation was changed by someone else; written again")
		}
	case gone(err):
		s.writes.WithLabelValues("gone").Inc()
		s.q.Forget(k)
		log.Debug("pod status annotation: pod gone", "err", err)
	default:
		s.writes.WithLabelValues("error").Inc()
		if failures == 1 {
			log.Warn("writing the pod status annotation failed; retrying with backoff", "err", err)
		} else {
			log.Debug("writing the pod status annotation failed again", "failures", failures, "err", err)
		}
		s.q.AddRateLimited(k)
	}
	return true
}

// gone: the pod does not exist any more, or the name now belongs to
// another pod (the UID in the patch is refused as an invalid change).
// Retrying cannot help.
func gone(err error) bool {
	return apierrors.IsNotFound(err) || apierrors.IsInvalid(err) || apierrors.IsGone(err)
}

// pass compares every pod and queues those that differ, except pods in
// backoff (their retry is queued already) and those written a moment ago.
func (s *Syncer) pass() {
	s.mu.Lock()
	all := make([]snapshot, 0, len(s.want))
	for _, e := range s.want {
		all = append(all, snapshot{e: e, entry: *e})
	}
	s.mu.Unlock()
	differ := 0
	for _, v := range all {
		if s.inSync(v) {
			s.confirmed(v)
			if v.state == "" {
				// Nothing to remove and nothing to keep: a pod
				// unenrolled and since deleted, or never annotated.
				s.mu.Lock()
				if s.want[keyOf(v.pod.Namespace, v.pod.Name)] == v.e && v.e.state == "" {
					if _, _, found := s.o.Reader.Redirection(v.pod.Namespace, v.pod.Name); !found {
						delete(s.want, keyOf(v.pod.Namespace, v.pod.Name))
					}
				}
				s.mu.Unlock()
			}
			continue
		}
		differ++
		k := keyOf(v.pod.Namespace, v.pod.Name)
		if s.q.NumRequeues(k) > 0 || s.settling(v) {
			continue
		}
		s.q.Add(k)
	}
	s.outOfSync.Set(float64(differ))
	if s.passesDone != nil {
		select {
		case s.passesDone <- struct{}{}:
		default:
		}
	}
}
