package kube

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// mirrorAnnotation is the kubelet's mark on a static pod's mirror: its
// value is the kubelet's UID of the pod, the one its sandbox carries.
const mirrorAnnotation = "kubernetes.io/config.mirror"

// TestStaticPod: a static pod with a pod network (not hostNetwork), run by
// node-1's kubelet from a manifest in its staticPodPath, starts, in an
// ambient namespace and in one outside the mesh, and the ambient one is
// enrolled. Its sandbox's K8S_POD_UID is the kubelet's UID (the mirror's
// kubernetes.io/config.mirror), not the mirror's own: agents from
// 8ca435f to before 27fb483 answered every such ADD "the view still has
// the previous pod of this name; retry", and the pod never ran (with the
// agent of 27fb483~1 this case fails so). MeshedClientFailsClosed: a
// meshed client's request to the ambient one fails closed, because the
// CA gives a static pod no identity (docs/agent.md "Static pods").
func TestStaticPod(t *testing.T) {
	c := need(t)
	r := track(t)
	if c.external {
		t.Skip("SKIPPED: static pods need a manifest in a node's staticPodPath, which only cluster.sh's cluster sets (e2e/kube/cluster.sh)")
	}
	c.installAmbit(t)
	dir := filepath.Join(c.state, "node1", "manifests")
	if _, err := os.Stat(dir); err != nil {
		t.Fatalf("node-1's staticPodPath: %v (cluster.sh sets it in the KubeletConfiguration)", err)
	}
	mesh := c.namespace(t, "e2e-static", map[string]string{enrollLabel: "ambient"})
	plain := c.namespace(t, "e2e-static-plain", nil)

	static := func(ns string) *corev1.Pod {
		t.Helper()
		p := kechoPod(podSpec{ns: ns, name: "static", node: node1})
		p.TypeMeta = metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"}
		b, err := json.Marshal(p)
		if err != nil {
			t.Fatal(err)
		}
		// Written aside and renamed: the kubelet skips dot files and
		// never reads half a manifest.
		file := filepath.Join(dir, ns+".json")
		tmp := filepath.Join(dir, "."+ns+".json")
		if err := os.WriteFile(tmp, b, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, file); err != nil {
			t.Fatal(err)
		}
		// Registered after the namespace's deletion, so run before it:
		// the kubelet stops the pod and deletes its mirror, and later
		// cases find node-1 as it was.
		mirror := "static-" + node1
		t.Cleanup(func() {
			_ = os.Remove(file)
			if !pollOK(90*time.Second, func() (bool, error) {
				_, err := c.client.CoreV1().Pods(ns).Get(context.Background(), mirror, metav1.GetOptions{})
				return apierrors.IsNotFound(err), nil
			}) {
				t.Errorf("mirror pod %s/%s still there 90s after its manifest was removed", ns, mirror)
			}
		})
		t0 := time.Now()
		m := c.waitRunningWithin(t, ns, mirror, 90*time.Second,
			" (a static pod's sandbox carries the kubelet's UID, not the mirror's; an agent that wants the mirror's answers its ADD 'retry' for ever)")
		r.note("%s: mirror Running %.1fs after its manifest", ns, time.Since(t0).Seconds())
		return m
	}

	m := static(mesh)
	// The fact the agent relies on (27fb483), seen from the runtime: the
	// sandbox's pod UID is the mirror annotation's, not the mirror's UID.
	kubeletUID := m.Annotations[mirrorAnnotation]
	if kubeletUID == "" || kubeletUID == string(m.UID) {
		t.Fatalf("mirror %s/%s: UID %s, %s=%q; want a kubelet UID of its own there", mesh, m.Name, m.UID, mirrorAnnotation, kubeletUID)
	}
	if got := c.sandboxPodUID(t, 1, mesh, m.Name); got != kubeletUID {
		t.Fatalf("the sandbox of %s/%s carries pod UID %q, want the kubelet's %q (the mirror's own is %s)", mesh, m.Name, got, kubeletUID, m.UID)
	}
	r.note("sandbox UID %s = %s, mirror UID %s", kubeletUID, mirrorAnnotation, m.UID)
	c.waitAnnotation(t, mesh, m.Name, "enabled", 30*time.Second)

	// Outside the mesh the static pod starts too (the same ADD check
	// held it before 27fb483) and plaintext reaches it.
	p := static(plain)
	if p.Annotations[redirectAnnot] == "enabled" {
		t.Fatalf("static pod %s/%s outside the mesh was enrolled", plain, p.Name)
	}
	c.runPod(t, podSpec{ns: plain, name: "client", node: node2})
	if out, err := c.exec(plain, "client", 30*time.Second, "/kecho", "client", p.Status.PodIP+":9000", "plain"); err != nil {
		t.Fatalf("client outside the mesh → static pod outside it: %v %s", err, out)
	}

	t.Run("MeshedClientFailsClosed", func(t *testing.T) {
		r := track(t)
		c.runPod(t, podSpec{ns: mesh, name: "client", node: node2})
		c.waitAnnotation(t, mesh, "client", "enabled", 30*time.Second)
		secret := "AMBIT-E2E-STATIC-" + suffix()
		out, err := c.exec(mesh, "client", 30*time.Second, "/kecho", "client", m.Status.PodIP+":9000", secret)
		// A mirror pod has no serviceAccountName (NodeRestriction admits
		// none on a mirror); the agent asks for the namespace's default,
		// and the CA, which issues an identity only to a node running a
		// pod of it, refuses: issuing <ns>/default to any node that makes
		// a mirror pod would let a compromised node mint that identity in
		// every namespace. So meshed connections to the static pod fail
		// closed (docs/agent.md "Static pods"): never plaintext, never the
		// payload delivered.
		if err == nil || strings.Contains(out, "got="+secret) {
			t.Fatalf("meshed client → static pod in the mesh: %v %q; want it refused (the CA issues no identity to a static pod)", err, out)
		}
		said := c.agentLogLines(t, node1, mesh)
		refused := fmt.Sprintf("CA refused (403 not_on_node): no running pod of service account %s/default on node %s", mesh, node1)
		if !strings.Contains(said, refused) || m.Spec.ServiceAccountName != "" {
			t.Fatalf("meshed client → static pod failed (%v), but not for the CA's refusal of its identity; node-1's agent on %s:\n%s", err, mesh, said)
		}
		r.note("meshed client → static pod fails closed: the CA refuses %s/default (no service account on a mirror)", mesh)
	})
}

