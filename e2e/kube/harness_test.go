package kube

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/ambit-mesh/ambit/internal/testenv"
)

// The cluster's fixed facts (cluster.sh is the source of truth).
const (
	k8sVersion   = "v1.36.3"
	kechoImage   = "localhost/ambit-e2e/kecho:1"
	bridgeName   = "k8s2br0"
	node1, node2 = "node-1", "node-2"
)

// cluster is what the cases get: a live two-node cluster.
type cluster struct {
	script     string // e2e/kube/cluster.sh
	state      string // its state dir
	kubeconfig string
	kbin       string // the cached Kubernetes binaries
	rest       *rest.Config
	client     kubernetes.Interface
}

var (
	cl      *cluster
	skipWhy string // why there is no cluster (not root, -short)
)

func TestMain(m *testing.M) {
	flag.Parse()
	switch {
	case os.Geteuid() != 0:
		skipWhy = "SKIPPED: e2e/kube needs root (network namespaces, mounts, cgroups); CI runs as root"
	case testing.Short():
		skipWhy = "SKIPPED: e2e/kube brings up a real two-node cluster; not in -short mode"
	case os.Getenv("AMBIT_E2E_KUBE") == "":
		// Opt-in while a cold cache costs a 20+ minute build and the
		// suite still finds open defects: `make e2e-kube` sets it.
		skipWhy = "SKIPPED: the real-Kubernetes suite runs with AMBIT_E2E_KUBE=1 (make e2e-kube); warm it takes ~4 min"
	}
	if skipWhy != "" {
		fmt.Fprintln(os.Stderr, "e2e/kube:", skipWhy)
		os.Exit(m.Run())
	}
	os.Exit(run(m))
}

func run(m *testing.M) (code int) {
	root := testenv.RepoRoot()
	c := &cluster{script: filepath.Join(root, "e2e", "kube", "cluster.sh")}
	c.state = envOr("AMBIT_K8S_STATE", "/var/lib/amb-k8s")
	c.kubeconfig = filepath.Join(c.state, "admin.kubeconfig")
	c.kbin = envOr("KUBE_BIN", filepath.Join(envOr("AMBIT_E2E_CACHE", "/var/cache/ambit-e2e"), "k8s-"+k8sVersion, "bin"))

	// On CI the machine is ours: a cold build may use it all.
	if os.Getenv("CI") != "" {
		for k, v := range map[string]string{"KUBE_BUILD_NICE": "0", "KUBE_BUILD_P": "2"} {
			if os.Getenv(k) == "" {
				os.Setenv(k, v)
			}
		}
	}
	t0 := time.Now()
	// AMBIT_K8S_NO_BUILD=1: use what the cache has (iterating by hand).
	if os.Getenv("AMBIT_K8S_NO_BUILD") == "" {
		if err := stream("build", filepath.Join(root, "hack", "kube", "build.sh")); err != nil {
			fmt.Fprintln(os.Stderr, "e2e/kube: build failed:", err)
			return 1
		}
	}
	rep.buildTime = time.Since(t0)

	keep := os.Getenv("AMBIT_K8S_KEEP") != ""
	defer func() {
		if keep {
			fmt.Fprintf(os.Stderr, "e2e/kube: cluster kept (AMBIT_K8S_KEEP): eval $(%s env); %s down\n", c.script, c.script)
		} else {
			t := time.Now()
			if err := stream("down", c.script, "down"); err != nil {
				fmt.Fprintln(os.Stderr, "e2e/kube: teardown:", err)
				code = 1
			}
			rep.downTime = time.Since(t)
		}
		rep.print(os.Stdout)
	}()

	t1 := time.Now()
	if err := stream("up", c.script, "up"); err != nil {
		fmt.Fprintln(os.Stderr, "e2e/kube: cluster up failed:", err)
		_ = stream("logs", "sh", "-c", "tail -n 20 "+c.state+"/logs/*.log")
		return 1
	}
	rep.upTime = time.Since(t1)

	cfg, err := clientcmd.BuildConfigFromFlags("", c.kubeconfig)
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e/kube: kubeconfig:", err)
		return 1
	}
	cfg.QPS, cfg.Burst = 50, 100
	c.rest = cfg
	if c.client, err = kubernetes.NewForConfig(cfg); err != nil {
		fmt.Fprintln(os.Stderr, "e2e/kube: client:", err)
		return 1
	}
	cl = c
	return m.Run()
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

