package readytaint

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/retry"
)

// DefaultKey is the taint key nodes register with when they should take no
// pod before their agent is ready.
const DefaultKey = "ambit.dev/agent-not-ready"

// Config says whose taint to remove and when.
type Config struct {
	Client   kubernetes.Interface
	NodeName string
	// Key is the taint key; every taint with it is removed, whatever its
	// effect and value. Empty: Run does nothing.
	Key string
	// Ready is closed once the agent can enroll pods (its CNI entry is in
	// place and its socket serves). Nothing is read or written before.
	Ready <-chan struct{}
	// MinBackoff and MaxBackoff bound the wait after a failed removal;
	// defaults 1s and 2m.
	MinBackoff, MaxBackoff time.Duration
	// Registerer receives the metrics; nil keeps them private.
	Registerer prometheus.Registerer
	Logger     *slog.Logger
}

// Run removes the taint from the node once Ready is closed, and again
// whenever it comes back, until ctx ends. It returns an error only for a
// Config it cannot work with; API errors are logged and retried.
func Run(ctx context.Context, cfg Config) error {
	if cfg.Key == "" {
		return nil
	}
	if cfg.Client == nil {
		return errors.New("readytaint: Config.Client is required")
	}
	if cfg.NodeName == "" {
		return errors.New("readytaint: Config.NodeName is required")
	}
	if cfg.MinBackoff <= 0 {
		cfg.MinBackoff = time.Second
	}
	if cfg.MaxBackoff <= 0 {
		cfg.MaxBackoff = 2 * time.Minute
	}
	cfg.MaxBackoff = max(cfg.MaxBackoff, cfg.MinBackoff)
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	r := &remover{cfg: cfg, log: cfg.Logger.With("component", "readytaint", "node", cfg.NodeName, "taint", cfg.Key),
		m: newMetrics(cfg.Registerer), kick: make(chan struct{}, 1)}

	if cfg.Ready != nil {
		r.announce(ctx)
		select {
		case <-cfg.Ready:
		case <-ctx.Done():
			return nil
		}
	}

	factory := informers.NewSharedInformerFactoryWithOptions(cfg.Client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", cfg.NodeName).String()
		}))
	inf := factory.Core().V1().Nodes().Informer()
	if err := inf.SetTransform(trimNode); err != nil {
		return fmt.Errorf("readytaint: %w", err)
	}
	var warnedWatch atomic.Bool
	if err := inf.SetWatchErrorHandlerWithContext(func(ctx context.Context, rf *cache.Reflector, err error) {
		if apierrors.IsForbidden(err) {
			// The first look (below) still tries; only a taint put
			// back later goes unseen.
			if !warnedWatch.Swap(true) {
				r.log.Warn("may not watch this node's Node (ClusterRole without nodes list/watch?): a startup taint put back while the agent runs is not removed", "err", err)
			}
			return
		}
		cache.DefaultWatchErrorHandler(ctx, rf, err)
	}); err != nil {
		return fmt.Errorf("readytaint: %w", err)
	}
	onNode := func(obj any) {
		if n, ok := obj.(*corev1.Node); ok && hasKey(n.Spec.Taints, cfg.Key) {
			r.poke()
		}
	}
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    onNode,
		UpdateFunc: func(_, obj any) { onNode(obj) },
	}); err != nil {
		return fmt.Errorf("readytaint: %w", err)
	}
	factory.Start(ctx.Done())
	defer factory.Shutdown()

	r.poke()
	r.loop(ctx)
	return nil
}

type remover struct {
	cfg  Config
	log  *slog.Logger
	m    *metrics
	kick chan struct{}
	// removals so far, for the log line.
	removals int
}

// announce says, when the node carries the taint while the agent starts,
// what it waits for: a node that stays tainted is explained by the last
// line before it (this one, or an error). One read; a failure only
// costs the line.
func (r *remover) announce(ctx context.Context) {
	n, err := r.cfg.Client.CoreV1().Nodes().Get(ctx, r.cfg.NodeName, metav1.GetOptions{})
	if err != nil {
		r.log.Debug("cannot read this node's Node before the agent is ready", "err", err)
		return
	}
	if _, gone := without(n.Spec.Taints, r.cfg.Key); len(gone) > 0 {
		r.log.Info("this node carries the startup taint; removing it once the agent's CNI entry is written and its socket serves", "effects", effects(gone))
	}
}

func (r *remover) poke() {
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

func (r *remover) loop(ctx context.Context) {
	var backoff time.Duration
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.kick:
		}
		err := r.remove(ctx)
		if err == nil {
			backoff = 0
			continue
		}
		if ctx.Err() != nil {
			return
		}
		backoff = min(max(2*backoff, r.cfg.MinBackoff), r.cfg.MaxBackoff)
		r.failed(err, backoff)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		r.poke()
	}
}