// sandboxPodUID is the pod UID that node n's containerd holds for the
// containers of pod ns/name: the K8S_POD_UID its CNI ADD was given.
func (c *cluster) sandboxPodUID(t *testing.T, n int, ns, name string) string {
	t.Helper()
	filter := fmt.Sprintf(`labels."io.kubernetes.pod.name"==%q,labels."io.kubernetes.pod.namespace"==%q`, name, ns)
	out, err := c.inNode(n, "ctr", "-n", "k8s.io", "containers", "ls", "-q", filter)
	if err != nil {
		t.Fatalf("ctr containers ls on node-%d: %v %s", n, err, out)
	}
	// inNode mixes in ctr's stderr (a cgroup v1 deprecation warning):
	// the IDs are the lines that are one word.
	var ids []string
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) == 1 {
			ids = append(ids, f[0])
		}
	}
	if len(ids) == 0 {
		t.Fatalf("node-%d's containerd has no container of %s/%s", n, ns, name)
	}
	uid := ""
	for _, id := range ids {
		info, err := c.inNode(n, "ctr", "-n", "k8s.io", "containers", "info", id)
		if err != nil {
			t.Fatalf("ctr containers info %s: %v %s", id, err, info)
		}
		var ct struct{ Labels map[string]string }
		if i := strings.Index(info, "\n{"); i >= 0 && !strings.HasPrefix(info, "{") {
			info = info[i+1:]
		}
		if err := json.NewDecoder(strings.NewReader(info)).Decode(&ct); err != nil {
			t.Fatalf("ctr containers info %s: %v", id, err)
		}
		u := ct.Labels["io.kubernetes.pod.uid"]
		if uid != "" && u != uid {
			t.Fatalf("containers of %s/%s carry pod UIDs %s and %s", ns, name, uid, u)
		}
		uid = u
	}
	return uid
}

// agentLogLines is what node's agent (its agent container) logged that
// mentions any of words, for a failure message.
func (c *cluster) agentLogLines(t *testing.T, node string, words ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := c.kubectl(ctx, "", "-n", ambitNS, "logs", c.agentPod(t, node).Name, "-c", "agent")
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	var b strings.Builder
	for _, line := range strings.Split(out, "\n") {
		for _, w := range words {
			if strings.Contains(line, w) {
				b.WriteString(line + "\n")
				break
			}
		}
	}
	return b.String()
}