// stream runs a helper with its output on stderr, prefixed, so a CI log
// shows build and bring-up progress as it happens.
func stream(tag string, name string, args ...string) error {
	cmd := exec.Command(name, args...)
	w := &prefixWriter{prefix: "e2e/kube " + tag + ": "}
	cmd.Stdout, cmd.Stderr = w, w
	err := cmd.Run()
	w.flush()
	return err
}

type prefixWriter struct {
	mu     sync.Mutex
	prefix string
	buf    []byte
}

func (p *prefixWriter) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.buf = append(p.buf, b...)
	for {
		i := bytes.IndexByte(p.buf, '\n')
		if i < 0 {
			break
		}
		fmt.Fprintf(os.Stderr, "%s%s\n", p.prefix, p.buf[:i])
		p.buf = p.buf[i+1:]
	}
	return len(b), nil
}

func (p *prefixWriter) flush() {
	if len(p.buf) > 0 {
		fmt.Fprintf(os.Stderr, "%s%s\n", p.prefix, p.buf)
	}
}

// need returns the cluster, or skips t (loudly) when there is none.
func need(t *testing.T) *cluster {
	t.Helper()
	testenv.RequireRoot(t)
	if cl == nil {
		if skipWhy == "" {
			skipWhy = "no cluster"
		}
		t.Skip(skipWhy)
	}
	return cl
}

// ------------------------------------------------------------- report

type caseResult struct {
	name   string
	start  time.Time
	dur    time.Duration
	status string
	notes  []string
}

type report struct {
	mu                          sync.Mutex
	cases                       []*caseResult
	buildTime, upTime, downTime time.Duration
}

var rep report

// track records t in the end-of-run report; note adds its key numbers.
func track(t *testing.T) *caseResult {
	r := &caseResult{name: t.Name(), start: time.Now()}
	rep.mu.Lock()
	rep.cases = append(rep.cases, r)
	rep.mu.Unlock()
	t.Cleanup(func() {
		r.dur = time.Since(r.start)
		switch {
		case t.Failed():
			r.status = "FAIL"
		case t.Skipped():
			r.status = "SKIP"
		default:
			r.status = "PASS"
		}
	})
	return r
}

func (r *caseResult) note(format string, args ...any) {
	rep.mu.Lock()
	r.notes = append(r.notes, fmt.Sprintf(format, args...))
	rep.mu.Unlock()
}

func (rp *report) print(w *os.File) {
	rp.mu.Lock()
	defer rp.mu.Unlock()
	fmt.Fprintf(w, "\n==== e2e/kube report: Kubernetes %s, two nodes ====\n", k8sVersion)
	fmt.Fprintf(w, "build %.1fs (cached binaries when ~0), cluster up %.1fs, down %.1fs\n",
		rp.buildTime.Seconds(), rp.upTime.Seconds(), rp.downTime.Seconds())
	counts := map[string]int{}
	sort.SliceStable(rp.cases, func(i, j int) bool { return rp.cases[i].start.Before(rp.cases[j].start) })
	for _, c := range rp.cases {
		st := c.status
		if st == "" {
			st = "RUN?"
		}
		counts[st]++
		fmt.Fprintf(w, "%-4s %-44s %6.1fs  %s\n", st, c.name, c.dur.Seconds(), strings.Join(c.notes, "; "))
	}
	fmt.Fprintf(w, "cases: %d pass, %d fail, %d skip\n", counts["PASS"], counts["FAIL"], counts["SKIP"])
}

// ------------------------------------------------------------ helpers

