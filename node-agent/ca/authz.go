package ca

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// Caller is an authenticated node agent.
type Caller struct {
	// Node is the node the agent runs on; it keys the rate limit and
	// bounds which identities it may get.
	Node string
	// Name identifies the agent in logs (its pod namespace/name).
	Name string
}

// Refusal is a request the CA will not serve, with an HTTP status and a
// stable reason word for metrics.
type Refusal struct {
	Status int
	Reason Reason
	Msg    string
}

func (r *Refusal) Error() string { return string(r.Reason) + ": " + r.Msg }

func refuse(status int, reason Reason, format string, args ...any) *Refusal {
	return &Refusal{Status: status, Reason: reason, Msg: fmt.Sprintf(format, args...)}
}

// Authorizer decides who may obtain which identity.
type Authorizer interface {
	// Authenticate checks a bearer token and names the caller.
	Authenticate(ctx context.Context, token string) (Caller, *Refusal)
	// Authorize says whether caller may obtain id.
	Authorize(ctx context.Context, caller Caller, id ID) *Refusal
}

// Token review user extras set by the API server for pod-bound tokens.
const (
	extraNodeName = "authentication.kubernetes.io/node-name"
	extraPodName  = "authentication.kubernetes.io/pod-name"
	extraPodUID   = "authentication.kubernetes.io/pod-uid"
)

// KubeConfig configures KubeAuthorizer.
type KubeConfig struct {
	Client kubernetes.Interface
	// Audience the agent's projected token must be bound to.
	Audience string
	// AgentServiceAccount is "namespace/name" of the node agents.
	AgentServiceAccount string
	// TokenCacheTTL keeps a successful TokenReview this long (never past
	// the token's own expiry as far as we know it) so 250 requests of a
	// restarting agent cost one review. 0 means 1 minute; <0 disables.
	TokenCacheTTL time.Duration
}

// KubeAuthorizer implements the node-bound rule with the Kubernetes API:
// TokenReview (audience-bound) → must be the agent service account and
// bound to a pod → the node of that pod → sign ns/X/sa/Y only when a pod
// of service account Y in namespace X, not terminal, is scheduled on that
// node.
type KubeAuthorizer struct {
	cfg      KubeConfig
	agentNS  string
	agentSA  string
	username string

	mu     sync.Mutex
	tokens map[[32]byte]tokenEntry

	pods cache.Indexer // nil until Start
}

type tokenEntry struct {
	caller  Caller
	expires time.Time
}

// NewKubeAuthorizer checks cfg and returns the authorizer. Call Start to
// back pod lookups with an informer cache; without it every check lists
// the node's pods in the namespace directly.
func NewKubeAuthorizer(cfg KubeConfig) (*KubeAuthorizer, error) {
	if cfg.Client == nil {
		return nil, fmt.Errorf("ca: kubernetes client required")
	}
	if cfg.Audience == "" {
		cfg.Audience = DefaultAudience
	}
	if cfg.AgentServiceAccount == "" {
		cfg.AgentServiceAccount = "ambit-system/ambit-agent"
	}
	ns, sa, ok := strings.Cut(cfg.AgentServiceAccount, "/")
	if !ok || ns == "" || sa == "" || strings.Contains(sa, "/") {
		return nil, fmt.Errorf("ca: agent service account %q: want namespace/name", cfg.AgentServiceAccount)
	}
	if cfg.TokenCacheTTL == 0 {
		cfg.TokenCacheTTL = time.Minute
	}
	return &KubeAuthorizer{cfg: cfg, agentNS: ns, agentSA: sa,
		username: "system:serviceaccount:" + ns + ":" + sa, tokens: map[[32]byte]tokenEntry{}}, nil
}

const podIndex = "node/ns/sa"

