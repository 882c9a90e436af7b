package kube

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// An agent rollout whose new agent never becomes ready must stall with
// the old agent Ready and serving (docs/upgrade.md, "If the new agent
// never becomes ready"). The DaemonSet controller deletes an old pod that
// is not ready during a surge at once, so the old pod must stay Ready for
// the whole stall: until 7582b51 both agents answered /readyz 503 while
// the newer one started, and the old agents of both nodes were deleted
// within seconds, leaving the nodes with agents that never served.
//
// The misconfiguration is the one that showed it: the new pod template
// runs under a ServiceAccount whose role lacks endpointslices. The new
// agent syncs the policies, registers and then
// waits for its informers forever (the endpointslices list is
// forbidden); its exec startup probe never passes. It never takes the
// plugin socket either (it would once ready), so pods created on the node
// meanwhile are enrolled by the old agent.

// noSlicesSA names the ServiceAccount, ClusterRole and ClusterRoleBinding
// of the misconfigured template.
const noSlicesSA = "ambit-agent-noslices"

// unreadyAgentRolloutStalls is TestAmbitMesh's UnreadyAgentRolloutStalls.
func (c *cluster) unreadyAgentRolloutStalls(t *testing.T, r *caseResult, mesh string, srv *corev1.Pod) {
	ctx := context.Background()
	ds, err := c.client.AppsV1().DaemonSets(ambitNS).Get(ctx, "ambit-agent", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	orig := ds.Spec.Template.DeepCopy()

	c.createNoSlicesRBAC(t)
	// Cleanups run last registered first: the template goes back (and
	// its agents are waited for) before the RBAC objects go.
	t.Cleanup(func() { c.restoreAgentTemplate(t, orig) })

	before := map[string]*corev1.Pod{}
	for _, n := range []string{node1, node2} {
		before[n] = c.agentPod(t, n)
	}

	const loadFor = 100 * time.Second
	res := c.load(mesh, "client", srv.Status.PodIP+":9000", loadFor)
	time.Sleep(2 * time.Second)
	t0 := time.Now()
	patch := fmt.Sprintf(`{"spec":{"template":{"spec":{"serviceAccountName":%q,"serviceAccount":%q}}}}`, noSlicesSA, noSlicesSA)
	c.mustKubectl(t, "", "-n", ambitNS, "patch", "ds/ambit-agent", "-p", patch)

	surge := c.surgePod(t, "the surge agent pod of the rollout", map[types.UID]bool{before[node1].UID: true, before[node2].UID: true})
	surgeSeen := time.Now()
	node := surge.Spec.NodeName
	old := before[node]
	t.Logf("unready rollout: surge pod %s beside %s on %s, %.1fs after the patch", surge.Name, old.Name, node, surgeSeen.Sub(t0).Seconds())

	// The node's health port, as the kubelet's readiness probe of the
	// old pod sees it: both agents share it (SO_REUSEPORT), so the
	// answers tell which agent a failing probe reached.
	probes := sampleReadyz(old.Status.HostIP, healthPort(old))
	defer probes.stop()

	// checkKept fails the case if a node lost its old agent pod or that
	// pod is not Ready: the DaemonSet controller deletes such a pod
	// during a surge, and the node is left with an agent that never
	// serves.
	checkKept := func(when string) {
		t.Helper()
		for _, n := range []string{node1, node2} {
			want := before[n]
			p, err := c.client.CoreV1().Pods(ambitNS).Get(ctx, want.Name, metav1.GetOptions{})
			switch {
			case apierrors.IsNotFound(err):
				t.Fatalf("%s (%.1fs after the surge pod appeared): the old agent pod %s on %s is gone; the DaemonSet controller deleted it", when, time.Since(surgeSeen).Seconds(), want.Name, n)
			case err != nil:
				// The API server is busy: look again next time.
				t.Logf("%s: old agent pod %s: %v", when, want.Name, err)
			case p.UID != want.UID:
				t.Fatalf("%s: agent pod %s on %s has UID %s, want the old pod's %s", when, want.Name, n, p.UID, want.UID)
			case p.DeletionTimestamp != nil:
				t.Fatalf("%s (%.1fs after the surge pod appeared): the old agent pod %s on %s is being deleted (the DaemonSet controller deletes an unready old pod during a surge); its probe events: %s; /readyz of %s's health port since the surge pod appeared: %s", when, time.Since(surgeSeen).Seconds(), want.Name, n, c.probeEvents(ctx, want), node, probes.String())
			case !podReady(p):
				t.Fatalf("%s (%.1fs after the surge pod appeared): the old agent pod %s on %s is not Ready (%s); the DaemonSet controller deletes an unready old pod during a surge; its probe events: %s; /readyz of %s's health port since the surge pod appeared: %s", when, time.Since(surgeSeen).Seconds(), want.Name, n, readyReason(p), c.probeEvents(ctx, want), node, probes.String())
			}
		}
	}

	// The ambient pod created during the stall: created once the surge
	// agent has started ("ambit-agent starting" in its log), so its ADD
	// meets a node with a starting, never ready, agent beside the old one.
	poll(t, 60*time.Second, "the surge agent to start", func() (bool, error) {
		checkKept("waiting for the surge agent to start")
		out, err := c.kubectl(ctx, "", "-n", ambitNS, "logs", surge.Name, "-c", "agent")
		return err == nil && strings.Contains(out, "ambit-agent starting"), nil
	})
	socketTaken := time.Since(surgeSeen)
	time.Sleep(time.Second)
	const stallPod = "during-stall"
	if _, err := c.client.CoreV1().Pods(mesh).Create(ctx, kechoPod(podSpec{ns: mesh, name: stallPod, node: node}), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	tPod := time.Now()
	t.Cleanup(func() {
		zero := int64(0)
		_ = c.client.CoreV1().Pods(mesh).Delete(context.Background(), stallPod, metav1.DeleteOptions{GracePeriodSeconds: &zero})
	})

	// The stall: at least 30 s after the surge pod appeared (and one ADD
	// timeout, 15 s, past the pod's creation), looked at every second.
	stallEnd := surgeSeen.Add(40 * time.Second)
	if e := tPod.Add(20 * time.Second); e.After(stallEnd) {
		stallEnd = e
	}
	var ranInStall time.Duration
	for time.Now().Before(stallEnd) {
		checkKept("during the stall")
		p, err := c.client.CoreV1().Pods(ambitNS).Get(ctx, surge.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatalf("during the stall: surge pod %s: %v", surge.Name, err)
		}
		if st := agentStatus(p); st != nil && st.Ready {
			out, _ := c.kubectl(ctx, "", "-n", ambitNS, "logs", surge.Name, "-c", "agent", "--tail=20")
			t.Fatalf("the surge pod's agent became ready: the ServiceAccount without endpointslices did not keep it from starting; its log:\n%s", out)
		}
		if sp, err := c.client.CoreV1().Pods(mesh).Get(ctx, stallPod, metav1.GetOptions{}); err == nil && ranInStall == 0 && sp.Status.Phase == corev1.PodRunning {
			ranInStall = time.Since(tPod)
		}
		time.Sleep(time.Second)
	}
	stalled := time.Since(surgeSeen)
	probes.stop()
	// The old pod's readiness probe goes to this port too: any 503 is a
	// failed probe of the old pod, and three in a row get it deleted.
	// Kept so far only by luck, if so.
	if n := probes.count("503"); n > 0 {
		t.Errorf("the health port of %s answered /readyz 503 %d times during the stall (%s): the kubelet's readiness probe of the old pod %s reaches the starting agent too, and three failures in a row make the DaemonSet controller delete the old pod", node, n, probes.String(), old.Name)
	}
	if out, err := c.exec(mesh, "client", 20*time.Second, "/kecho", "client", srv.Status.PodIP+":9000", "stalled"); err != nil {
		t.Fatalf("while the rollout stalls: %v %s", err, out)
	}

	// What the ambient pod's ADD met. docs/upgrade.md: beside the old
	// agent, a starting agent leaves the plugin socket to it until ready,
	// so the pod runs, enrolled by the old agent, during the stall (until
	// session 7 the unready agent held the socket and every ADD failed
	// closed until the undo).
	var addSaid string
	if ranInStall != 0 {
		addSaid = fmt.Sprintf("ran %.1fs after its creation, during the stall", ranInStall.Seconds())
		c.waitAnnotation(t, mesh, stallPod, "enabled", 30*time.Second)
	} else {
		defer func() {
			t.Errorf("ambient pod %s on %s did not run during the stall: %s", stallPod, node, addSaid)
		}()
		msg := lastSandboxFailure(ctx, t, c, mesh, stallPod)
		if !strings.Contains(msg, "ambit") {
			out, _ := c.kubectl(ctx, "", "-n", mesh, "describe", "pod", stallPod)
			t.Fatalf("ambient pod %s on %s did not run during the stall, and not because of Ambit's plugin (last sandbox failure %q):\n%s", stallPod, node, msg, out)
		}
		// The plugin's own words, not the runtime's wrapping.
		if i := strings.Index(msg, `plugin type="ambit-cni"`); i >= 0 {
			msg = msg[i:]
		}
		if len(msg) > 160 {
			msg = msg[:160] + "…"
		}
		addSaid = "did not run during the stall (fail closed: " + msg + ")"
		t.Logf("ambient pod during the stall: %s", addSaid)
	}

	t1 := time.Now()
	c.mustKubectl(t, "", "-n", ambitNS, "rollout", "undo", "ds/ambit-agent")
	if out, err := c.kubectl(ctx, "", "-n", ambitNS, "rollout", "status", "ds/ambit-agent", "--timeout=120s"); err != nil {
		t.Fatalf("rollout after undo: %v %s", err, out)
	}
	poll(t, 90*time.Second, "the surge pod "+surge.Name+" to be gone", func() (bool, error) {
		_, err := c.client.CoreV1().Pods(ambitNS).Get(ctx, surge.Name, metav1.GetOptions{})
		return apierrors.IsNotFound(err), nil
	})
	checkKept("after the rollback")
	rolledBack := time.Since(t1)

	// The pod created during the stall runs, enrolled, once the old
	// agent serves the socket again (the kubelet retries its sandbox).
	pod := c.waitRunningWithin(t, mesh, stallPod, 90*time.Second, " after the rollback on "+node)
	podUp, podAfterUndo := time.Since(tPod), time.Since(t1)
	c.waitAnnotation(t, mesh, stallPod, "enabled", 30*time.Second)
	want := fmt.Sprintf("peer=%s pod=server node=%s got=%s", pod.Status.PodIP, node2, stallPod)
	if out, err := c.exec(mesh, stallPod, 30*time.Second, "/kecho", "client", srv.Status.PodIP+":9000", stallPod); err != nil || strings.TrimSpace(out) != want {
		t.Fatalf("%s → server after the rollback: %v %q, want %q", stallPod, err, out, want)
	}

	lr := <-res
	r.note("unready rollout stalled on %s: old agents kept Ready %.0fs past the surge pod (surge agent started %.1fs after it; /readyz on the shared port: %s), rolled back in %.1fs; ambient pod created in the stall %s, running %.1fs after its creation (%.1fs after the undo); load over %v: %d ok, %d failed",
		node, stalled.Seconds(), socketTaken.Seconds(), probes.String(), rolledBack.Seconds(), addSaid, podUp.Seconds(), podAfterUndo.Seconds(), loadFor, lr.OK, lr.failed())
	if lr.Other < 0 {
		t.Fatalf("load did not run: %v", lr.Errors)
	}
	if lr.failed() != 0 {
		t.Errorf("traffic of the enrolled pods during the stalled rollout and its rollback: %+v; want no failure", lr)
	}
}

// createNoSlicesRBAC creates the ServiceAccount of the misconfigured
// template, bound to a copy of the agent's real ClusterRole (as installed
// from manifests/) without endpointslices, and removes them when the
// case ends.
func (c *cluster) createNoSlicesRBAC(t *testing.T) {
	t.Helper()
	ctx := context.Background()
	role, err := c.client.RbacV1().ClusterRoles().Get(ctx, "ambit-agent", metav1.GetOptions{})
	if err != nil {
		t.Fatalf("the agent's ClusterRole: %v", err)
	}
	rules, dropped := withoutResource(role.Rules, "discovery.k8s.io", "endpointslices")
	if dropped == 0 {
		t.Fatalf("the agent's ClusterRole grants nothing on endpointslices: the case would not stall the rollout (rules %+v)", role.Rules)
	}
	zero := int64(0)
	del := func() {
		bg := context.Background()
		_ = c.client.RbacV1().ClusterRoleBindings().Delete(bg, noSlicesSA, metav1.DeleteOptions{})
		_ = c.client.RbacV1().ClusterRoles().Delete(bg, noSlicesSA, metav1.DeleteOptions{})
		_ = c.client.CoreV1().ServiceAccounts(ambitNS).Delete(bg, noSlicesSA, metav1.DeleteOptions{GracePeriodSeconds: &zero})
	}
	del() // left by an earlier run on a kept cluster
	t.Cleanup(del)
	if _, err := c.client.CoreV1().ServiceAccounts(ambitNS).Create(ctx, &corev1.ServiceAccount{
		ObjectMeta: metav1.ObjectMeta{Name: noSlicesSA, Namespace: ambitNS}}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("ServiceAccount %s: %v", noSlicesSA, err)
	}
	if _, err := c.client.RbacV1().ClusterRoles().Create(ctx, &rbacv1.ClusterRole{
		ObjectMeta: metav1.ObjectMeta{Name: noSlicesSA}, Rules: rules}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("ClusterRole %s: %v", noSlicesSA, err)
	}
	if _, err := c.client.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: noSlicesSA},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: noSlicesSA},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Name: noSlicesSA, Namespace: ambitNS}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("ClusterRoleBinding %s: %v", noSlicesSA, err)
	}
}

