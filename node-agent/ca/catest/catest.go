// Package catest is test scaffolding for the CA and its clients: a fake
// Kubernetes API (client-go's fake clientset) whose TokenReview behaves
// like the real one (signed, expiring, audience-bound, pod-bound tokens),
// and a real HTTPS CA server on loopback that can be stopped and started
// again on the same address to simulate an outage.
package catest

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/ambit-mesh/ambit/node-agent/ca"
)

// Cluster is a fake API server with a realistic TokenReview.
type Cluster struct {
	Client *fake.Clientset
	// AgentNamespace/AgentSA name the node agents' service account.
	AgentNamespace, AgentSA string
	issuer                  *ecdsa.PrivateKey
	// NodeInTokens: tokens carry the node name (Kubernetes >= 1.30);
	// false makes the CA read the bound pod instead.
	NodeInTokens bool
}

// NewCluster returns an empty cluster with agents in ambit-system/ambit-agent.
func NewCluster() *Cluster {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		panic(err)
	}
	c := &Cluster{Client: fake.NewClientset(), AgentNamespace: "ambit-system", AgentSA: "ambit-agent", issuer: k, NodeInTokens: true}
	c.Client.PrependReactor("create", "tokenreviews", c.review)
	return c
}

// AddPod creates a running pod with service account sa on node.
func (c *Cluster) AddPod(t testing.TB, ns, name, sa, node string) *corev1.Pod {
	t.Helper()
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID(fmt.Sprintf("uid-%s-%s-%d", ns, name, time.Now().UnixNano()))},
		Spec:       corev1.PodSpec{NodeName: node, ServiceAccountName: sa},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning},
	}
	p, err := c.Client.CoreV1().Pods(ns).Create(context.Background(), p, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create pod %s/%s: %v", ns, name, err)
	}
	return p
}

// DeletePod deletes a pod.
func (c *Cluster) DeletePod(t testing.TB, ns, name string) {
	t.Helper()
	if err := c.Client.CoreV1().Pods(ns).Delete(context.Background(), name, metav1.DeleteOptions{}); err != nil {
		t.Fatalf("delete pod %s/%s: %v", ns, name, err)
	}
}