// Start runs a pod informer (trimmed to the fields the check needs) and
// waits for it to sync. A cache miss still falls back to a live list, so a
// pod scheduled a moment ago is not refused because of informer lag.
func (k *KubeAuthorizer) Start(ctx context.Context) error {
	f := informers.NewSharedInformerFactoryWithOptions(k.cfg.Client, 0, informers.WithTransform(trimPod))
	inf := f.Core().V1().Pods().Informer()
	if err := inf.AddIndexers(cache.Indexers{podIndex: func(obj any) ([]string, error) {
		p, ok := obj.(*corev1.Pod)
		if !ok || p.Spec.NodeName == "" || terminal(p) {
			return nil, nil
		}
		return []string{p.Spec.NodeName + "/" + p.Namespace + "/" + p.Spec.ServiceAccountName}, nil
	}}); err != nil {
		return err
	}
	f.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
		return fmt.Errorf("ca: pod cache did not sync: %w", ctx.Err())
	}
	k.mu.Lock()
	k.pods = inf.GetIndexer()
	k.mu.Unlock()
	return nil
}

// trimPod keeps what authorization reads: the cache of a large cluster
// stays small.
func trimPod(obj any) (any, error) {
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: p.Namespace, UID: p.UID, ResourceVersion: p.ResourceVersion, DeletionTimestamp: p.DeletionTimestamp},
		Spec:       corev1.PodSpec{NodeName: p.Spec.NodeName, ServiceAccountName: p.Spec.ServiceAccountName},
		Status:     corev1.PodStatus{Phase: p.Status.Phase},
	}, nil
}

func terminal(p *corev1.Pod) bool {
	return p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed
}

// Authenticate runs a TokenReview bound to the CA's audience.
func (k *KubeAuthorizer) Authenticate(ctx context.Context, token string) (Caller, *Refusal) {
	if token == "" {
		return Caller{}, refuse(http.StatusUnauthorized, ReasonUnauthenticated, "no bearer token")
	}
	key := sha256.Sum256([]byte(token))
	now := time.Now()
	if k.cfg.TokenCacheTTL > 0 {
		k.mu.Lock()
		e, ok := k.tokens[key]
		k.mu.Unlock()
		if ok && now.Before(e.expires) {
			return e.caller, nil
		}
	}
	tr, err := k.cfg.Client.AuthenticationV1().TokenReviews().Create(ctx, &authnv1.TokenReview{
		Spec: authnv1.TokenReviewSpec{Token: token, Audiences: []string{k.cfg.Audience}},
	}, metav1.CreateOptions{})
	if err != nil {
		return Caller{}, refuse(http.StatusInternalServerError, ReasonInternal, "token review: %v", err)
	}
	st := tr.Status
	if !st.Authenticated {
		msg := st.Error
		if msg == "" {
			msg = "token not authenticated"
		}
		return Caller{}, refuse(http.StatusUnauthorized, ReasonUnauthenticated, "%s", msg)
	}
	if !slices.Contains(st.Audiences, k.cfg.Audience) {
		return Caller{}, refuse(http.StatusUnauthorized, ReasonUnauthenticated, "token not bound to audience %q", k.cfg.Audience)
	}
	if st.User.Username != k.username {
		return Caller{}, refuse(http.StatusForbidden, ReasonNotAgent, "%s is not the node agent (%s)", st.User.Username, k.username)
	}
	extra := func(key string) string {
		if v := st.User.Extra[key]; len(v) == 1 {
			return v[0]
		}
		return ""
	}
	podName, podUID := extra(extraPodName), extra(extraPodUID)
	if podName == "" || podUID == "" {
		return Caller{}, refuse(http.StatusForbidden, ReasonNoNode, "token is not bound to a pod (use a projected service-account token)")
	}
	caller := Caller{Node: extra(extraNodeName), Name: k.agentNS + "/" + podName}
	if caller.Node == "" {
		// Older API servers do not put the node in the token: read it
		// from the bound pod, whose UID must match (a recreated pod of
		// the same name is another pod).
		pod, err := k.cfg.Client.CoreV1().Pods(k.agentNS).Get(ctx, podName, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return Caller{}, refuse(http.StatusForbidden, ReasonNoNode, "bound pod %s no longer exists", caller.Name)
		}
		if err != nil {
			return Caller{}, refuse(http.StatusInternalServerError, ReasonInternal, "reading bound pod %s: %v", caller.Name, err)
		}
		if string(pod.UID) != podUID {
			return Caller{}, refuse(http.StatusForbidden, ReasonNoNode, "bound pod %s has uid %s, token names %s", caller.Name, pod.UID, podUID)
		}
		if pod.Spec.NodeName == "" {
			return Caller{}, refuse(http.StatusForbidden, ReasonNoNode, "bound pod %s is not scheduled", caller.Name)
		}
		caller.Node = pod.Spec.NodeName
	}
	if k.cfg.TokenCacheTTL > 0 {
		k.mu.Lock()
		if len(k.tokens) > 4096 {
			clear(k.tokens)
		}
		expires := now.Add(k.cfg.TokenCacheTTL)
		if exp, ok := tokenExpiry(token); ok && exp.Before(expires) {
			expires = exp
		}
		k.tokens[key] = tokenEntry{caller: caller, expires: expires}
		k.mu.Unlock()
	}
	return caller, nil
}