// withoutResource is rules with resource of apiGroup taken out (a rule
// left with no resource goes), and how many rules lost it.
func withoutResource(rules []rbacv1.PolicyRule, apiGroup, resource string) ([]rbacv1.PolicyRule, int) {
	var out []rbacv1.PolicyRule
	dropped := 0
	for _, r := range rules {
		r := *r.DeepCopy()
		if slices.Contains(r.APIGroups, apiGroup) && slices.Contains(r.Resources, resource) {
			dropped++
			r.Resources = slices.DeleteFunc(r.Resources, func(s string) bool { return s == resource })
			if len(r.Resources) == 0 {
				continue
			}
		}
		out = append(out, r)
	}
	return out, dropped
}

// readyReason is why a pod is not Ready, from its Ready condition and its
// agent container's state.
func readyReason(p *corev1.Pod) string {
	var b strings.Builder
	for _, cd := range p.Status.Conditions {
		if cd.Type == corev1.PodReady {
			fmt.Fprintf(&b, "Ready=%s %s %s", cd.Status, cd.Reason, cd.Message)
		}
	}
	if st := agentStatus(p); st != nil {
		fmt.Fprintf(&b, "; agent container ready=%v restarts=%d", st.Ready, st.RestartCount)
	}
	return b.String()
}