// SetPhase updates a pod's phase.
func (c *Cluster) SetPhase(t testing.TB, ns, name string, phase corev1.PodPhase) {
	t.Helper()
	p, err := c.Client.CoreV1().Pods(ns).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p.Status.Phase = phase
	if _, err := c.Client.CoreV1().Pods(ns).UpdateStatus(context.Background(), p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// AgentPodName is the name of the agent pod of node.
func AgentPodName(node string) string { return "ambit-agent-" + node }

// AddAgent creates the agent pod of node.
func (c *Cluster) AddAgent(t testing.TB, node string) *corev1.Pod {
	return c.AddPod(t, c.AgentNamespace, AgentPodName(node), c.AgentSA, node)
}

// TokenOptions shape a token; the zero value is a valid agent token for
// the audience ambit-ca, valid one hour, bound to the agent pod of the node.
type TokenOptions struct {
	Audience       string        // default ca.DefaultAudience
	Lifetime       time.Duration // default 1h; negative: already expired
	Namespace, SA  string        // default the agent's
	Pod            string        // default AgentPodName(node); "-" = no pod binding
	Forged         bool          // signed by a key the API server does not know
	WrongPodUID    bool
	OmitNodeClaims bool
}

type claims struct {
	Iss string   `json:"iss"`
	Sub string   `json:"sub"`
	Aud []string `json:"aud"`
	Exp int64    `json:"exp"`
	Iat int64    `json:"iat"`
	K8s struct {
		Namespace string `json:"namespace"`
		Pod       *ref   `json:"pod,omitempty"`
		Node      *ref   `json:"node,omitempty"`
		SA        ref    `json:"serviceaccount"`
	} `json:"kubernetes.io"`
}

type ref struct {
	Name string `json:"name"`
	UID  string `json:"uid"`
}

// Token mints a service-account JWT (ES256) as the API server would.
func (c *Cluster) Token(t testing.TB, node string, o TokenOptions) string {
	t.Helper()
	if o.Audience == "" {
		o.Audience = ca.DefaultAudience
	}
	if o.Lifetime == 0 {
		o.Lifetime = time.Hour
	}
	if o.Namespace == "" {
		o.Namespace = c.AgentNamespace
	}
	if o.SA == "" {
		o.SA = c.AgentSA
	}
	if o.Pod == "" {
		o.Pod = AgentPodName(node)
	}
	now := time.Now()
	var cl claims
	cl.Iss, cl.Sub, cl.Aud = "https://kubernetes.default.svc", "system:serviceaccount:"+o.Namespace+":"+o.SA, []string{o.Audience}
	cl.Iat, cl.Exp = now.Unix(), now.Add(o.Lifetime).Unix()
	cl.K8s.Namespace, cl.K8s.SA = o.Namespace, ref{Name: o.SA, UID: "sa-uid"}
	if o.Pod != "-" {
		uid := "missing"
		if p, err := c.Client.CoreV1().Pods(o.Namespace).Get(context.Background(), o.Pod, metav1.GetOptions{}); err == nil {
			uid = string(p.UID)
		}
		if o.WrongPodUID {
			uid = "other-" + uid
		}
		cl.K8s.Pod = &ref{Name: o.Pod, UID: uid}
		if c.NodeInTokens && !o.OmitNodeClaims {
			cl.K8s.Node = &ref{Name: node, UID: "node-uid-" + node}
		}
	}
	key := c.issuer
	if o.Forged {
		key, _ = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	}
	return signJWT(key, cl)
}

func signJWT(key *ecdsa.PrivateKey, cl claims) string {
	enc := base64.RawURLEncoding
	h, _ := json.Marshal(map[string]string{"alg": "ES256", "typ": "JWT"})
	p, _ := json.Marshal(cl)
	signing := enc.EncodeToString(h) + "." + enc.EncodeToString(p)
	sum := sha256.Sum256([]byte(signing))
	r, s, err := ecdsa.Sign(rand.Reader, key, sum[:])
	if err != nil {
		panic(err)
	}
	sig := make([]byte, 64)
	r.FillBytes(sig[:32])
	s.FillBytes(sig[32:])
	return signing + "." + enc.EncodeToString(sig)
}

func (c *Cluster) verifyJWT(tok string) (*claims, error) {
	parts := strings.Split(tok, ".")
	if len(parts) != 3 {
		return nil, errors.New("invalid bearer token")
	}
	enc := base64.RawURLEncoding
	sig, err := enc.DecodeString(parts[2])
	if err != nil || len(sig) != 64 {
		return nil, errors.New("invalid bearer token")
	}
	sum := sha256.Sum256([]byte(parts[0] + "." + parts[1]))
	var pub crypto.PublicKey = &c.issuer.PublicKey
	if !ecdsa.Verify(pub.(*ecdsa.PublicKey), sum[:], new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:])) {
		return nil, errors.New("invalid bearer token, square/go-jose: error in cryptographic primitive")
	}
	payload, err := enc.DecodeString(parts[1])
	if err != nil {
		return nil, errors.New("invalid bearer token")
	}
	var cl claims
	if err := json.Unmarshal(payload, &cl); err != nil {
		return nil, errors.New("invalid bearer token")
	}
	if time.Now().Unix() >= cl.Exp {
		return nil, errors.New("invalid bearer token, service account token has expired")
	}
	return &cl, nil
}

