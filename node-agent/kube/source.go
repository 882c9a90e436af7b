package kube

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"

	"github.com/ambit-mesh/ambit/node-agent/cluster"
)

// DefaultLabelKey is the enrollment label of the contract.
const DefaultLabelKey = "ambit.dev/dataplane-mode"

// Config configures a Source.
type Config struct {
	// Client talks to the API server (a fake clientset in unit tests).
	Client kubernetes.Interface
	// NodeName is this node; required.
	NodeName string
	// TrustDomain makes identities spiffe://<td>/ns/<ns>/sa/<sa>;
	// default cluster.local.
	TrustDomain string
	// Decide is the agent's enrollment rule. nil uses LabelDecider with
	// DefaultLabelKey and no excluded namespaces.
	Decide func(cluster.Pod, cluster.Namespace) bool
	// GetTimeout bounds the direct GET of a pod not yet in the cache;
	// default 2s.
	GetTimeout time.Duration
	// Resync is the informers' resync period; 0 (default) disables it:
	// watches deliver every change and the agent reconciles on its own.
	Resync time.Duration
	// Component names the source of Kubernetes Events; default
	// "ambit-agent".
	Component string
	// Recorder overrides the event recorder (tests); nil builds one that
	// writes Events through Client.
	Recorder record.EventRecorder
	Logger   *slog.Logger
}

// Source is the Kubernetes-backed cluster.View and cluster.StatusWriter.
type Source struct {
	cfg    Config
	log    *slog.Logger
	decide func(cluster.Pod, cluster.Namespace) bool

	localFactory informers.SharedInformerFactory
	nodeFactory  informers.SharedInformerFactory
	factory      informers.SharedInformerFactory
	localPods    cache.SharedIndexInformer
	allPods      cache.SharedIndexInformer
	namespaces   cache.SharedIndexInformer
	services     cache.SharedIndexInformer
	slices       cache.SharedIndexInformer
	node         cache.SharedIndexInformer // this node only: its zone
	nodes        cache.SharedIndexInformer // every node: their addresses (NodePorts)
	// nodeSynced: the zone of the initial list is applied (the
	// handler ran, not just the cache filled), so a synced Source
	// resolves with its topology from the first connection.
	nodeSynced cache.ResourceEventHandlerRegistration
	// nodeForbidden: the agent may not read its Node (a ClusterRole from
	// before topology, an image-only upgrade). Its zone is then unknown,
	// as for a node without the label, and the agent serves without
	// topology rather than never becoming ready.
	nodeForbidden atomic.Bool
	// nodesSynced, nodesForbidden: the same for the list of every Node
	// (their addresses, for NodePorts). Forbidden (a ClusterRole that
	// allows only this node, or none), connections to NodePorts are
	// passed through as before; readiness does not wait for it.
	nodesSynced    cache.ResourceEventHandlerRegistration
	nodesForbidden atomic.Bool
	// handlersSynced: the handlers that build the workload directory
	// and the Service index (all pods, Services, EndpointSlices) have
	// run over the initial lists. An informer's own HasSynced says only
	// that its store is filled; its handlers run after, on their own
	// goroutines.
	handlersSynced []cache.ResourceEventHandlerRegistration

	dir  directory
	svc  serviceIndex
	wait podWait

	subMu sync.RWMutex
	subs  []func(cluster.Event)

	broadcaster record.EventBroadcaster
	recorder    record.EventRecorder

	startOnce sync.Once
	closeOnce sync.Once
}

var (
	_ cluster.View         = (*Source)(nil)
	_ cluster.StatusWriter = (*Source)(nil)
)

const sliceByService = "service"

