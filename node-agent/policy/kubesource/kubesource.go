package kubesource

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/tools/cache"

	"github.com/ambit-mesh/ambit/node-agent/policy"
)

// SourceName is the name under which the cluster's policies reach the
// Engine.
const SourceName = "kubernetes"

// Resources read.
var (
	AuthorizationPolicies = schema.GroupVersionResource{Group: policy.Group, Version: policy.Version, Resource: "authorizationpolicies"}
	InboundModes          = schema.GroupVersionResource{Group: policy.Group, Version: policy.Version, Resource: "inboundmodes"}
	IstioPolicies         = schema.GroupVersionResource{Group: "security.istio.io", Version: "v1", Resource: "authorizationpolicies"}
	IstioPeerAuths        = schema.GroupVersionResource{Group: "security.istio.io", Version: "v1", Resource: "peerauthentications"}
)

// Options wire a Source.
type Options struct {
	Client dynamic.Interface
	// Discovery, when set with Istio, is asked whether Istio's CRD is
	// served before watching it.
	Discovery discovery.DiscoveryInterface
	Engine    *policy.Engine
	Logger    *slog.Logger
	// Istio: also enforce security.istio.io/v1 AuthorizationPolicy (L4
	// subset) when the API server serves it.
	Istio bool
	// WriteStatus: write the Accepted condition of ambit objects.
	WriteStatus bool
	// Resync relists periodically as a safety net; 0 means 10 minutes.
	Resync time.Duration
	// Debounce coalesces bursts of changes; 0 means 50 ms.
	Debounce time.Duration
}

// Source is a running Kubernetes source.
type Source struct {
	o       Options
	log     *slog.Logger
	kick    chan struct{}
	listers map[schema.GroupVersionResource]cache.GenericLister

	synced sync.WaitGroup // done after the first Update
	once   sync.Once
	warned map[string]string // object -> last problem logged (log once)
}

// New validates o.
func New(o Options) (*Source, error) {
	if o.Client == nil || o.Engine == nil {
		return nil, fmt.Errorf("kubesource: Client and Engine are required")
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Resync == 0 {
		o.Resync = 10 * time.Minute
	}
	if o.Debounce == 0 {
		o.Debounce = 50 * time.Millisecond
	}
	s := &Source{o: o, log: o.Logger.With("component", "policy-kube"), kick: make(chan struct{}, 1), warned: map[string]string{},
		listers: map[schema.GroupVersionResource]cache.GenericLister{}}
	s.synced.Add(1)
	return s, nil
}

// WaitSynced blocks until the cluster's policies are in force (the first
// complete Update) or ctx ends. The agent should not report ready before:
// serving pods with no policy would allow what policy denies.
func (s *Source) WaitSynced(ctx context.Context) error {
	done := make(chan struct{})
	go func() { s.synced.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Run watches until ctx ends.
func (s *Source) Run(ctx context.Context) error {
	f := dynamicinformer.NewDynamicSharedInformerFactory(s.o.Client, s.o.Resync)
	gvrs := []schema.GroupVersionResource{AuthorizationPolicies, InboundModes}
	if s.o.Istio {
		for _, gvr := range []schema.GroupVersionResource{IstioPolicies, IstioPeerAuths} {
			if s.served(gvr) {
				gvrs = append(gvrs, gvr)
			}
		}
	}
	handler := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { s.poke() },
		UpdateFunc: func(any, any) { s.poke() },
		DeleteFunc: func(any) { s.poke() },
	}
	var syncs []cache.InformerSynced
	for _, gvr := range gvrs {
		inf := f.ForResource(gvr)
		if _, err := inf.Informer().AddEventHandler(handler); err != nil {
			return err
		}
		s.listers[gvr] = inf.Lister()
		// A CRD not installed (yet) holds no policy: do not wait for it,
		// its informer picks it up once it is served.
		if gvr.Group != policy.Group || s.served(gvr) {
			syncs = append(syncs, inf.Informer().HasSynced)
		}
	}
	f.Start(ctx.Done())
	defer f.Shutdown()
	if !cache.WaitForCacheSync(ctx.Done(), syncs...) {
		return ctx.Err()
	}
	s.sync(ctx)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-s.kick:
			timer.Reset(s.o.Debounce)
		case <-timer.C:
			s.sync(ctx)
		}
	}
}

func (s *Source) poke() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

