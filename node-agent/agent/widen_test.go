package agent

import (
	"context"
	"slices"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
	"github.com/ambit-mesh/ambit/plugin/redirect"
)

// TestReadoptionWidensToBothFamilies: IPv4-only pods enrolled by an
// agent that captured the families of a pod's addresses only (as every
// agent before session 16; here one with ipv6: off makes the same
// records and rules). The next agent re-adopts them with both families,
// so their IPv6 link-local addresses are captured without waiting for
// their next sandbox (TestLinkLocalIPv6IsCaptured): the rules are
// repaired once, the records say both. Before, the record's IPv4 alone
// was kept until the pod was recreated. The repair keeps the engine the
// pod's rules were installed with (the conflist's ruleBackend): before,
// a repair always chose anew, so iptables-legacy pods moved to nftables.
func TestReadoptionWidensToBothFamilies(t *testing.T) {
	testenv.RequireRoot(t)
	dir := agentDir(t)
	h1 := startAgent(t, dir, invAmbient, func(o *Options) { o.Config.IPv6 = "off" })
	web, _ := newPair(t, "10.89.10.2", "10.89.10.9")
	enrollLikePlugin(t, h1, "web", web, "10.89.10.2/24")
	leg := newNetns(t, "10.89.11.2/24")
	if resp, err := h1.callBackend(redirect.IptablesLegacy, cniproto.OpAdd, "apps", "leg", "cid-leg", leg, "10.89.11.2/24"); err != nil || resp.Decision != cniproto.Enroll {
		t.Fatalf("ADD with ruleBackend iptables-legacy: %+v %v", resp, err)
	}
	if s := h1.podNow("apps/web").specCopy(); !s.IPv4 || s.IPv6 {
		t.Fatalf("the first agent's spec: %+v, want IPv4 only", s)
	}
	h1.stop()

	h := startAgent(t, dir, invAmbient)
	for _, c := range []struct {
		name    string
		n       *testNetns
		backend redirect.Backend
	}{{"web", web, redirect.Nftables}, {"leg", leg, redirect.IptablesLegacy}} {
		p := h.podNow("apps/" + c.name)
		if p == nil || !p.enrolled() {
			t.Fatalf("apps/%s not re-adopted: %+v", c.name, p)
		}
		want := *p.specCopy()
		if !want.IPv4 || !want.IPv6 {
			t.Fatalf("apps/%s re-adopted with %+v, want both families", c.name, want)
		}
		nsh, err := ns.GetNS(c.n.path)
		if err != nil {
			t.Fatal(err)
		}
		defer nsh.Close()
		eventually(t, "apps/"+c.name+"'s rules for both families", func() bool {
			return redirect.Verify(context.Background(), nsh, want) == nil
		})
		if got := installed(t, c.n); !slices.Equal(got, []redirect.Backend{c.backend}) {
			t.Errorf("apps/%s's rules after the repair are in %v, want %s alone (the engine they were installed with)", c.name, got, c.backend)
		}
	}
	recs, _ := h.a.store.List()
	for _, r := range recs {
		if !r.IPv4 || !r.IPv6 {
			t.Errorf("record of %s/%s after the re-adoption: IPv4 %v, IPv6 %v, want both", r.Namespace, r.Name, r.IPv4, r.IPv6)
		}
	}
}

// TestRepairKeepsTheLiveEngineOfAnUnrecordedPod: a protocol-1 record (a
// version 1 ambit-cni installed the pod's iptables-legacy rules itself,
// so the record names no engine) of an IPv4-only pod. The next agent
// widens it to both families: the repair must keep the engine the pod's
// live rules are in and write it into the record. Before, a record with
// no engine was repaired with the default one: the pod moved from
// iptables-legacy to nftables.
func TestRepairKeepsTheLiveEngineOfAnUnrecordedPod(t *testing.T) {
	testenv.RequireRoot(t)
	dir := agentDir(t)
	h1 := startAgent(t, dir, invAmbient, func(o *Options) { o.Config.IPv6 = "off" })
	leg := newNetns(t, "10.89.13.2/24")
	if resp, err := h1.callBackend(redirect.IptablesLegacy, cniproto.OpAdd, "apps", "leg", "cid-leg", leg, "10.89.13.2/24"); err != nil || resp.Decision != cniproto.Enroll {
		t.Fatalf("ADD with ruleBackend iptables-legacy: %+v %v", resp, err)
	}
	recs, errs := h1.a.store.List()
	if len(errs) != 0 || len(recs) != 1 {
		t.Fatalf("records after the ADD: %+v %v", recs, errs)
	}
	rec := recs[0]
	rec.Backend = "" // as a protocol-1 ADD leaves it
	if ok, err := h1.a.store.Update(rec); !ok || err != nil {
		t.Fatalf("clearing the record's engine: %v %v", ok, err)
	}
	h1.stop()

	h := startAgent(t, dir, invAmbient)
	p := h.podNow("apps/leg")
	if p == nil || !p.enrolled() {
		t.Fatalf("apps/leg not re-adopted: %+v", p)
	}
	want := *p.specCopy()
	if !want.IPv4 || !want.IPv6 {
		t.Fatalf("re-adopted with %+v, want both families", want)
	}
	nsh, err := ns.GetNS(leg.path)
	if err != nil {
		t.Fatal(err)
	}
	defer nsh.Close()
	eventually(t, "apps/leg's rules for both families", func() bool {
		return redirect.Verify(context.Background(), nsh, want) == nil
	})
	if got := installed(t, leg); !slices.Equal(got, []redirect.Backend{redirect.IptablesLegacy}) {
		t.Errorf("rules after the repair are in %v, want iptables-legacy alone (the engine holding them)", got)
	}
	eventually(t, "the record naming iptables-legacy", func() bool {
		recs, _ := h.a.store.List()
		return len(recs) == 1 && recs[0].Backend == string(redirect.IptablesLegacy)
	})
}
