package main

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/ambit-mesh/ambit/node-agent/admin"
)

// showStatus runs the real `ambit-agent status` against the demo's agent,
// as a user on the node would, shows its pods table, and checks what the
// ✔ line claims from the JSON form (the stable one), not the table.
func (d *demo) showStatus(ctx context.Context) {
	stateDir := filepath.Join(d.work, "run")
	step("What the agent says: `ambit-agent status --state-dir %s` (read-only, over a unix socket there)", stateDir)
	// Both asks at once: most of each is the agent binary starting (40-80
	// ms here), and the two views of one agent need not be one picture.
	type answer struct {
		out string
		err error
	}
	jsonc := make(chan answer, 1)
	go func() {
		out, err := d.agentStatus(ctx, stateDir, "-o", "json")
		jsonc <- answer{out, err}
	}()
	table, err := d.agentStatus(ctx, stateDir)
	if err != nil {
		bad("%v", err)
		<-jsonc
		return
	}
	for _, l := range strings.Split(strings.TrimRight(table, "\n"), "\n") {
		say("  %s", l)
	}
	a := <-jsonc
	out, err := a.out, a.err
	if err != nil {
		bad("%v", err)
		return
	}
	// admin.Decode is the status command's own strict reader: a field
	// renamed or another version fails here rather than passing unseen.
	st, err := admin.Decode([]byte(out))
	if err != nil {
		bad("`ambit-agent status -o json`: %v", err)
		return
	}
	if left, problems := d.checkStatus(st); len(problems) > 0 {
		for _, p := range problems {
			bad("%s", p)
		}
	} else {
		ok("the agent reports 3 pods enrolled, each as its own service account (outsider not listed: legacy is not ambient), rules ok, certificates valid for %s", hm(left))
	}
	say("  (more: `status certs` serials, issuer, rotation; `status conns` connections per pod; `-o json` the stable form)")
}

// agentStatus runs `ambit-agent status` with args and returns what it
// printed.
func (d *demo) agentStatus(ctx context.Context, stateDir string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	c := exec.CommandContext(ctx, filepath.Join(d.bin, "ambit-agent"), append([]string{"status", "--state-dir", stateDir}, args...)...)
	var stdout, stderr bytes.Buffer
	c.Stdout, c.Stderr = &stdout, &stderr
	if err := c.Run(); err != nil {
		return "", fmt.Errorf("ambit-agent status %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// checkStatus holds the agent's answer to what the demo made: exactly the
// three shop pods, enrolled at their own IPs with the redirection checked
// and the three listeners, each served as its own service account with a
// certificate that has not expired. It returns the shortest time left on
// those certificates, or what did not hold.
func (d *demo) checkStatus(st *admin.Status) (left time.Duration, problems []string) {
	fail := func(format string, a ...any) { problems = append(problems, fmt.Sprintf(format, a...)) }
	if !st.Agent.Ready || st.Agent.Stopping {
		fail("the agent says it is not ready (ready=%v, stopping=%v)", st.Agent.Ready, st.Agent.Stopping)
	}
	var got []string
	for _, p := range st.Pods {
		got = append(got, p.Namespace+"/"+p.Name)
	}
	// Status sorts its pods by namespace and name.
	if !slices.Equal(got, []string{"shop/client", "shop/intruder", "shop/server"}) {
		fail("the agent lists pods %v, want shop/client, shop/intruder, shop/server (and not legacy/outsider)", got)
		return 0, problems
	}
	certs := map[string]admin.Certificate{}
	for _, c := range st.Certificates {
		certs[c.Identity] = c
	}
	left = -1
	for _, p := range st.Pods {
		name := p.Name
		if p.State != admin.StateEnrolled {
			fail("%s: state %q (%s), want enrolled", name, p.State, p.Reason)
		}
		if ip := d.pods[name].IP; !slices.Contains(p.IPs, ip) {
			fail("%s: IPs %v, want its own %s", name, p.IPs, ip)
		}
		if p.Rules == nil || p.Rules.Result != admin.RulesOK {
			fail("%s: rules %+v, want ok", name, p.Rules)
		}
		if !slices.Equal(p.Listeners, []uint16{15001, 15006, 15008}) {
			fail("%s: listeners %v, want 15001, 15006, 15008", name, p.Listeners)
		}
		id := "spiffe://cluster.local/ns/shop/sa/" + name
		if p.Identity != id {
			fail("%s: identity %q, want %q", name, p.Identity, id)
		}
		// A pod's certificate is fetched when it first needs one (the
		// intruder's too: it presented one before the policy refused it).
		l := p.CertNotAfter.Sub(st.Agent.Now)
		if p.CertNotAfter.IsZero() || l <= 0 {
			fail("%s: certificate not after %v, agent's clock %v: none, or expired", name, p.CertNotAfter, st.Agent.Now)
			continue
		}
		switch c, found := certs[id]; {
		case !found:
			fail("%s: no certificate entry for %s", name, id)
		case c.Failures > 0:
			fail("%s: certificate entry: %d failed fetches: %s", name, c.Failures, c.LastError)
		case !c.NotAfter.Equal(p.CertNotAfter):
			fail("%s: certificate entry not after %v, the pod's %v", name, c.NotAfter, p.CertNotAfter)
		}
		if left < 0 || l < left {
			left = l
		}
	}
	return left, problems
}

// hm is d in hours and minutes, cut (not rounded) as the table's CERT
// EXPIRES is, so the ✔ line and the table say the same.
func hm(d time.Duration) string {
	return fmt.Sprintf("%dh%dm", d/time.Hour, d%time.Hour/time.Minute)
}
