package agent

import (
	"context"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/keeper"
	"github.com/ambit-mesh/ambit/node-agent/state"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
	"github.com/ambit-mesh/ambit/plugin/redirect"
)

// callV sends one request of the given version and backend override.
func (h *harness) callV(version int, backend redirect.Backend, op cniproto.Op, ns, name string, n *testNetns) *cniproto.Response {
	h.t.Helper()
	req := &cniproto.Request{Version: version, Op: op, RuleBackend: backend,
		Pod: cniproto.Pod{Namespace: ns, Name: name, UID: "uid-" + name, ContainerID: "cid-" + name}}
	var f *os.File
	if n != nil {
		req.Pod.Netns, f = n.path, n.file
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := cniproto.Call(ctx, h.sock, req, f)
	if err != nil {
		h.t.Fatalf("v%d %s %s/%s: %v", version, op, ns, name, err)
	}
	return resp
}

func installed(t *testing.T, n *testNetns) []redirect.Backend {
	t.Helper()
	found, err := (Rules{}).Installed(context.Background(), n.file)
	if err != nil {
		t.Fatal(err)
	}
	return found
}

// TestRulesAtAddCheckDel: since protocol version 2 the agent does the
// netns work of ADD, CHECK and DEL on the fd it receives — install before
// answering enroll (idempotent, with the conflist's backend override),
// verify at CHECK (a deleted rule, or rules in a pod that is not
// enrolled, is a CodeCheck error), remove at DEL — while a version 1
// plugin still gets the bare decision and installs itself. A failed
// install answers CodeRedirect, leaves no rules and stops serving.
func TestRulesAtAddCheckDel(t *testing.T) {
	testenv.RequireRoot(t)
	h := startAgent(t, "", invAmbient)
	n := newNetns(t, "10.63.0.2/24")

	resp := h.callV(2, "", cniproto.OpAdd, "apps", "web", n)
	if resp.Decision != cniproto.Enroll || resp.Error != "" {
		t.Fatalf("ADD: %+v", resp)
	}
	if err := (Rules{}).Verify(context.Background(), n.file, *resp.Redirect); err != nil {
		t.Fatalf("rules after ADD: %v", err)
	}
	if got := installed(t, n); !slices.Equal(got, []redirect.Backend{redirect.Nftables}) {
		t.Fatalf("backends after ADD (auto): %v", got)
	}
	if resp := h.callV(2, "", cniproto.OpCheck, "apps", "web", n); resp.Error != "" || resp.Decision != cniproto.Enroll {
		t.Fatalf("CHECK of intact rules: %+v", resp)
	}
	// Someone flushes a chain: CHECK says so with the plugin's code.
	if out, err := exec.Command("ip", "netns", "exec", n.name, "nft", "flush", "chain", "inet", redirect.TableName, "nat-prerouting").CombinedOutput(); err != nil {
		t.Fatalf("nft flush: %v %s", err, out)
	}
	if resp := h.callV(2, "", cniproto.OpCheck, "apps", "web", n); resp.Code != cniproto.CodeCheck || !strings.Contains(resp.Error, "apps/web") {
		t.Fatalf("CHECK after a flushed chain: %+v, want code %d naming the pod", resp, cniproto.CodeCheck)
	}
	// The runtime repeats ADD: the same state again, still one serving.
	if resp := h.callV(2, "", cniproto.OpAdd, "apps", "web", n); resp.Decision != cniproto.Enroll || resp.Error != "" {
		t.Fatalf("repeated ADD: %+v", resp)
	}
	if resp := h.callV(2, "", cniproto.OpCheck, "apps", "web", n); resp.Error != "" {
		t.Fatalf("CHECK after the repeated ADD: %+v", resp)
	}
	if live := h.tun.Live(); live != 1 {
		t.Fatalf("%d servings, want 1", live)
	}
	// DEL with the netns: rules removed, pod forgotten.
	if resp := h.callV(2, "", cniproto.OpDel, "apps", "web", n); resp.Error != "" {
		t.Fatalf("DEL: %+v", resp)
	}
	if got := installed(t, n); len(got) != 0 {
		t.Fatalf("rules left after DEL: %v", got)
	}
	eventually(t, "listeners closed after DEL", func() bool { return h.tun.Live() == 0 })

	// A pod that is not enrolled but holds our rules fails CHECK.
	other := newNetns(t, "10.63.1.2/24")
	if resp := h.callV(2, "", cniproto.OpAdd, "legacy", "old", other); resp.Decision != cniproto.Skip || len(installed(t, other)) != 0 {
		t.Fatalf("ADD of a pod outside the mesh: %+v, rules %v", resp, installed(t, other))
	}
	if _, err := (Rules{}).Install(context.Background(), other.file, "", redirect.DefaultSpec()); err != nil {
		t.Fatal(err)
	}
	if resp := h.callV(2, "", cniproto.OpCheck, "legacy", "old", other); resp.Code != cniproto.CodeCheck || !strings.Contains(resp.Error, "not enrolled") {
		t.Fatalf("CHECK of a skipped pod holding rules: %+v", resp)
	}

	// A version 1 plugin installs itself: the agent answers the spec in
	// version 1 and leaves the netns alone.
	v1 := newNetns(t, "10.63.2.2/24")
	resp = h.callV(1, "", cniproto.OpAdd, "apps", "v1pod", v1)
	if resp.Version != 1 || resp.Decision != cniproto.Enroll || resp.Redirect == nil {
		t.Fatalf("v1 ADD: %+v", resp)
	}
	if got := installed(t, v1); len(got) != 0 {
		t.Fatalf("the agent installed rules for a version 1 plugin: %v", got)
	}

	// The conflist's backend override is the one used.
	leg := newNetns(t, "10.63.3.2/24")
	if resp := h.callV(2, redirect.IptablesLegacy, cniproto.OpAdd, "apps", "leg", leg); resp.Error != "" {
		t.Fatalf("ADD with ruleBackend iptables-legacy: %+v", resp)
	}
	if got := installed(t, leg); !slices.Equal(got, []redirect.Backend{redirect.IptablesLegacy}) {
		t.Fatalf("backends with the iptables-legacy override: %v", got)
	}

	// An install that fails (the backend's tools are missing).
	live := h.tun.Live()
	bad := newNetns(t, "10.63.4.2/24")
	path := os.Getenv("PATH")
	t.Setenv("PATH", t.TempDir())
	resp = h.callV(2, redirect.IptablesNft, cniproto.OpAdd, "apps", "bad", bad)
	t.Setenv("PATH", path)
	if resp.Code != cniproto.CodeRedirect || !strings.Contains(resp.Error, "installing the redirection for pod apps/bad") {
		t.Fatalf("failed install: %+v, want code %d", resp, cniproto.CodeRedirect)
	}
	if got := installed(t, bad); len(got) != 0 {
		t.Fatalf("rules left after a failed install: %v", got)
	}
	eventually(t, "no serving for the pod whose install failed", func() bool { return h.tun.Live() == live })
	if resp := h.callV(2, "", cniproto.OpAdd, "apps", "bad", bad); resp.Error != "" || len(installed(t, bad)) == 0 {
		t.Fatalf("ADD retried with the tools back: %+v", resp)
	}
}

// TestKeeperGoneStillServes: the keeper is best effort. When it is gone
// the pod is enrolled and served as without one, and the failed put is
// counted for the operator.
func TestKeeperGoneStillServes(t *testing.T) {
	testenv.RequireRoot(t)
	kpath, stop := startKeeper(t, t.TempDir())
	k, err := keeper.Dial(kpath)
	if err != nil {
		t.Fatal(err)
	}
	stop()
	h := startAgent(t, "", invAmbient, func(o *Options) { o.Keeper = k })
	n := newNetns(t, "10.63.9.2/24")
	enrollLikePlugin(t, h, "web", n, "10.63.9.2/24")
	if c, line, err := dialFrom(t, n, "127.0.0.1:15001"); err != nil || line != "captured:15001" {
		t.Fatalf("pod not served with the keeper gone: %q %v", line, err)
	} else {
		c.Close()
	}
	if got := testutil.ToFloat64(h.a.m.keeperErrors.WithLabelValues("put")); got != 1 {
		t.Fatalf("keeper put errors = %v, want 1", got)
	}
	// A keeper gone at the agent's stop is the usual case (the pod's
	// containers are told to stop together), not an error to count on
	// every rollout.
	before := testutil.ToFloat64(h.a.m.keeperErrors.WithLabelValues("prune"))
	h.stop()
	if got := testutil.ToFloat64(h.a.m.keeperErrors.WithLabelValues("prune")) - before; got != 0 {
		t.Fatalf("keeper prune errors counted at a stop with the keeper gone: %v, want 0", got)
	}
}

// TestKeeperRestartIsRefilled: a keeper that restarted holds nothing; the
// periodic pass puts every served pod's listeners to it again.
func TestKeeperRestartIsRefilled(t *testing.T) {
	testenv.RequireRoot(t)
	dir := t.TempDir()
	kpath, stop := startKeeper(t, dir)
	k, err := keeper.Dial(kpath)
	if err != nil {
		t.Fatal(err)
	}
	h := startAgent(t, "", invAmbient, func(o *Options) { o.Keeper = k })
	enrollPods(t, h, 3, "10.63.10")
	if n, fds, err := k.Count(); err != nil || n != 3 || fds != 9 {
		t.Fatalf("keeper holds %d entries, %d sockets (%v); want 3, 9", n, fds, err)
	}
	stop()
	startKeeper(t, dir) // a new, empty keeper at the same path
	if n, _, _ := k.Count(); n != 0 {
		t.Fatalf("a fresh keeper holds %d entries", n)
	}
	h.a.mu.Lock()
	var pods []*pod
	for _, p := range h.a.byCID {
		pods = append(pods, p)
	}
	h.a.mu.Unlock()
	h.a.resyncKeeper(pods)
	if n, fds, err := k.Count(); err != nil || n != 3 || fds != 9 {
		t.Fatalf("after the resync the keeper holds %d entries, %d sockets (%v); want 3, 9", n, fds, err)
	}
}

// TestReadoptionSetsMigrateReq: pods enrolled by an agent that could not
// set net.ipv4.tcp_migrate_req (every agent before node-agent/podsysctl,
// in a container) get it at the next agent's re-adoption, and their
// records say so; a pod whose record says so is not touched again
// (re-adoption stays cheap).
func TestReadoptionSetsMigrateReq(t *testing.T) {
	testenv.RequireRoot(t)
	dir := t.TempDir()
	h := startAgent(t, dir, invAmbient)
	n := newNetns(t, "10.63.11.2/24")
	enrollLikePlugin(t, h, "web", n, "10.63.11.2/24")
	if got := migrateReq(t, n); got != "1" {
		t.Fatalf("after enrollment tcp_migrate_req = %s, want 1", got)
	}
	h.stop()
	// What an older agent left: the sysctl at 0, no flag in the record.
	run(t, "ip", "netns", "exec", n.name, "sysctl", "-qw", "net.ipv4.tcp_migrate_req=0")
	store, err := state.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	recs, errs := store.List()
	if len(errs) > 0 || len(recs) != 1 || !recs[0].MigrateReq {
		t.Fatalf("records after enrollment: %+v %v (want one, flagged)", recs, errs)
	}
	recs[0].MigrateReq = false
	if err := store.Put(recs[0]); err != nil {
		t.Fatal(err)
	}
	h = startAgent(t, dir, invAmbient)
	if got := migrateReq(t, n); got != "1" {
		t.Fatalf("after re-adoption of an old record tcp_migrate_req = %s, want 1", got)
	}
	h.stop()
	if recs, _ = store.List(); len(recs) != 1 || !recs[0].MigrateReq {
		t.Fatalf("re-adoption did not flag the record: %+v", recs)
	}
	// Flagged: the next re-adoption leaves the namespace alone.
	run(t, "ip", "netns", "exec", n.name, "sysctl", "-qw", "net.ipv4.tcp_migrate_req=0")
	startAgent(t, dir, invAmbient)
	if got := migrateReq(t, n); got != "0" {
		t.Fatalf("re-adoption of a flagged record wrote the sysctl again (%s)", got)
	}
}
