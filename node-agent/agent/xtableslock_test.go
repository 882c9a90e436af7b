package agent

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ambit-mesh/ambit/e2e/lab"
	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/config"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
	"github.com/ambit-mesh/ambit/plugin/redirect"
)

// TestAddWhileXtablesLockHeld: the host's xtables lock (one file for
// every netns of the node) is held by someone else while an ADD
// installs its pod's rules with iptables-legacy, whose restores wait for
// it. The answer must reach the plugin by the request's deadline:
// retryable (the plugin's CNI code 11), naming the lock and the
// deadline, with no rules of ours left in the pod's netns and its
// listeners released; once the lock is free the retried ADD enrolls the
// pod. Before, each iptables run had its own 10 s bound: the answer came
// after 10 s, past the connection's deadline, and the plugin got none.
func TestAddWhileXtablesLockHeld(t *testing.T) {
	testenv.RequireRoot(t)
	const timeout = 2 * time.Second
	h := startAgent(t, "", invAmbient, func(o *Options) {
		o.Config.RequestTimeout = config.Duration{Duration: timeout}
	})
	n := newNetns(t, "10.63.9.2/24")
	release := testenv.HoldXtablesLock(t)

	req := &cniproto.Request{Version: cniproto.Version, Op: cniproto.OpAdd, RuleBackend: redirect.IptablesLegacy,
		Pod: cniproto.Pod{Namespace: "apps", Name: "web", UID: "uid-web", ContainerID: "cid-web", Netns: n.path}}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	start := time.Now()
	resp, err := cniproto.Call(ctx, h.sock, req, n.file)
	took := time.Since(start)
	if err != nil {
		t.Fatalf("ADD while the xtables lock is held: no answer after %v: %v", took.Round(time.Millisecond), err)
	}
	t.Logf("ADD while the xtables lock is held: answered after %v: %+v", took.Round(time.Millisecond), resp)
	if !resp.Retryable || resp.Code != 0 || resp.Decision != "" {
		t.Errorf("answer %+v, want a retryable error (CNI code 11 at the plugin)", resp)
	}
	for _, want := range []string{"apps/web", "deadline", "xtables lock"} {
		if !strings.Contains(resp.Error, want) {
			t.Errorf("answer does not say %q: %s", want, resp.Error)
		}
	}
	if got := installed(t, n); len(got) != 0 {
		t.Errorf("rules left in the pod's netns: %v", got)
	}
	if v := testutil.ToFloat64(h.a.m.failures.WithLabelValues("rules-deadline")); v != 1 {
		t.Errorf("enrollment failures for rules-deadline: %v, want 1", v)
	}
	eventually(t, "the pod's listeners released", func() bool { return h.tun.Live() == 0 })

	release()
	resp = h.callV(2, redirect.IptablesLegacy, cniproto.OpAdd, "apps", "web", n)
	if resp.Error != "" || resp.Decision != cniproto.Enroll {
		t.Fatalf("ADD retried once the lock is free: %+v", resp)
	}
	if got := installed(t, n); !slices.Equal(got, []redirect.Backend{redirect.IptablesLegacy}) {
		t.Fatalf("backends after the retried ADD: %v", got)
	}
	if err := (Rules{}).Verify(context.Background(), n.file, *resp.Redirect); err != nil {
		t.Fatalf("rules after the retried ADD: %v", err)
	}
	if h.tun.Live() != 1 {
		t.Fatalf("%d servings after the retried ADD, want 1", h.tun.Live())
	}
}