// failed logs a failed removal with what the operator can do about it.
func (r *remover) failed(err error, retryIn time.Duration) {
	switch {
	case apierrors.IsForbidden(err) && refusedByPolicy(err):
		// RBAC let the patch through; the admission policy that keeps
		// the agent to its own Node (manifests/base/agent/restriction.yaml)
		// did not. Its message (in err) says which rule.
		r.m.errors.WithLabelValues("policy").Inc()
		r.log.Error("cannot remove the startup taint: refused by the admission policy "+restrictionPolicy+" (its message is in err: a token not bound to this node's pod, or a readyTaint key outside ambit.dev/). Pods that do not tolerate the taint are not scheduled to this node until it is gone; see docs/troubleshooting.md, or remove the taint by hand (kubectl taint node NODE KEY-) once the agent is ready",
			"err", err, "retry_in", retryIn)
	case apierrors.IsForbidden(err):
		r.m.errors.WithLabelValues("forbidden").Inc()
		r.log.Error("cannot remove the startup taint: the agent's ClusterRole lacks patch on nodes (manifests/base/agent/rbac.yaml has it). Pods that do not tolerate the taint are not scheduled to this node until it is gone; grant it, or remove the taint by hand (kubectl taint node NODE KEY-) once the agent is ready",
			"err", err, "retry_in", retryIn)
	case apierrors.IsConflict(err):
		// retry.RetryOnConflict gave up: the Node changes all the time.
		r.m.errors.WithLabelValues("conflict").Inc()
		r.log.Warn("cannot remove the startup taint: the Node kept changing under the patch; retrying", "err", err, "retry_in", retryIn)
	default:
		r.m.errors.WithLabelValues("other").Inc()
		r.log.Warn("cannot remove the startup taint yet; retrying", "err", err, "retry_in", retryIn)
	}
}

// restrictionPolicy is the ValidatingAdmissionPolicy that keeps the
// agent's writes to its own Node (manifests/base/agent/restriction.yaml).
const restrictionPolicy = "ambit-agent-node-restriction"

// refusedByPolicy tells a ValidatingAdmissionPolicy's denial from RBAC's:
// both are 403 Forbidden, and only the message differs (the API server
// writes "ValidatingAdmissionPolicy '<name>' with binding '<name>' denied
// request: ...").
func refusedByPolicy(err error) bool {
	return strings.Contains(err.Error(), "ValidatingAdmissionPolicy")
}

// remove takes every taint with the key off the Node, reading it afresh
// and patching it only if it is still what was read.
func (r *remover) remove(ctx context.Context) error {
	nodes := r.cfg.Client.CoreV1().Nodes()
	return retry.RetryOnConflict(retry.DefaultRetry, func() error {
		n, err := nodes.Get(ctx, r.cfg.NodeName, metav1.GetOptions{})
		if err != nil {
			return err
		}
		keep, gone := without(n.Spec.Taints, r.cfg.Key)
		if len(gone) == 0 {
			return nil
		}
		patch, err := taintPatch(n.ResourceVersion, keep)
		if err != nil {
			return err
		}
		if _, err := nodes.Patch(ctx, r.cfg.NodeName, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
			if apierrors.IsConflict(err) {
				r.m.conflicts.Inc()
			}
			return err
		}
		r.removals++
		r.m.removals.Inc()
		msg := "removed the startup taint: the agent enrolls pods, so pods may be scheduled to this node"
		if r.removals > 1 {
			msg = "removed the startup taint again: someone put it back while the agent is ready"
		}
		r.log.Info(msg, "effects", effects(gone), "other_taints", len(keep))
		return nil
	})
}

// taintPatch is a JSON merge patch that sets spec.taints to keep, valid
// only against the resourceVersion read: the API server checks a
// resourceVersion in a patch as a precondition (409 Conflict otherwise),
// so a taint another controller adds between our read and our write is
// never overwritten. A merge patch replaces the list whole, which is what
// keeps the other taints exactly as read.
func taintPatch(resourceVersion string, keep []corev1.Taint) ([]byte, error) {
	if resourceVersion == "" {
		return nil, errors.New("the Node read has no resourceVersion; refusing an unguarded patch")
	}
	if keep == nil {
		keep = []corev1.Taint{}
	}
	return json.Marshal(map[string]any{
		"metadata": map[string]any{"resourceVersion": resourceVersion},
		"spec":     map[string]any{"taints": keep},
	})
}

func hasKey(ts []corev1.Taint, key string) bool {
	for _, t := range ts {
		if t.Key == key {
			return true
		}
	}
	return false
}

// without splits ts into the taints to keep and those with key.
func without(ts []corev1.Taint, key string) (keep, gone []corev1.Taint) {
	for _, t := range ts {
		if t.Key == key {
			gone = append(gone, t)
		} else {
			keep = append(keep, t)
		}
	}
	return keep, gone
}

func effects(ts []corev1.Taint) string {
	s := make([]string, len(ts))
	for i, t := range ts {
		s[i] = string(t.Effect)
	}
	return strings.Join(s, ",")
}

// trimNode keeps what the informer's handler looks at: a Node's status
// (its images above all) is most of its size.
func trimNode(obj any) (any, error) {
	n, ok := obj.(*corev1.Node)
	if !ok {
		return obj, nil
	}
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: n.Name, ResourceVersion: n.ResourceVersion},
		Spec:       corev1.NodeSpec{Taints: n.Spec.Taints},
	}, nil
}

type metrics struct {
	removals  prometheus.Counter
	conflicts prometheus.Counter
	errors    *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		removals: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ambit_agent_ready_taint_removals_total",
			Help: "Times the agent removed the startup taint (readyTaint) from its Node.",
		}),
		conflicts: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ambit_agent_ready_taint_conflicts_total",
			Help: "Patches of the startup taint refused because the Node changed since it was read (retried at once).",
		}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ambit_agent_ready_taint_errors_total",
			Help: "Failed attempts to remove the startup taint (retried with back-off), by reason: forbidden (RBAC), policy (the admission policy keeping the agent to its own Node), conflict, other.",
		}, []string{"reason"}),
	}
	if reg != nil {
		reg.MustRegister(m.removals, m.conflicts, m.errors)
	}
	return m
}
