package kube

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
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
	k8sVersion = "v1.36.3"
	kechoImage = "localhost/ambit-e2e/kecho:1"
	bridgeName = "k8s2br0"
)

// The two nodes the cases pin pods to: cluster.sh's, or on an external
// cluster AMBIT_E2E_NODES (or its first two schedulable nodes).
var node1, node2 = "node-1", "node-2"

// cluster is what the cases get: a live cluster with at least two nodes.
type cluster struct {
	script     string // e2e/kube/cluster.sh
	state      string // its state dir
	kubeconfig string
	kbin       string // the cached Kubernetes binaries
	rest       *rest.Config
	client     kubernetes.Interface

	// external: the cluster is AMBIT_E2E_KUBECONFIG's (kind, or any),
	// not the one cluster.sh runs. The harness then has no bridge to
	// capture on and no node namespaces of its own; cases that need
	// them skip or use the agent's metrics instead, and say so.
	external bool
	name     string   // for the report
	nodeExec []string // AMBIT_E2E_NODE_EXEC: a command prefix, {node} replaced
	podCIDR  *net.IPNet
}

var (
	cl      *cluster
	skipWhy string // why there is no cluster (not root, -short)
)

func TestMain(m *testing.M) {
	flag.Parse()
	ext := os.Getenv("AMBIT_E2E_KUBECONFIG")
	switch {
	case testing.Short() && ext != "":
		skipWhy = "SKIPPED: e2e/kube runs against AMBIT_E2E_KUBECONFIG's cluster; not in -short mode"
	case ext != "":
		// Someone else's cluster (e2e/kind/kind.sh): no root needed, and
		// asking for it is the opt-in.
	case os.Geteuid() != 0:
		skipWhy = "SKIPPED: e2e/kube needs root (network namespaces, mounts, cgroups); CI runs as root"
	case testing.Short():
		skipWhy = "SKIPPED: e2e/kube brings up a real two-node cluster; not in -short mode"
	case flag.Lookup("test.run").Value.String() == "^$" || flag.Lookup("test.list").Value.String() != "":
		// Benchmarks only (go test -run '^$' -bench . ./...): no case
		// would run, so bring nothing up.
		skipWhy = "SKIPPED: -run '^$' or -list: no case runs"
	case os.Getenv("AMBIT_E2E_KUBE") == "0":
		// Part of `make test` and CI. A cold cache costs a 20+ minute
		// build of Kubernetes once per machine; AMBIT_E2E_KUBE=0 leaves
		// the suite out of a quick local `go test ./...`.
		skipWhy = "SKIPPED: AMBIT_E2E_KUBE=0 leaves out the real-Kubernetes suite (make test runs it)"
	}
	if skipWhy != "" {
		fmt.Fprintln(os.Stderr, "e2e/kube:", skipWhy)
		os.Exit(m.Run())
	}
	if ext != "" {
		os.Exit(runExternal(m, ext))
	}
	code := run(m)
	testenv.RemoveBinaries()
	os.Exit(code)
}