// lastSandboxFailure is the message of the pod's latest
// FailedCreatePodSandBox event ("" if none).
func lastSandboxFailure(ctx context.Context, t *testing.T, c *cluster, ns, pod string) string {
	t.Helper()
	evs, err := c.client.CoreV1().Events(ns).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=" + pod + ",reason=FailedCreatePodSandBox"})
	if err != nil {
		t.Logf("events of %s/%s: %v", ns, pod, err)
		return ""
	}
	var last corev1.Event
	for _, e := range evs.Items {
		if e.LastTimestamp.After(last.LastTimestamp.Time) || last.Message == "" {
			last = e
		}
	}
	return last.Message
}

// readyzSampler counts the answers of a health port's /readyz, one fresh
// connection every 250 ms (as the kubelet probes: no keep-alive, so
// SO_REUSEPORT picks an agent per probe).
type readyzSampler struct {
	mu     sync.Mutex
	counts map[string]int
	cancel context.CancelFunc
	done   chan struct{}
}

func sampleReadyz(host, port string) *readyzSampler {
	ctx, cancel := context.WithCancel(context.Background())
	s := &readyzSampler{counts: map[string]int{}, cancel: cancel, done: make(chan struct{})}
	cl := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	url := "http://" + net.JoinHostPort(host, port) + "/readyz"
	go func() {
		defer close(s.done)
		tick := time.NewTicker(250 * time.Millisecond)
		defer tick.Stop()
		for {
			answer := "error"
			if resp, err := cl.Get(url); err == nil {
				b, _ := io.ReadAll(io.LimitReader(resp.Body, 200))
				resp.Body.Close()
				answer = fmt.Sprintf("%d %s", resp.StatusCode, strings.TrimSpace(string(b)))
			}
			s.mu.Lock()
			s.counts[answer]++
			s.mu.Unlock()
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	return s
}

// stop ends the sampling; the counts stay.
func (s *readyzSampler) stop() { s.cancel(); <-s.done }

// count is how many answers began with prefix ("503").
func (s *readyzSampler) count(prefix string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for k, v := range s.counts {
		if strings.HasPrefix(k, prefix) {
			n += v
		}
	}
	return n
}

// String is the answers with their counts, most frequent first.
func (s *readyzSampler) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	keys := make([]string, 0, len(s.counts))
	for k := range s.counts {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return s.counts[keys[i]] > s.counts[keys[j]] })
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%d× %q", s.counts[k], k)
	}
	return strings.Join(parts, ", ")
}

// probeEvents is the pod's probe failures (Unhealthy events), for a
// failure message.
func (c *cluster) probeEvents(ctx context.Context, p *corev1.Pod) string {
	evs, err := c.client.CoreV1().Events(p.Namespace).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.uid=" + string(p.UID) + ",reason=Unhealthy"})
	if err != nil {
		return err.Error()
	}
	var parts []string
	for _, e := range evs.Items {
		parts = append(parts, fmt.Sprintf("%d× %q", e.Count, e.Message))
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}
