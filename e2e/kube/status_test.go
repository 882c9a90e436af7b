package kube

import (
	"context"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/node-agent/admin"
)

// TestAgentStatus: `ambit-agent status`, run as the docs say an operator
// runs it (kubectl exec into the agent's container, no flags), lists the
// case's meshed pods of that node as enrolled with their IPs, identity
// and certificate; the JSON form is the document the client reads back
// strictly; no private key is in either.
func TestAgentStatus(t *testing.T) {
	c := need(t)
	r := track(t)
	c.installAmbit(t)
	mesh := c.namespace(t, "e2e-status", map[string]string{enrollLabel: "ambient"})
	pods := map[string]string{} // name → IP
	for _, name := range []string{"alpha", "beta"} {
		p := c.runPod(t, podSpec{ns: mesh, name: name, node: node1})
		c.waitAnnotation(t, mesh, name, "enabled", 30*time.Second)
		pods[name] = p.Status.PodIP
	}
	agentPod := c.agentPod(t, node1)
	exec := func(args ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		return c.kubectl(ctx, "", append([]string{"-n", ambitNS, "exec", agentPod.Name, "-c", "agent", "--", "/usr/local/bin/ambit-agent", "status"}, args...)...)
	}

	t0 := time.Now()
	var st *admin.Status
	var out string
	poll(t, 30*time.Second, "status on "+node1+" listing the pods as enrolled", func() (bool, error) {
		var err error
		if out, err = exec("-o", "json"); err != nil {
			return false, nil // the agent may be restarting; poll again
		}
		if st, err = admin.Decode([]byte(out)); err != nil {
			return false, err
		}
		for name := range pods {
			if p := statusPod(st, mesh, name); p == nil || p.State != admin.StateEnrolled {
				return false, nil
			}
		}
		return true, nil
	})
	took := time.Since(t0)
	if st.Agent.Node != node1 || st.Agent.Source != "kubernetes" || !st.Agent.Ready {
		t.Fatalf("agent: %+v, want the ready kubernetes agent of %s", st.Agent, node1)
	}
	for name, ip := range pods {
		p := statusPod(st, mesh, name)
		if len(p.IPs) == 0 || p.IPs[0] != netip.MustParseAddr(ip) {
			t.Errorf("%s: IPs %v, the pod's %s", name, p.IPs, ip)
		}
		if p.Identity != "spiffe://cluster.local/ns/"+mesh+"/sa/default" || p.CertNotAfter.Before(time.Now()) {
			t.Errorf("%s: identity %q, certificate until %v", name, p.Identity, p.CertNotAfter)
		}
		if len(p.Listeners) != 3 || p.Rules == nil || p.Rules.Result != admin.RulesOK {
			t.Errorf("%s: listeners %v, rules %+v", name, p.Listeners, p.Rules)
		}
	}
	table, err := exec()
	if err != nil {
		t.Fatalf("status (table): %v\n%s", err, table)
	}
	for name, ip := range pods {
		if !strings.Contains(table, mesh) || !strings.Contains(table, ip) || !strings.Contains(table, name) {
			t.Errorf("the table lacks %s/%s (%s):\n%s", mesh, name, ip, table)
		}
	}
	certs, err := exec("certs")
	if err != nil {
		t.Fatalf("status certs: %v\n%s", err, certs)
	}
	for _, o := range []string{out, table, certs} {
		if strings.Contains(o, "PRIVATE KEY") {
			t.Fatalf("status output holds a private key:\n%s", o)
		}
	}
	r.note("kubectl exec status: %d pods enrolled on %s, %d certificates, in %.1fs", len(pods), node1, len(st.Certificates), took.Seconds())
}

func statusPod(st *admin.Status, ns, name string) *admin.Pod {
	for i := range st.Pods {
		if st.Pods[i].Namespace == ns && st.Pods[i].Name == name {
			return &st.Pods[i]
		}
	}
	return nil
}
