package kube

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/ambit-mesh/ambit/internal/testenv"
)

// knpVersion is hack/kube/build.sh's KNP_VERSION.
const knpVersion = "v0.8.0"

// The RBAC of kube-network-policies v0.8.0's install.yaml.
const netpolRBAC = `
kind: ClusterRole
apiVersion: rbac.authorization.k8s.io/v1
metadata: {name: kube-network-policies}
rules:
- apiGroups: [""]
  resources: [pods, namespaces]
  verbs: [list, watch]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [list, watch]
---
kind: ClusterRoleBinding
apiVersion: rbac.authorization.k8s.io/v1
metadata: {name: kube-network-policies}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: kube-network-policies}
subjects:
- {kind: ServiceAccount, name: kube-network-policies, namespace: kube-system}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: kube-network-policies, namespace: kube-system}
`

// startNetpol runs sigs.k8s.io/kube-network-policies on both nodes the
// way its DaemonSet does (host network of the node, its service account's
// token at the in-cluster path, the node's nft), as a process inside each
// node's namespaces: its image would need nft and its libraries, which a
// registry-less cluster does not have. NRI is off in the nodes'
// containerd, so it learns pod IPs from the API.
func (c *cluster) startNetpol(t *testing.T) string {
	t.Helper()
	if c.external {
		// Its primary CNI enforces (kind.sh installs Calico). A cluster
		// without an enforcer fails the case: the policy never blocks.
		return "the cluster's own enforcer"
	}
	variant := "upstream"
	if err := nftQueueSupported(); err != nil {
		// A kernel without the nft queue expression (CONFIG_NFT_QUEUE)
		// still has nfnetlink_queue and the xtables NFQUEUE target:
		// hack/kube/build.sh then builds kube-network-policies with its
		// queue statements emitted as that target, the rest upstream's.
		t.Logf("this kernel lacks the nftables queue expression (%v): kube-network-policies queues through the xtables NFQUEUE target", err)
		variant = "xt-queue"
	}
	bin := filepath.Join(c.kbin, "kube-network-policies")
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("kube-network-policies not built (hack/kube/build.sh): %v", err)
	}
	if key, _ := os.ReadFile(bin + ".key"); !strings.Contains(string(key), "variant="+variant) {
		t.Fatalf("%s was built as %q; this kernel needs variant=%s: run hack/kube/build.sh kube-network-policies", bin, strings.TrimSpace(string(key)), variant)
	}
	c.mustKubectl(t, netpolRBAC, "apply", "-f", "-")
	ctx := context.Background()
	exp := int64(3600)
	tr, err := c.client.CoreV1().ServiceAccounts("kube-system").CreateToken(ctx, "kube-network-policies",
		&authnv1.TokenRequest{Spec: authnv1.TokenRequestSpec{ExpirationSeconds: &exp}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	caPEM, err := os.ReadFile(filepath.Join(c.state, "pki", "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	for n := 1; n <= 2; n++ {
		holder, err := os.ReadFile(filepath.Join(c.state, "run", fmt.Sprintf("node%d-holder.pid", n)))
		if err != nil {
			t.Fatal(err)
		}
		// The node's /run is its own tmpfs: /var/run/secrets there is
		// what a pod's in-cluster config reads.
		sa := filepath.Join("/proc", strings.TrimSpace(string(holder)), "root", "run", "secrets", "kubernetes.io", "serviceaccount")
		if err := os.MkdirAll(sa, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(sa, "token"), []byte(tr.Status.Token), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(sa, "ca.crt"), caPEM, 0o644); err != nil {
			t.Fatal(err)
		}
		logf, err := os.Create(filepath.Join(c.state, "logs", fmt.Sprintf("node%d-netpol.log", n)))
		if err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(c.script, "node", fmt.Sprint(n), "env", "KUBERNETES_SERVICE_HOST=198.51.100.1", "KUBERNETES_SERVICE_PORT=6443",
			bin, fmt.Sprintf("--hostname-override=node-%d", n), "--disable-nri", "--nfqueue-id=98",
			"--metrics-bind-address=127.0.0.1:9080", "--v=2")
		cmd.Stdout, cmd.Stderr = logf, logf
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		n := n
		t.Cleanup(func() {
			_ = cmd.Process.Signal(syscall.SIGINT)
			done := make(chan struct{})
			go func() { _ = cmd.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
				<-done
			}
			logf.Close()
			// It leaves its nftables table when killed; a node without
			// the enforcer must not keep enforcing.
			_, _ = c.inNode(n, "nft", "delete", "table", "inet", "kube-network-policies")
		})
	}
	// Running means it programmed its table in each node.
	for n := 1; n <= 2; n++ {
		poll(t, 60*time.Second, fmt.Sprintf("kube-network-policies table on node-%d", n), func() (bool, error) {
			out, err := c.inNode(n, "nft", "list", "tables")
			return err == nil && strings.Contains(out, "kube-network-policies"), nil
		})
	}
	return "kube-network-policies " + knpVersion + " (" + variant + ")"
}

// TestNetworkPolicyCoexistence runs a real NetworkPolicy enforcer next to
// Ambit (kube-network-policies, the one kind's default CNI embeds, on
// cluster.sh's cluster; the primary CNI on an external one: Calico on
// kind.sh's). The documented policies (e2e/kind/networkpolicy.yaml, from
// docs/networkpolicy.md): default-deny except the probe source, plus an
// allow of TCP 15008 from a chosen namespace. Meshed traffic from there
// gets through; meshed traffic from elsewhere and plaintext to the app
// port are blocked; the kubelet's probes, SNATed by Ambit to
// 169.254.7.127, keep the server Ready.
func TestNetworkPolicyCoexistence(t *testing.T) {
	c := need(t)
	r := track(t)
	c.installAmbit(t)
	enforcer := c.startNetpol(t)
	ctx := context.Background()
	mesh := map[string]string{enrollLabel: "ambient"}

	srvNS := c.namespace(t, "e2e-np-srv", mesh)
	okNS := c.namespace(t, "e2e-np-ok", map[string]string{enrollLabel: "ambient", "e2e-np": "allowed"})
	noNS := c.namespace(t, "e2e-np-no", mesh)
	plainNS := c.namespace(t, "e2e-np-plain", map[string]string{"e2e-np": "allowed"})

	sp := kechoPod(podSpec{ns: srvNS, name: "server", node: node2})
	sp.Spec.Containers[0].ReadinessProbe = &corev1.Probe{
		ProbeHandler:  corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(9000)}},
		PeriodSeconds: 1, FailureThreshold: 2,
	}
	if _, err := c.client.CoreV1().Pods(srvNS).Create(ctx, sp, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	srv := c.waitRunning(t, srvNS, "server")
	c.waitAnnotation(t, srvNS, "server", "enabled", 30*time.Second)
	c.runPod(t, podSpec{ns: okNS, name: "client", node: node1})
	c.runPod(t, podSpec{ns: noNS, name: "client", node: node1})
	c.runPod(t, podSpec{ns: plainNS, name: "client", node: node1})
	addr := srv.Status.PodIP + ":9000"

	c.mustKubectl(t, "", "apply", "-n", srvNS, "-f", filepath.Join(testenv.RepoRoot(), "e2e", "kind", "networkpolicy.yaml"))

	try := func(ns string) error {
		_, err := c.exec(ns, "client", 20*time.Second, "/kecho", "client", "-timeout", "3s", addr, "np")
		return err
	}
	// Policies apply asynchronously: wait for the blocked one to block.
	poll(t, 30*time.Second, "the policy to block the other meshed namespace", func() (bool, error) {
		return try(noNS) != nil, nil
	})
	if err := try(okNS); err != nil {
		t.Errorf("meshed client from the allowed namespace blocked: %v", err)
	}
	if err := try(plainNS); err == nil {
		t.Errorf("plaintext to the app port from the allowed namespace got through; only 15008 is allowed")
	}
	// Several probe periods under default-deny: the server stays Ready.
	time.Sleep(5 * time.Second)
	p, err := c.client.CoreV1().Pods(srvNS).Get(ctx, "server", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Status.ContainerStatuses) == 0 || !p.Status.ContainerStatuses[0].Ready {
		t.Errorf("server not Ready under default-deny: kubelet probes are blocked")
	}
	r.note("%s: allowed ns through, other meshed ns and plaintext blocked, probes kept the server Ready", enforcer)
}

// nftQueueSupported tries the one nftables expression the enforcer needs
// (queue to userspace) in a scratch network namespace.
func nftQueueSupported() error {
	ns := "amb-k8s-nfq-" + suffix()
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		return fmt.Errorf("ip netns add: %v %s", err, out)
	}
	defer exec.Command("ip", "netns", "del", ns).Run()
	script := "add table inet t\nadd chain inet t c { type filter hook forward priority 0; }\nadd rule inet t c queue num 98 bypass\n"
	cmd := exec.Command("ip", "netns", "exec", ns, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%v: %s", err, strings.TrimSpace(string(out)))
	}
	return nil
}