// tokenExpiry reads the exp claim of a JWT without checking anything
// else: the API server has just authenticated the token, and the claim
// only ever shortens how long that answer is cached, so a token that
// expires within the cache TTL is not accepted past its expiry. ok is
// false for a token that is not a JWT with an exp.
func tokenExpiry(token string) (time.Time, bool) {
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return time.Time{}, false
	}
	payload, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(parts[1], "="))
	if err != nil {
		return time.Time{}, false
	}
	var claims struct {
		Exp *json.Number `json:"exp"`
	}
	if json.Unmarshal(payload, &claims) != nil || claims.Exp == nil {
		return time.Time{}, false
	}
	exp, err := claims.Exp.Float64()
	if err != nil {
		return time.Time{}, false
	}
	return time.Unix(int64(exp), 0), true
}

// Authorize allows id when a live pod of that service account runs on the
// caller's node.
func (k *KubeAuthorizer) Authorize(ctx context.Context, caller Caller, id ID) *Refusal {
	k.mu.Lock()
	idx := k.pods
	k.mu.Unlock()
	if idx != nil {
		objs, err := idx.ByIndex(podIndex, caller.Node+"/"+id.Namespace+"/"+id.ServiceAccount)
		if err == nil && len(objs) > 0 {
			return nil
		}
	}
	list, err := k.cfg.Client.CoreV1().Pods(id.Namespace).List(ctx, metav1.ListOptions{
		FieldSelector: fields.OneTermEqualSelector("spec.nodeName", caller.Node).String(),
	})
	if err != nil {
		return refuse(http.StatusInternalServerError, ReasonInternal, "listing pods: %v", err)
	}
	for i := range list.Items {
		p := &list.Items[i]
		// Filter again: the selector is the server's job, the rule is ours.
		if p.Spec.NodeName == caller.Node && p.Spec.ServiceAccountName == id.ServiceAccount && !terminal(p) {
			return nil
		}
	}
	return refuse(http.StatusForbidden, ReasonNotOnNode, "no running pod of service account %s/%s on node %s", id.Namespace, id.ServiceAccount, caller.Node)
}

// StaticAuthorizer is for tests and single-tenant setups: fixed tokens
// mapped to nodes, and a function saying which identities run where.
type StaticAuthorizer struct {
	Tokens map[string]Caller
	Allow  func(node string, id ID) bool
}

func (s StaticAuthorizer) Authenticate(_ context.Context, token string) (Caller, *Refusal) {
	c, ok := s.Tokens[token]
	if !ok {
		return Caller{}, refuse(http.StatusUnauthorized, ReasonUnauthenticated, "unknown token")
	}
	return c, nil
}

func (s StaticAuthorizer) Authorize(_ context.Context, c Caller, id ID) *Refusal {
	if s.Allow != nil && s.Allow(c.Node, id) {
		return nil
	}
	return refuse(http.StatusForbidden, ReasonNotOnNode, "%s not allowed on node %s", id, c.Node)
}