// New builds the informers and indexes; nothing talks to the API server
// before Start.
func New(cfg Config) (*Source, error) {
	if cfg.Client == nil {
		return nil, errors.New("kube: Config.Client is required")
	}
	if cfg.NodeName == "" {
		return nil, errors.New("kube: Config.NodeName is required (set NODE_NAME from spec.nodeName)")
	}
	if cfg.TrustDomain == "" {
		cfg.TrustDomain = "cluster.local"
	}
	if cfg.GetTimeout <= 0 {
		cfg.GetTimeout = 2 * time.Second
	}
	if cfg.Component == "" {
		cfg.Component = "ambit-agent"
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	s := &Source{cfg: cfg, log: cfg.Logger.With("source", "kubernetes"), decide: cfg.Decide}
	if s.decide == nil {
		s.decide = LabelDecider(DefaultLabelKey)
	}
	s.dir.init(cfg.TrustDomain)
	s.svc.init()
	s.wait.init()

	s.localFactory = informers.NewSharedInformerFactoryWithOptions(cfg.Client, cfg.Resync,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", cfg.NodeName).String()
		}))
	// The agent's own Node, for its zone (topology hints): one object,
	// watched so a relabelled node takes effect without a restart.
	s.nodeFactory = informers.NewSharedInformerFactoryWithOptions(cfg.Client, cfg.Resync,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", cfg.NodeName).String()
		}))
	s.factory = informers.NewSharedInformerFactory(cfg.Client, cfg.Resync)

	s.localPods = s.localFactory.Core().V1().Pods().Informer()
	s.allPods = s.factory.Core().V1().Pods().Informer()
	s.namespaces = s.factory.Core().V1().Namespaces().Informer()
	s.services = s.factory.Core().V1().Services().Informer()
	s.slices = s.factory.Discovery().V1().EndpointSlices().Informer()
	s.node = s.nodeFactory.Core().V1().Nodes().Informer()
	s.nodes = s.factory.Core().V1().Nodes().Informer()

	for _, x := range []struct {
		inf cache.SharedIndexInformer
		fn  cache.TransformFunc
	}{
		{s.localPods, TrimPod}, {s.allPods, TrimPod}, {s.namespaces, TrimNamespace},
		{s.services, TrimService}, {s.slices, TrimEndpointSlice}, {s.node, TrimNode}, {s.nodes, TrimNode},
	} {
		if err := x.inf.SetTransform(x.fn); err != nil {
			return nil, fmt.Errorf("kube: set transform: %w", err)
		}
	}
	if err := s.slices.AddIndexers(cache.Indexers{sliceByService: func(obj any) ([]string, error) {
		es, ok := obj.(*discoveryv1.EndpointSlice)
		if !ok || es.Labels[discoveryv1.LabelServiceName] == "" {
			return nil, nil
		}
		return []string{es.Namespace + "/" + es.Labels[discoveryv1.LabelServiceName]}, nil
	}}); err != nil {
		return nil, fmt.Errorf("kube: add indexer: %w", err)
	}

	if _, err := s.localPods.AddEventHandler(cache.ResourceEventHandlerDetailedFuncs{
		AddFunc:    s.onLocalAdd,
		UpdateFunc: s.onLocalUpdate,
		DeleteFunc: s.onLocalDelete,
	}); err != nil {
		return nil, err
	}
	reg, err := s.allPods.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { s.dir.upsert(obj); s.podArrived(obj) },
		UpdateFunc: s.podUpdated,
		DeleteFunc: func(obj any) { s.dir.remove(obj) },
	})
	if err != nil {
		return nil, err
	}
	s.handlersSynced = append(s.handlersSynced, reg)
	if _, err := s.namespaces.AddEventHandler(cache.ResourceEventHandlerDetailedFuncs{
		AddFunc: func(obj any, initial bool) {
			if n, ok := obj.(*corev1.Namespace); ok && !initial {
				s.emit(cluster.Event{Kind: cluster.NamespaceChanged, Namespace: n.Name})
			}
		},
		UpdateFunc: func(oldObj, obj any) {
			o, ok1 := oldObj.(*corev1.Namespace)
			n, ok2 := obj.(*corev1.Namespace)
			if ok1 && ok2 && !mapsEqual(o.Labels, n.Labels) {
				s.emit(cluster.Event{Kind: cluster.NamespaceChanged, Namespace: n.Name})
			}
		},
	}); err != nil {
		return nil, err
	}
	svcHandler := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { s.serviceTouched(obj) },
		UpdateFunc: func(_, obj any) { s.serviceTouched(obj) },
		DeleteFunc: func(obj any) { s.serviceTouched(obj) },
	}
	reg, err = s.services.AddEventHandler(svcHandler)
	if err != nil {
		return nil, err
	}
	s.handlersSynced = append(s.handlersSynced, reg)
	sliceHandler := svcHandler
	// A slice moved to another Service (or unlabeled) leaves its old
	// one too: rebuild both.
	sliceHandler.UpdateFunc = func(oldObj, obj any) {
		o, ok1 := oldObj.(*discoveryv1.EndpointSlice)
		n, ok2 := obj.(*discoveryv1.EndpointSlice)
		if ok1 && ok2 && o.Labels[discoveryv1.LabelServiceName] != n.Labels[discoveryv1.LabelServiceName] {
			s.serviceTouched(oldObj)
		}
		s.serviceTouched(obj)
	}
	reg, err = s.slices.AddEventHandler(sliceHandler)
	if err != nil {
		return nil, err
	}
	s.handlersSynced = append(s.handlersSynced, reg)
	if err := s.node.SetWatchErrorHandlerWithContext(func(ctx context.Context, r *cache.Reflector, err error) {
		if apierrors.IsForbidden(err) {
			if !s.nodeForbidden.Swap(true) {
				s.log.Warn("may not read this node's Node object (ClusterRole without nodes get/list/watch?): topology hints are not used", "node", s.cfg.NodeName, "err", err)
			}
			return
		}
		cache.DefaultWatchErrorHandler(ctx, r, err)
	}); err != nil {
		return nil, err
	}
	reg, err = s.node.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    s.nodeSeen,
		UpdateFunc: func(_, obj any) { s.nodeSeen(obj) },
		// A deleted Node keeps its last zone: the agent goes with it.
	})
	if err != nil {
		return nil, err
	}
	s.nodeSynced = reg
	if err := s.nodes.SetWatchErrorHandlerWithContext(func(ctx context.Context, r *cache.Reflector, err error) {
		if apierrors.IsForbidden(err) {
			if !s.nodesForbidden.Swap(true) {
				s.log.Warn("may not list Nodes (ClusterRole without nodes list/watch?): connections from pods to <node address>:<nodePort> are passed through, not resolved to the Service's endpoints", "err", err)
			}
			return
		}
		cache.DefaultWatchErrorHandler(ctx, r, err)
	}); err != nil {
		return nil, err
	}
	reg, err = s.nodes.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    s.nodeChanged,
		UpdateFunc: func(_, obj any) { s.nodeChanged(obj) },
		DeleteFunc: func(obj any) {
			if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = t.Obj
			}
			if n, ok := obj.(*corev1.Node); ok {
				s.nodeAddresses(n.Name, nil)
			}
		},
	})
	if err != nil {
		return nil, err
	}
	s.nodesSynced = reg

	s.recorder = cfg.Recorder
	return s, nil
}