// review answers a TokenReview like kube-apiserver: signature, expiry,
// audience intersection, bound pod still existing with the same UID.
func (c *Cluster) review(a k8stesting.Action) (bool, runtime.Object, error) {
	tr := a.(k8stesting.CreateAction).GetObject().(*authnv1.TokenReview).DeepCopy()
	fail := func(msg string) (bool, runtime.Object, error) {
		tr.Status = authnv1.TokenReviewStatus{Authenticated: false, Error: msg}
		return true, tr, nil
	}
	cl, err := c.verifyJWT(tr.Spec.Token)
	if err != nil {
		return fail(err.Error())
	}
	want := tr.Spec.Audiences
	if len(want) == 0 {
		want = []string{"https://kubernetes.default.svc"}
	}
	var aud []string
	for _, x := range cl.Aud {
		if slices.Contains(want, x) {
			aud = append(aud, x)
		}
	}
	if len(aud) == 0 {
		return fail("token audiences " + strings.Join(cl.Aud, ",") + " is invalid for the target audiences " + strings.Join(want, ","))
	}
	extra := map[string]authnv1.ExtraValue{}
	if p := cl.K8s.Pod; p != nil {
		obj, err := c.Client.Tracker().Get(corev1.SchemeGroupVersion.WithResource("pods"), cl.K8s.Namespace, p.Name)
		if err != nil {
			return fail("pod \"" + p.Name + "\" not found")
		}
		if string(obj.(*corev1.Pod).UID) != p.UID {
			return fail("pod UID (" + string(obj.(*corev1.Pod).UID) + ") does not match claim (" + p.UID + ")")
		}
		extra["authentication.kubernetes.io/pod-name"] = authnv1.ExtraValue{p.Name}
		extra["authentication.kubernetes.io/pod-uid"] = authnv1.ExtraValue{p.UID}
		if n := cl.K8s.Node; n != nil {
			extra["authentication.kubernetes.io/node-name"] = authnv1.ExtraValue{n.Name}
			extra["authentication.kubernetes.io/node-uid"] = authnv1.ExtraValue{n.UID}
		}
	}
	tr.Status = authnv1.TokenReviewStatus{
		Authenticated: true, Audiences: aud,
		User: authnv1.UserInfo{Username: cl.Sub, UID: "sa-uid",
			Groups: []string{"system:serviceaccounts", "system:serviceaccounts:" + cl.K8s.Namespace, "system:authenticated"},
			Extra:  extra},
	}
	return true, tr, nil
}

// Server is a real HTTPS CA on a loopback port.
type Server struct {
	Handler   http.Handler
	Authority *ca.Authority
	Addr      string
	URL       string
	// ServerName is in the serving certificate.
	ServerName string

	mu  sync.Mutex
	srv *http.Server
	tls *tls.Config
}

// StartServer serves h (usually a *ca.Server) with TLS 1.3 and a serving
// certificate from a. It stops at test cleanup.
func StartServer(t testing.TB, a *ca.Authority, h http.Handler) *Server {
	t.Helper()
	s := &Server{Handler: h, Authority: a, ServerName: "ambit-ca.test"}
	cert, err := a.ServingCertificate([]string{s.ServerName}, []net.IP{net.IPv4(127, 0, 0, 1)}, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	s.tls = &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{*cert}, NextProtos: []string{"h2", "http/1.1"}}
	if err := s.start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	s.URL = "https://" + s.Addr
	t.Cleanup(s.Stop)
	return s
}

func (s *Server) start(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: s.Handler, TLSConfig: s.tls, ReadHeaderTimeout: 5 * time.Second}
	s.mu.Lock()
	s.Addr, s.srv = ln.Addr().String(), srv
	s.mu.Unlock()
	go func() { _ = srv.ServeTLS(ln, "", "") }()
	return nil
}

// Stop closes the listener and every connection (a CA outage).
func (s *Server) Stop() {
	s.mu.Lock()
	srv := s.srv
	s.srv = nil
	s.mu.Unlock()
	if srv != nil {
		_ = srv.Close()
	}
}

// Restart serves again on the same address.
func (s *Server) Restart() error {
	var err error
	for i := 0; i < 50; i++ {
		if err = s.start(s.Addr); err == nil {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return err
}

// NewAuthority is a CA of trust domain td on a root of its own (30 days),
// for tests that sign with the real CA code without a server.
func NewAuthority(t testing.TB, td string) *ca.Authority {
	t.Helper()
	m, err := ca.GenerateRoot(td, 30*24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	a, err := ca.NewAuthority(td, m)
	if err != nil {
		t.Fatal(err)
	}
	return a
}
