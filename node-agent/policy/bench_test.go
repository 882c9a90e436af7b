package policy

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/ambit-mesh/ambit/tunnel"
)

// BenchmarkAuthorize measures the authorization cost of one connection
// setup with 0, 100 and 10,000 rules in scope of the destination. The
// goal is ≤10 µs added at 10,000 rules; compare each line with rules=0.
//
// Shapes:
//   - exact: one namespace-wide ALLOW policy, rules with exact principals
//     and a port (the common case), the caller matching the last rule;
//   - policies: 1,000 ALLOW policies × 10 rules, half of them selecting
//     the workload by label, the rest namespace-wide (like ztunnel's rbac
//     bench);
//   - nsprefix: principals "td/ns/<ns>/*" (filed by namespace);
//   - sasuffix: principals "*/sa/<sa>" (filed by service account);
//   - ipblocks: only source CIDRs (filed by prefix, one lookup per
//     prefix length in use);
//   - scan: rules the index cannot file (notPrincipals only), the worst
//     case, scanned linearly;
//   - denied: as exact, but no rule matches (the deny path, counted).
func BenchmarkAuthorize(b *testing.B) {
	for _, shape := range []string{"exact", "policies", "nsprefix", "sasuffix", "ipblocks", "scan", "denied"} {
		for _, n := range []int{0, 100, 10000} {
			if n == 0 && shape != "exact" {
				continue
			}
			b.Run(fmt.Sprintf("shape=%s/rules=%d", shape, n), func(b *testing.B) {
				e := New(Options{DenialLogsPerSecond: 1})
				e.log = discardLogger()
				set, c := benchSet(shape, n)
				e.Update("bench", set)
				v := e.Authorize(c)
				if want := shape != "denied"; v.Allow != want {
					b.Fatalf("verdict %+v, want allow=%v", v, want)
				}
				b.ReportAllocs()
				b.ResetTimer()
				for b.Loop() {
					e.Authorize(c)
				}
			})
		}
	}
}

func benchSet(shape string, n int) (Set, tunnel.ConnInfo) {
	dst := tunnel.Workload{UID: "u", Namespace: "shop", Name: "web-1",
		Labels: map[string]string{"app": "web", "version": "v1", "pod-template-hash": "5d9c7"}, Identity: "spiffe://cluster.local/ns/shop/sa/web"}
	c := tunnel.ConnInfo{SrcIP: netip.MustParseAddr("10.1.0.5"), Dst: dst, DstPort: 8080}
	var set Set
	p := AuthorizationPolicy{Spec: AuthorizationPolicySpec{Action: Allow}}
	p.Namespace, p.Name = "shop", "bench"
	last := n - 1
	switch shape {
	case "exact", "denied":
		for i := range n {
			p.Spec.Rules = append(p.Spec.Rules, Rule{
				From: &Source{Principals: []string{fmt.Sprintf("cluster.local/ns/ns%d/sa/sa%d", i%50, i)}},
				To:   &Destination{Ports: []int32{8080}}})
		}
		c.SrcIdentity = fmt.Sprintf("spiffe://cluster.local/ns/ns%d/sa/sa%d", last%50, last)
		if shape == "denied" {
			c.SrcIdentity = "spiffe://cluster.local/ns/ns1/sa/intruder"
		}
		if n > 0 {
			set.Policies = append(set.Policies, p)
		}
	case "policies":
		for i := range n / 10 {
			q := AuthorizationPolicy{Spec: AuthorizationPolicySpec{Action: Allow}}
			q.Namespace, q.Name = "shop", fmt.Sprintf("p%d", i)
			if i%2 == 0 {
				q.Spec.Selector = &Selector{MatchLabels: map[string]string{"app": "web"}}
			}
			for j := range 10 {
				k := i*10 + j
				q.Spec.Rules = append(q.Spec.Rules, Rule{
					From: &Source{Principals: []string{fmt.Sprintf("cluster.local/ns/ns%d/sa/sa%d", k%50, k)}},
					To:   &Destination{Ports: []int32{8080}}})
			}
			set.Policies = append(set.Policies, q)
		}
		c.SrcIdentity = fmt.Sprintf("spiffe://cluster.local/ns/ns%d/sa/sa%d", last%50, last)
	case "nsprefix":
		for i := range n {
			p.Spec.Rules = append(p.Spec.Rules, Rule{From: &Source{Principals: []string{fmt.Sprintf("cluster.local/ns/ns%d/*", i)}}})
		}
		c.SrcIdentity = fmt.Sprintf("spiffe://cluster.local/ns/ns%d/sa/x", last)
		set.Policies = append(set.Policies, p)
	case "sasuffix":
		for i := range n {
			p.Spec.Rules = append(p.Spec.Rules, Rule{From: &Source{Principals: []string{fmt.Sprintf("*/sa/sa%d", i)}}})
		}
		c.SrcIdentity = fmt.Sprintf("spiffe://cluster.local/ns/x/sa/sa%d", last)
		set.Policies = append(set.Policies, p)
	case "ipblocks":
		for i := range n {
			bits := []int{24, 28, 32}[i%3]
			p.Spec.Rules = append(p.Spec.Rules, Rule{From: &Source{
				IPBlocks: []string{fmt.Sprintf("10.%d.%d.0/%d", i/256%256, i%256, bits)}}})
		}
		c.SrcIdentity = "spiffe://cluster.local/ns/x/sa/x"
		c.SrcIP = netip.MustParseAddr(fmt.Sprintf("10.%d.%d.0", last/256%256, last%256))
		set.Policies = append(set.Policies, p)
	case "scan":
		// Every rule but the last excludes the caller: all are checked.
		for i := range n {
			who := "cluster.local/ns/x/sa/caller"
			if i == last {
				who = "cluster.local/ns/x/sa/nobody"
			}
			p.Spec.Rules = append(p.Spec.Rules, Rule{From: &Source{NotPrincipals: []string{who}}})
		}
		c.SrcIdentity = "spiffe://cluster.local/ns/x/sa/caller"
		set.Policies = append(set.Policies, p)
	}
	set.Policies = chunk(set.Policies)
	return set, c
}

// chunk splits policies into ones of at most 1,000 rules (MaxRules).
func chunk(in []AuthorizationPolicy) []AuthorizationPolicy {
	var out []AuthorizationPolicy
	for _, p := range in {
		for i := 0; i == 0 || i < len(p.Spec.Rules); i += 1000 {
			q := p
			q.Name = fmt.Sprintf("%s-%d", p.Name, i/1000)
			q.Spec.Rules = p.Spec.Rules[i:min(i+1000, len(p.Spec.Rules))]
			out = append(out, q)
		}
	}
	return out
}

// BenchmarkUpdate measures a policy change: decode-free recompilation of
// the whole set (10,000 rules) and the swap, i.e. the delay before a
// change is enforced and Reauthorize can run.
func BenchmarkUpdate(b *testing.B) {
	for _, n := range []int{100, 10000} {
		b.Run(fmt.Sprintf("rules=%d", n), func(b *testing.B) {
			setA, _ := benchSet("policies", n)
			setB, _ := benchSet("exact", n)
			e := New(Options{Logger: discardLogger()})
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				if i%2 == 0 {
					e.Update("bench", setA)
				} else {
					e.Update("bench", setB)
				}
				i++
			}
		})
	}
}