// Start runs the informers (and the Kubernetes Event broadcaster) until ctx
// is done. Call Subscribe before Start to see every change.
func (s *Source) Start(ctx context.Context) {
	s.startOnce.Do(func() {
		if s.recorder == nil {
			s.broadcaster = record.NewBroadcaster(record.WithContext(ctx))
			s.broadcaster.StartRecordingToSink(&eventSink{client: s.cfg.Client})
			s.recorder = s.broadcaster.NewRecorder(eventScheme, corev1.EventSource{Component: s.cfg.Component, Host: s.cfg.NodeName})
		}
		s.localFactory.Start(ctx.Done())
		s.nodeFactory.Start(ctx.Done())
		s.factory.Start(ctx.Done())
	})
}

// Close stops the event broadcaster. Informers stop with Start's context.
func (s *Source) Close() {
	s.closeOnce.Do(func() {
		if s.broadcaster != nil {
			s.broadcaster.Shutdown()
		}
	})
}

// WaitSynced blocks until every informer has its first full list and
// the workload directory and Service index are built from them: a
// connection resolved before would take a meshed pod, or a Service
// address, not handled yet for one outside the mesh (plaintext).
func (s *Source) WaitSynced(ctx context.Context) error {
	syncs := []cache.InformerSynced{s.localPods.HasSynced, s.allPods.HasSynced,
		s.namespaces.HasSynced, s.services.HasSynced, s.slices.HasSynced,
		func() bool { return s.nodeForbidden.Load() || s.nodeSynced.HasSynced() },
		func() bool { return s.nodesForbidden.Load() || s.nodesSynced.HasSynced() }}
	for _, r := range s.handlersSynced {
		syncs = append(syncs, r.HasSynced)
	}
	if !cache.WaitForCacheSync(ctx.Done(), syncs...) {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("kube: waiting for informers: %w", err)
		}
		return errors.New("kube: informers did not sync")
	}
	return nil
}

// podUpdated is the cluster-wide pod informer's update: an IP, or a new
// UID under the name.
func (s *Source) podUpdated(oldObj, obj any) {
	// A relist after a watch gap reports a pod deleted and made again
	// under its name (a StatefulSet's) as an update: the old UID's entry
	// must go, or its IP stays claimed.
	o, ok1 := oldObj.(*corev1.Pod)
	p, ok2 := obj.(*corev1.Pod)
	if ok1 && ok2 {
		s.dir.replace(o, p)
	} else {
		s.dir.upsert(obj)
	}
	s.podArrived(obj)
}

// nodeSeen takes the zone of this node's Node object (the field selector
// already asks for it alone; the name check keeps a server or fake that
// ignores the selector from mixing nodes up).
func (s *Source) nodeSeen(obj any) {
	n, ok := obj.(*corev1.Node)
	if !ok || n.Name != s.cfg.NodeName {
		return
	}
	s.setZone(n.Labels[corev1.LabelTopologyZone])
}

// nodeChanged records the addresses of a Node (any node) kube-proxy
// serves NodePorts on.
func (s *Source) nodeChanged(obj any) {
	if n, ok := obj.(*corev1.Node); ok {
		s.nodeAddresses(n.Name, nodeIPs(n))
	}
}