func (s *Source) served(gvr schema.GroupVersionResource) bool {
	if s.o.Discovery == nil {
		return true // the informer will just keep retrying if it is not
	}
	rl, err := s.o.Discovery.ServerResourcesForGroupVersion(gvr.GroupVersion().String())
	if err == nil {
		for _, r := range rl.APIResources {
			if r.Name == gvr.Resource {
				return true
			}
		}
	}
	s.log.Warn("not served (CRD not installed?)", "resource", gvr.String(), "err", err)
	return false
}

// sync hands the complete set to the Engine and writes statuses.
func (s *Source) sync(ctx context.Context) {
	var set policy.Set
	objs := map[string]*unstructured.Unstructured{} // apiVersion/kind/ns/name
	for gvr, l := range s.listers {
		list, err := l.List(labelsEverything())
		if err != nil {
			s.log.Error("listing", "resource", gvr.Resource, "err", err)
			continue
		}
		for _, o := range list {
			u, ok := o.(*unstructured.Unstructured)
			if !ok {
				continue
			}
			js, err := json.Marshal(u.Object)
			if err == nil {
				err = policy.DecodeObject(js, &set)
			}
			if err != nil {
				s.log.Error("unreadable object", "resource", gvr.Resource, "namespace", u.GetNamespace(), "name", u.GetName(), "err", err)
				continue
			}
			objs[key(u.GetAPIVersion(), u.GetKind(), u.GetNamespace(), u.GetName())] = u
		}
	}
	results := s.o.Engine.Update(SourceName, set)
	s.once.Do(s.synced.Done)
	warned := map[string]string{}
	for _, r := range results {
		k := key(r.APIVersion, r.Kind, r.Namespace, r.Name)
		u := objs[k]
		if u == nil {
			continue
		}
		if !r.Accepted {
			if s.warned[k] != r.Message {
				s.log.Warn("policy not accepted", "apiVersion", r.APIVersion, "kind", r.Kind, "namespace", r.Namespace, "name", r.Name, "reason", r.Reason, "message", r.Message)
			}
			warned[k] = r.Message
		}
		if !s.o.WriteStatus || r.APIVersion != policy.APIVersion {
			continue
		}
		if err := s.writeStatus(ctx, u, r); err != nil {
			s.log.Warn("status not written", "kind", r.Kind, "namespace", r.Namespace, "name", r.Name, "err", err)
		}
	}
	s.warned = warned
}

func key(apiVersion, kind, ns, name string) string {
	return apiVersion + "/" + kind + "/" + ns + "/" + name
}

// Condition builds the Accepted condition for a result.
func Condition(r policy.Result, now time.Time) metav1.Condition {
	c := metav1.Condition{
		Type:               policy.ConditionAccepted,
		Status:             metav1.ConditionTrue,
		ObservedGeneration: r.Generation,
		LastTransitionTime: metav1.NewTime(now),
		Reason:             r.Reason,
		Message:            r.Message,
	}
	if !r.Accepted {
		c.Status = metav1.ConditionFalse
	}
	if c.Message == "" {
		c.Message = "enforced by the node agents"
	}
	if len(c.Message) > 32768 {
		c.Message = c.Message[:32700] + " …(truncated)"
	}
	return c
}

// writeStatus sets the Accepted condition when it differs from the stored
// one. Conflicts are ignored: another agent wrote the same verdict, or a
// newer object will bring a new sync.
func (s *Source) writeStatus(ctx context.Context, u *unstructured.Unstructured, r policy.Result) error {
	var st policy.Status
	if raw, ok := u.Object["status"].(map[string]any); ok {
		_ = runtime.DefaultUnstructuredConverter.FromUnstructured(raw, &st)
	}
	want := Condition(r, time.Now())
	if cur := meta.FindStatusCondition(st.Conditions, want.Type); cur != nil &&
		cur.Status == want.Status && cur.Reason == want.Reason && cur.Message == want.Message &&
		cur.ObservedGeneration == want.ObservedGeneration {
		return nil
	}
	conds := slices.Clone(st.Conditions)
	meta.SetStatusCondition(&conds, want) // keeps LastTransitionTime unless Status flips
	st.Conditions = conds
	raw, err := runtime.DefaultUnstructuredConverter.ToUnstructured(&st)
	if err != nil {
		return err
	}
	obj := u.DeepCopy()
	obj.Object["status"] = raw
	gvr := AuthorizationPolicies
	if r.Kind == policy.KindInboundMode {
		gvr = InboundModes
	}
	_, err = s.o.Client.Resource(gvr).Namespace(u.GetNamespace()).UpdateStatus(ctx, obj, metav1.UpdateOptions{FieldManager: "ambit-agent"})
	if apierrors.IsConflict(err) || apierrors.IsNotFound(err) {
		return nil
	}
	return err
}
