package kube

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestUninstall takes Ambit off the cluster the way docs/install.md tells
// a user to (kubectl apply -k manifests/overlays/uninstall): on every node
// the conflist entry and the plugin binary go, and the redirection leaves
// the pods that were enrolled, so they keep talking (in plaintext now)
// instead of being cut off by rules nothing answers any more, and the
// node's probe SNAT table goes with them; pods created
// afterwards start without Ambit. It runs last (its file sorts last): the
// cluster has no Ambit after it.
func TestUninstall(t *testing.T) {
	c := need(t)
	if c.external {
		t.Skip("SKIPPED: uninstalling would remove Ambit from someone else's cluster")
	}
	r := track(t)
	c.installAmbit(t)

	mesh := c.namespace(t, "e2e-uninst", map[string]string{enrollLabel: "ambient"})
	srv := c.runPod(t, podSpec{ns: mesh, name: "server", node: node2})
	c.runPod(t, podSpec{ns: mesh, name: "client", node: node1})
	c.waitAnnotation(t, mesh, "server", "enabled", 30*time.Second)
	c.waitAnnotation(t, mesh, "client", "enabled", 30*time.Second)
	if _, err := c.exec(mesh, "client", 30*time.Second, "/kecho", "client", srv.Status.PodIP+":9000", "before"); err != nil {
		t.Fatalf("enrolled pods before the uninstall: %v", err)
	}

	// The node's probe SNAT (hostrules' inet ambit-host table) is there
	// while Ambit runs, and must go with it: left, it rewrote the source
	// of the kubelet's probes to every pod IP it still listed.
	hostTable := []string{"nft", "list", "table", "inet", "ambit-host"}
	for n := 1; n <= 2; n++ {
		if out, err := c.inNode(n, hostTable...); err != nil {
			t.Fatalf("node %d before the uninstall: no ambit-host table: %v %s", n, err, out)
		}
	}

	t0 := time.Now()
	c.mustKubectl(t, "", "apply", "--server-side", "--force-conflicts", "-k", filepath.Join(manifestsDir(), "overlays", "uninstall"))
	for n := 1; n <= 2; n++ {
		poll(t, 3*time.Minute, fmt.Sprintf("node %d: conflist entry and plugin binary removed", n), func() (bool, error) {
			conf, err := c.inNode(n, "cat", "/etc/cni/net.d/10-amb-k8s.conflist")
			if err != nil {
				return false, nil
			}
			_, binErr := c.inNode(n, "test", "-e", "/opt/cni/bin/ambit-cni")
			return !strings.Contains(conf, "ambit-cni") && binErr != nil, nil
		})
	}
	// And their status: left "enabled", an agent elsewhere (a node not
	// uninstalled yet, a later reinstall) would take them for meshed and
	// send HBONE to port 15008, where nothing listens any more.
	for _, p := range []string{"server", "client"} {
		c.waitAnnotation(t, mesh, p, "", time.Minute)
	}
	// The enrolled pods lose their redirection (--unenroll-all): with the
	// rules left and no agent, every connection would be refused.
	var out string
	poll(t, 2*time.Minute, "the formerly enrolled client to reach the server", func() (bool, error) {
		var err error
		out, err = c.exec(mesh, "client", 10*time.Second, "/kecho", "client", srv.Status.PodIP+":9000", "after")
		return err == nil, nil
	})
	if !strings.Contains(out, "got=after") {
		t.Fatalf("after the uninstall the server answered %q", out)
	}
	for n := 1; n <= 2; n++ {
		poll(t, time.Minute, fmt.Sprintf("node %d: the ambit-host table removed", n), func() (bool, error) {
			_, err := c.inNode(n, hostTable...)
			return err != nil, nil
		})
	}
	took := time.Since(t0)
	// A pod created now in the (still labelled) namespace starts through
	// the primary CNI alone: no chain entry points at an agent that is gone.
	late := c.runPod(t, podSpec{ns: mesh, name: "late", node: node1})
	if _, err := c.exec(mesh, "client", 10*time.Second, "/kecho", "client", late.Status.PodIP+":9000", "late"); err != nil {
		t.Fatalf("a pod created after the uninstall: %v", err)
	}
	r.note("uninstall: entry, binary and in-pod rules gone on both nodes, enrolled pods talking again %.1fs after kubectl apply", took.Seconds())
}