// Pod returns a pod from the caches, falling back to one direct GET with
// Config.GetTimeout for a pod created a moment ago. A pod that does not
// exist is (Pod{}, false, nil).
func (s *Source) Pod(ctx context.Context, namespace, name string) (cluster.Pod, bool, error) {
	key := namespace + "/" + name
	for _, store := range []cache.Store{s.localPods.GetStore(), s.allPods.GetStore()} {
		if obj, ok, _ := store.GetByKey(key); ok {
			if p, ok := obj.(*corev1.Pod); ok {
				return toPod(p), true, nil
			}
		}
	}
	return s.LivePod(ctx, namespace, name)
}

// LivePod reads a pod from the API server, not the caches, with
// Config.GetTimeout: an ADD whose sandbox's UID is not the cached pod's
// (the pod deleted and made again under its name, the deletion not yet
// seen by the informer) decides on the pod the sandbox is for. A pod
// that does not exist is (Pod{}, false, nil).
func (s *Source) LivePod(ctx context.Context, namespace, name string) (cluster.Pod, bool, error) {
	key := namespace + "/" + name
	gctx, cancel := context.WithTimeout(ctx, s.cfg.GetTimeout)
	defer cancel()
	p, err := s.cfg.Client.CoreV1().Pods(namespace).Get(gctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return cluster.Pod{}, false, nil
	}
	if err != nil {
		return cluster.Pod{}, false, fmt.Errorf("kube: get pod %s: %w", key, err)
	}
	// The same view as from the cache (of annotations, only those TrimPod keeps).
	t, _ := TrimPod(p)
	return toPod(t.(*corev1.Pod)), true, nil
}

// Namespace returns a namespace from the cache.
func (s *Source) Namespace(name string) (cluster.Namespace, bool) {
	obj, ok, _ := s.namespaces.GetStore().GetByKey(name)
	if !ok {
		return cluster.Namespace{}, false
	}
	n, ok := obj.(*corev1.Namespace)
	if !ok {
		return cluster.Namespace{}, false
	}
	return toNamespace(n), true
}

// LocalPods lists the pods scheduled on this node, sorted by namespace and
// name so callers iterate deterministically.
func (s *Source) LocalPods() []cluster.Pod {
	objs := s.localPods.GetStore().List()
	out := make([]cluster.Pod, 0, len(objs))
	for _, o := range objs {
		if p, ok := o.(*corev1.Pod); ok {
			out = append(out, toPod(p))
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Namespace != out[j].Namespace {
			return out[i].Namespace < out[j].Namespace
		}
		return out[i].Name < out[j].Name
	})
	return out
}

// Subscribe registers fn for change events of local pods and namespaces.
// fn runs on an informer goroutine and must not block. Objects of the
// initial list raise no events: the agent does a full pass after
// WaitSynced.
func (s *Source) Subscribe(fn func(cluster.Event)) {
	s.subMu.Lock()
	s.subs = append(s.subs, fn)
	s.subMu.Unlock()
}

func (s *Source) emit(ev cluster.Event) {
	s.subMu.RLock()
	defer s.subMu.RUnlock()
	for _, fn := range s.subs {
		fn(ev)
	}
}

func (s *Source) onLocalAdd(obj any, initial bool) {
	p, ok := obj.(*corev1.Pod)
	if !ok || initial {
		return
	}
	s.emit(cluster.Event{Kind: cluster.PodChanged, Namespace: p.Namespace, Name: p.Name, UID: string(p.UID)})
}

func (s *Source) onLocalUpdate(oldObj, obj any) {
	o, ok1 := oldObj.(*corev1.Pod)
	p, ok2 := obj.(*corev1.Pod)
	if !ok1 || !ok2 || !podChanged(o, p) {
		return
	}
	s.emit(cluster.Event{Kind: cluster.PodChanged, Namespace: p.Namespace, Name: p.Name, UID: string(p.UID)})
}

func (s *Source) onLocalDelete(obj any) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return
	}
	s.emit(cluster.Event{Kind: cluster.PodDeleted, Namespace: p.Namespace, Name: p.Name, UID: string(p.UID)})
}

// podChanged reports a change that can flip enrollment or what the agent
// serves: labels, our annotations, IPs, phase, UID (recreated pod),
// deletion start. Status-only churn (conditions, restarts) is filtered out
// by the trim and by this comparison.
func podChanged(o, p *corev1.Pod) bool {
	if o.UID != p.UID || o.Status.Phase != p.Status.Phase ||
		(o.DeletionTimestamp == nil) != (p.DeletionTimestamp == nil) ||
		!mapsEqual(o.Labels, p.Labels) || !mapsEqual(o.Annotations, p.Annotations) {
		return true
	}
	a, b := podIPs(o), podIPs(p)
	if len(a) != len(b) {
		return true
	}
	for i := range a {
		if a[i] != b[i] {
			return true
		}
	}
	return false
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}