// runExternal runs the cases against a cluster someone else brought up
// (e2e/kind/kind.sh up): no build, no bring-up, no teardown. The cluster
// must run the kecho image (kind.sh loads it) and, for the mesh cases,
// Ambit's image; AMBIT_E2E_INSTALL_DIR is the kustomization the install
// step applies (kind.sh: manifests/overlays/kind).
func runExternal(m *testing.M, kubeconfig string) int {
	c := &cluster{external: true, kubeconfig: kubeconfig, name: envOr("AMBIT_E2E_CLUSTER_NAME", kubeconfig)}
	c.nodeExec = strings.Fields(os.Getenv("AMBIT_E2E_NODE_EXEC"))
	if s := os.Getenv("AMBIT_E2E_POD_CIDR"); s != "" {
		_, n, err := net.ParseCIDR(s)
		if err != nil {
			fmt.Fprintf(os.Stderr, "e2e/kube: AMBIT_E2E_POD_CIDR %q: %v\n", s, err)
			return 1
		}
		c.podCIDR = n
	}
	rep.cluster = c.name
	defer rep.publish()
	if err := c.connect(); err != nil {
		fmt.Fprintln(os.Stderr, "e2e/kube: AMBIT_E2E_KUBECONFIG:", err)
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	nodes, err := pickNodes(ctx, c.client, os.Getenv("AMBIT_E2E_NODES"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e/kube:", err)
		return 1
	}
	node1, node2 = nodes[0], nodes[1]
	fmt.Fprintf(os.Stderr, "e2e/kube: external cluster %s, nodes %s and %s\n", c.name, node1, node2)
	cl = c
	return m.Run()
}

// pickNodes returns the two nodes named in list ("a,b"), checked to
// exist, or the first two Ready nodes that take ordinary pods (no
// NoSchedule taint: a kind control plane has one), by name.
func pickNodes(ctx context.Context, client kubernetes.Interface, list string) ([]string, error) {
	all, err := client.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, fmt.Errorf("listing nodes: %w", err)
	}
	have := map[string]bool{}
	var usable []string
	for _, n := range all.Items {
		have[n.Name] = true
		ready, tainted := false, false
		for _, c := range n.Status.Conditions {
			if c.Type == corev1.NodeReady && c.Status == corev1.ConditionTrue {
				ready = true
			}
		}
		for _, t := range n.Spec.Taints {
			if t.Effect == corev1.TaintEffectNoSchedule || t.Effect == corev1.TaintEffectNoExecute {
				tainted = true
			}
		}
		if ready && !tainted {
			usable = append(usable, n.Name)
		}
	}
	if list != "" {
		names := strings.Split(list, ",")
		if len(names) != 2 || names[0] == names[1] {
			return nil, fmt.Errorf("AMBIT_E2E_NODES=%q: want two distinct node names, comma-separated", list)
		}
		for _, n := range names {
			if !have[n] {
				return nil, fmt.Errorf("AMBIT_E2E_NODES names %s, which the cluster does not have", n)
			}
		}
		return names, nil
	}
	sort.Strings(usable)
	if len(usable) < 2 {
		return nil, fmt.Errorf("the cross-node cases need two Ready, untainted nodes; the cluster has %v (set AMBIT_E2E_NODES)", usable)
	}
	return usable[:2], nil
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
		rep.publish()
	}()

	t1 := time.Now()
	if err := stream("up", c.script, "up"); err != nil {
		fmt.Fprintln(os.Stderr, "e2e/kube: cluster up failed:", err)
		_ = stream("logs", "sh", "-c", "tail -n 20 "+c.state+"/logs/*.log")
		return 1
	}
	rep.upTime = time.Since(t1)

	if err := c.connect(); err != nil {
		fmt.Fprintln(os.Stderr, "e2e/kube: kubeconfig:", err)
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

// need returns the cluster, or skips t (loudly) when there is none. The
// local cluster needs root; an external one only its kubeconfig.
func need(t *testing.T) *cluster {
	t.Helper()
	if cl != nil && cl.external {
		return cl
	}
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
	cluster                     string // external cluster's name; "" for cluster.sh's
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

// reportFile keeps the last report where `make test` shows it: go test
// prints a passing package's output only with -v.
var reportFile = filepath.Join(testenv.RepoRoot(), "bin", "e2e-kube-report.txt")

// publish prints the report and leaves a copy in reportFile.
func (rp *report) publish() {
	var b strings.Builder
	rp.print(&b)
	fmt.Print(b.String())
	if err := os.MkdirAll(filepath.Dir(reportFile), 0o755); err == nil {
		_ = os.WriteFile(reportFile, []byte(b.String()), 0o644)
	}
}

func (rp *report) print(w io.Writer) {
	rp.mu.Lock()
	defer rp.mu.Unlock()
	if rp.cluster != "" {
		fmt.Fprintf(w, "\n==== e2e/kube report: external cluster %s, nodes %s and %s ====\n", rp.cluster, node1, node2)
	} else {
		fmt.Fprintf(w, "\n==== e2e/kube report: Kubernetes %s, two nodes ====\n", k8sVersion)
		fmt.Fprintf(w, "build %.1fs (cached binaries when ~0), cluster up %.1fs, down %.1fs\n",
			rp.buildTime.Seconds(), rp.upTime.Seconds(), rp.downTime.Seconds())
	}
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
// connect makes the cluster's API clients from c.kubeconfig.
func (c *cluster) connect() error {
	cfg, err := clientcmd.BuildConfigFromFlags("", c.kubeconfig)
	if err != nil {
		return err
	}
	cfg.QPS, cfg.Burst = 50, 100
	c.rest = cfg
	if c.client, err = kubernetes.NewForConfig(cfg); err != nil {
		return fmt.Errorf("client: %w", err)
	}
	return nil
}

func (c *cluster) kubectlBin() string {
	if c.external {
		return "kubectl"
	}
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
	return c.waitRunningWithin(t, ns, name, 90*time.Second, "")
}

// waitRunningWithin waits d for the pod to run with every container
// ready; why, if set, says in the failure what a slow pod means.
func (c *cluster) waitRunningWithin(t *testing.T, ns, name string, d time.Duration, why string) *corev1.Pod {
	t.Helper()
	var pod *corev1.Pod
	ok := pollOK(d, func() (bool, error) {
		p, err := c.client.CoreV1().Pods(ns).Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		pod = p
		return p.Status.Phase == corev1.PodRunning && p.Status.PodIP != "" && podReady(p), nil
	})
	if !ok {
		out, _ := c.kubectl(context.Background(), "", "-n", ns, "describe", "pod", name)
		t.Fatalf("pod %s/%s not running in %v%s:\n%s", ns, name, d, why, out)
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

// inNode runs a command inside node N's network and mount namespaces; on
// an external cluster through AMBIT_E2E_NODE_EXEC (kind: `docker exec
// {node}`), with {node} replaced by node1 or node2.
func (c *cluster) inNode(n int, args ...string) (string, error) {
	name, argv := c.script, append([]string{"node", fmt.Sprint(n)}, args...)
	if c.external {
		if len(c.nodeExec) == 0 {
			return "", errors.New("no way into the nodes of an external cluster: set AMBIT_E2E_NODE_EXEC (kind: \"docker exec {node}\")")
		}
		if n != 1 && n != 2 {
			return "", fmt.Errorf("node %d: the cases use nodes 1 and 2", n)
		}
		node := []string{node1, node2}[n-1]
		var pre []string
		for _, f := range c.nodeExec {
			pre = append(pre, strings.ReplaceAll(f, "{node}", node))
		}
		name, argv = pre[0], append(pre[1:], args...)
	}
	cmd := exec.Command(name, argv...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// followAgentLogs copies every agent pod's log (both containers), the
// ones running now and the ones that appear until stop is called, into
// files under dir: a rolling update deletes the old pods and their logs
// with them, and a failure in the middle of one can only be explained
// from what those agents said. It returns stop and, for a message, the
// lines of the copied logs that matched any of the words.
func (c *cluster) followAgentLogs(t *testing.T, dir string) (stop func(words ...string) string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Logf("agent logs not kept: %v", err)
		return func(...string) string { return "" }
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var mu sync.Mutex
	var files []string
	seen := map[string]bool{}
	poll := func() {
		pods, err := c.client.CoreV1().Pods(ambitNS).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=ambit-agent"})
		if err != nil {
			return
		}
		for _, p := range pods.Items {
			for _, ct := range p.Spec.Containers {
				name := p.Name + "_" + ct.Name
				if seen[name] || p.Status.Phase == corev1.PodPending {
					continue
				}
				seen[name] = true
				path := filepath.Join(dir, name+".log")
				f, err := os.Create(path)
				if err != nil {
					continue
				}
				mu.Lock()
				files = append(files, path)
				mu.Unlock()
				wg.Add(1)
				go func() {
					defer wg.Done()
					defer f.Close()
					cmd := exec.CommandContext(ctx, c.kubectlBin(), "--kubeconfig", c.kubeconfig,
						"-n", ambitNS, "logs", "-f", "--timestamps", p.Name, "-c", ct.Name)
					cmd.Stdout, cmd.Stderr = f, f
					_ = cmd.Run()
				}()
			}
		}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(250 * time.Millisecond)
		defer tick.Stop()
		for {
			poll()
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	return func(words ...string) string {
		// The agents' last lines reach kubectl a moment after the fact.
		time.Sleep(time.Second)
		cancel()
		<-done
		wg.Wait()
		var b strings.Builder
		mu.Lock()
		defer mu.Unlock()
		for _, path := range files {
			data, err := os.ReadFile(path)
			if err != nil {
				continue
			}
			for _, line := range strings.Split(string(data), "\n") {
				for _, w := range words {
					if strings.Contains(line, w) {
						fmt.Fprintf(&b, "%s: %s\n", filepath.Base(path), line)
						break
					}
				}
			}
		}
		return b.String()
	}
}