// TestXtablesLockAnsweredToRuntime: the same through libcni and the real
// ambit-cni, as the kubelet's runtime sees it: "try again later" (code
// 11) naming the lock, not ambit-cni's protocol error 101 ("closed the
// connection without answering"), and the retry succeeds.
func TestXtablesLockAnsweredToRuntime(t *testing.T) {
	testenv.RequireRoot(t)
	cni := testenv.Binary(t, "ambit-cni")
	set := testenv.PluginSets(t)[0]
	h := startAgent(t, "", invAmbient, func(o *Options) {
		o.Config.RequestTimeout = config.Duration{Duration: 2 * time.Second}
	})
	dir, _ := os.MkdirTemp("", "amb-agt-lab-")
	t.Cleanup(func() { os.RemoveAll(dir) })
	node, err := lab.NewNode(lab.NodeOptions{
		Name:       "amb-agt-" + lab.RandSuffix(),
		PodCIDR:    netip.MustParsePrefix("10.81.11.0/24"),
		PluginDirs: []string{set.Dir, filepath.Dir(cni)},
		CNIVersion: set.MaxCNIVersion,
		Ambit: map[string]any{"agentSocket": h.sock, "snapshotFile": filepath.Join(h.dir, "enrollment-snapshot.json"),
			"ruleBackend": string(redirect.IptablesLegacy)},
		Dir: dir,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { node.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	release := testenv.HoldXtablesLock(t)
	start := time.Now()
	_, err = node.AddPod(ctx, "apps", "web")
	t.Logf("CNI ADD while the xtables lock is held: %v (after %v)", err, time.Since(start).Round(time.Millisecond))
	var cerr *types.Error
	if !errors.As(err, &cerr) || cerr.Code != types.ErrTryAgainLater || !strings.Contains(cerr.Msg, "xtables lock") {
		t.Fatalf("CNI ADD while the xtables lock is held: %v, want code %d naming the lock", err, types.ErrTryAgainLater)
	}
	release()
	web, err := node.AddPod(ctx, "apps", "web")
	if err != nil {
		t.Fatalf("CNI ADD once the lock is free: %v", err)
	}
	if err := redirect.Verify(context.Background(), web.NetNS, *h.a.podByName("apps/web").specCopy()); err != nil {
		t.Fatalf("rules after the retried ADD: %v", err)
	}
}

// TestRepeatedAddWhileXtablesLockHeld: the ADD of a sandbox the agent
// already serves, with its rules all in, comes again (the same netns)
// while the xtables lock is held past the request's deadline. Its rules
// are exactly what the ADD asks for, so it is answered as done and the
// pod keeps its rules, routes and listeners. Before, the cut install's
// rollback ran with the lock still held: it removed the pod's routes but
// not its rules, the pod stayed served with its inbound captured and the
// replies to the agent's dials routed out of the pod, and the runtime
// got a retryable error for a sandbox that worked.
func TestRepeatedAddWhileXtablesLockHeld(t *testing.T) {
	testenv.RequireRoot(t)
	h := startAgent(t, "", invAmbient, func(o *Options) {
		o.Config.RequestTimeout = config.Duration{Duration: 2 * time.Second}
	})
	n := newNetns(t, "10.63.9.3/24")
	resp := h.callV(2, redirect.IptablesLegacy, cniproto.OpAdd, "apps", "web", n)
	if resp.Error != "" || resp.Decision != cniproto.Enroll {
		t.Fatalf("first ADD: %+v", resp)
	}
	spec := *resp.Redirect
	testenv.HoldXtablesLock(t)
	start := time.Now()
	resp = h.callV(2, redirect.IptablesLegacy, cniproto.OpAdd, "apps", "web", n)
	t.Logf("repeated ADD while the xtables lock is held: answered after %v: %+v", time.Since(start).Round(time.Millisecond), resp)
	if resp.Error != "" || resp.Decision != cniproto.Enroll {
		t.Errorf("repeated ADD of a served sandbox with its rules in: %+v, want enrolled", resp)
	}
	if err := (Rules{}).Verify(context.Background(), n.file, spec); err != nil {
		t.Errorf("the served pod's redirection after the repeated ADD: %v", err)
	}
	if h.tun.Live() != 1 {
		t.Errorf("%d servings after the repeated ADD, want 1", h.tun.Live())
	}
}
