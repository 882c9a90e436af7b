package agent

import (
	"context"
	"os"
	"slices"
	"sync"
	"testing"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
	"github.com/ambit-mesh/ambit/plugin/redirect"
)

// TestWideningWithoutIp6tablesKeepsCapture: after an upgrade on a node
// without ip6tables whose agent runs with IPv6 on (host rules in
// nftables, which need no ip6tables), a pod enrolled IPv4-only with
// iptables-legacy (the conflist's ruleBackend) is repaired to both
// families: its own engine cannot (no ip6tables), so nftables takes it.
// The pod must stay captured throughout. Before, the install with the
// pod's engine replaced the IPv4 rules, failed on ip6tables-legacy-save
// and its rollback removed them: the pod had no capture at all until
// the fallback install, and for good where nftables failed too.
func TestWideningWithoutIp6tablesKeepsCapture(t *testing.T) {
	testenv.RequireRoot(t)
	dir := agentDir(t)
	h1 := startAgent(t, dir, invAmbient, func(o *Options) { o.Config.IPv6 = "off" })
	leg := newNetns(t, "10.89.12.2/24")
	if resp, err := h1.callBackend(redirect.IptablesLegacy, cniproto.OpAdd, "apps", "leg", "cid-leg", leg, "10.89.12.2/24"); err != nil || resp.Decision != cniproto.Enroll {
		t.Fatalf("ADD with ruleBackend iptables-legacy: %+v %v", resp, err)
	}
	h1.stop()

	testenv.PathWithoutIp6tables(t)
	v4 := redirect.DefaultSpec()
	v4.IPv6 = false
	var (
		mu   sync.Mutex
		gaps []string
	)
	h := startAgent(t, dir, invAmbient, func(o *Options) {
		o.Rules = afterInstall{Rules: Rules{}, fn: func(f *os.File, b redirect.Backend, err error) {
			if err == nil {
				return
			}
			// A failed install must leave the pod's capture as it was.
			if verr := (Rules{}).Verify(context.Background(), f, v4); verr != nil {
				mu.Lock()
				gaps = append(gaps, "after the failed install with "+string(b)+" ("+err.Error()+"): "+verr.Error())
				mu.Unlock()
			}
		}}
	})
	p := h.podNow("apps/leg")
	if p == nil || !p.enrolled() {
		t.Fatalf("apps/leg not re-adopted: %+v", p)
	}
	want := *p.specCopy()
	if !want.IPv4 || !want.IPv6 {
		t.Fatalf("re-adopted with %+v, want both families", want)
	}
	eventually(t, "apps/leg's rules for both families", func() bool {
		return (Rules{}).Verify(context.Background(), leg.file, want) == nil
	})
	if got := installed(t, leg); !slices.Equal(got, []redirect.Backend{redirect.Nftables}) {
		t.Errorf("rules after the repair in %v, want nftables alone (iptables-legacy cannot hold IPv6 here)", got)
	}
	mu.Lock()
	defer mu.Unlock()
	for _, g := range gaps {
		t.Errorf("the pod's IPv4 capture was gone %s", g)
	}
}

// afterInstall is a Redirector that runs fn after each Install.
type afterInstall struct {
	Rules
	fn func(f *os.File, b redirect.Backend, err error)
}

func (r afterInstall) Install(ctx context.Context, f *os.File, b redirect.Backend, spec redirect.Spec) (string, error) {
	used, err := r.Rules.Install(ctx, f, b, spec)
	r.fn(f, b, err)
	return used, err
}