func suffix() string {
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// kubectlBin is the cluster's own kubectl (built with it), or the one on
// PATH when the cache has none yet.
func (c *cluster) kubectlBin() string {
	own := filepath.Join(c.kbin, "kubectl")
	if _, err := os.Stat(own); err == nil {
		return own
	}
	if p, err := exec.LookPath("kubectl"); err == nil {
		return p
	}
	return own
}

// kubectl runs the cluster's own kubectl (built with the cluster).
func (c *cluster) kubectl(ctx context.Context, stdin string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, c.kubectlBin(), append([]string{"--kubeconfig", c.kubeconfig}, args...)...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if err != nil {
		return out.String() + errb.String(), fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

func (c *cluster) mustKubectl(t *testing.T, stdin string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := c.kubectl(ctx, stdin, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// namespace creates a namespace for one case, deleted when it ends.
func (c *cluster) namespace(t *testing.T, prefix string, labels map[string]string) string {
	t.Helper()
	name := prefix + "-" + suffix()
	ctx := context.Background()
	_, err := c.client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("namespace %s: %v", name, err)
	}
	t.Cleanup(func() {
		_ = c.client.CoreV1().Namespaces().Delete(context.Background(), name, metav1.DeleteOptions{})
	})
	// Pods need the namespace's default ServiceAccount first.
	poll(t, 60*time.Second, "default ServiceAccount in "+name, func() (bool, error) {
		_, err := c.client.CoreV1().ServiceAccounts(name).Get(ctx, "default", metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return false, nil
		}
		return err == nil, err
	})
	return name
}

// podSpec is a kecho pod pinned to a node.
type podSpec struct {
	ns, name, node, sa string
	args               []string // kecho arguments; default "serve"
	labels, annots     map[string]string
}

func kechoPod(p podSpec) *corev1.Pod {
	zero := int64(0)
	args := p.args
	if len(args) == 0 {
		args = []string{"serve"}
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: p.name, Namespace: p.ns, Labels: p.labels, Annotations: p.annots},
		Spec: corev1.PodSpec{
			NodeSelector:                  map[string]string{"kubernetes.io/hostname": p.node},
			ServiceAccountName:            p.sa,
			TerminationGracePeriodSeconds: &zero,
			// The cluster runs no DNS; say so instead of a warning per pod.
			DNSPolicy: corev1.DNSDefault,
			Containers: []corev1.Container{{
				Name:            "kecho",
				Image:           kechoImage,
				ImagePullPolicy: corev1.PullNever,
				Command:         []string{"/kecho"},
				Args:            args,
				Env: []corev1.EnvVar{
					{Name: "POD_NAME", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}}},
					{Name: "NODE_NAME", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "spec.nodeName"}}},
				},
				Ports: []corev1.ContainerPort{{ContainerPort: 9000, Name: "tcp"}, {ContainerPort: 8080, Name: "http"}},
			}},
		},
	}
}

// runPod creates a kecho pod and waits until it runs with an IP.
func (c *cluster) runPod(t *testing.T, p podSpec) *corev1.Pod {
	t.Helper()
	ctx := context.Background()
	if _, err := c.client.CoreV1().Pods(p.ns).Create(ctx, kechoPod(p), metav1.CreateOptions{}); err != nil {
		t.Fatalf("pod %s/%s: %v", p.ns, p.name, err)
	}
	return c.waitRunning(t, p.ns, p.name)
}

func (c *cluster) waitRunning(t *testing.T, ns, name string) *corev1.Pod {
	t.Helper()
	var pod *corev1.Pod
	ok := pollOK(90*time.Second, func() (bool, error) {
		p, err := c.client.CoreV1().Pods(ns).Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		pod = p
		if p.Status.Phase == corev1.PodRunning && p.Status.PodIP != "" {
			for _, cs := range p.Status.ContainerStatuses {
				if !cs.Ready {
					return false, nil
				}
			}
			return true, nil
		}
		return false, nil
	})
	if !ok {
		out, _ := c.kubectl(context.Background(), "", "-n", ns, "describe", "pod", name)
		t.Fatalf("pod %s/%s not running in 90s:\n%s", ns, name, out)
	}
	return pod
}

// exec runs kecho (or anything in the image) inside a pod.
func (c *cluster) exec(ns, pod string, timeout time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return c.kubectl(ctx, "", append([]string{"-n", ns, "exec", pod, "--"}, args...)...)
}

// poll calls f until it returns true, an error, or the deadline passes.
func poll(t *testing.T, d time.Duration, what string, f func() (bool, error)) {
	t.Helper()
	end := time.Now().Add(d)
	for {
		ok, err := f()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if ok {
			return
		}
		if time.Now().After(end) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func pollOK(d time.Duration, f func() (bool, error)) bool {
	end := time.Now().Add(d)
	for {
		if ok, err := f(); ok || err != nil {
			return ok && err == nil
		}
		if time.Now().After(end) {
			return false
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// inNode runs a command inside node N's network and mount namespaces.
func (c *cluster) inNode(n int, args ...string) (string, error) {
	cmd := exec.Command(c.script, append([]string{"node", fmt.Sprint(n)}, args...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}
