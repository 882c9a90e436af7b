package agent

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/config"
	"github.com/ambit-mesh/ambit/node-agent/hostrules"
	"github.com/ambit-mesh/ambit/node-agent/keeper"
	"github.com/ambit-mesh/ambit/node-agent/kube"
	"github.com/ambit-mesh/ambit/node-agent/state"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
	"github.com/ambit-mesh/ambit/plugin/redirect"
)

const invAmbient = `namespaces:
  - name: apps
    labels: {ambit.dev/dataplane-mode: ambient}
  - name: legacy
workloads:
  - namespace: apps
    name: web
    serviceAccount: web-sa
`

const invPlain = `namespaces:
  - name: apps
  - name: legacy
`

func TestEnrollAtAddAndDel(t *testing.T) {
	testenv.RequireRoot(t)
	// Real host probe rules, in a namespace standing in for the host.
	hostNS := newNetns(t)
	hr, err := hostrules.New(hostrules.Config{NetNS: netns.NsHandle(hostNS.file.Fd()), Logger: quietLogger()})
	if err != nil {
		t.Fatal(err)
	}
	h := startAgent(t, "", invAmbient, func(o *Options) { o.Host = hr })
	n := newNetns(t, "10.62.0.2/24")

	resp, err := h.call(cniproto.OpAdd, "apps", "web", "cid-web", n, "10.62.0.2/24")
	if err != nil {
		t.Fatal(err)
	}
	// Both families for a v4-only pod: its IPv6 link-local address is
	// captured too (TestLinkLocalIPv6IsCaptured).
	if resp.Decision != cniproto.Enroll || resp.Redirect == nil || !resp.Redirect.IPv4 || !resp.Redirect.IPv6 {
		t.Fatalf("ADD answer %+v (want enroll, both families)", resp)
	}
	for _, port := range []string{"15001", "15006", "15008"} {
		c, line, err := dialFrom(t, n, "127.0.0.1:"+port)
		if err != nil || line != "captured:"+port {
			t.Fatalf("listener %s in the pod: %q %v", port, line, err)
		}
		c.Close()
	}
	if owner := hr.Entries()[netip.MustParseAddr("10.62.0.2")]; owner != "uid-web" {
		t.Fatalf("host probe entry for the pod: owner %q", owner)
	}
	// A repeated ADD of the same sandbox keeps serving, no second set.
	if resp, err := h.call(cniproto.OpAdd, "apps", "web", "cid-web", n, "10.62.0.2/24"); err != nil || resp.Decision != cniproto.Enroll {
		t.Fatalf("repeated ADD: %+v %v", resp, err)
	}
	if h.tun.Live() != 1 {
		t.Fatalf("%d servings after a repeated ADD, want 1", h.tun.Live())
	}
	// CHECK answers like ADD.
	if resp, err := h.call(cniproto.OpCheck, "apps", "web", "cid-web", n); err != nil || resp.Decision != cniproto.Enroll {
		t.Fatalf("CHECK: %+v %v", resp, err)
	}
	// The record is persisted, the snapshot names the ambient namespace.
	recs, _ := h.a.store.List()
	if len(recs) != 1 || !recs[0].Enrolled || recs[0].Netns != n.path || recs[0].Identity != "spiffe://cluster.local/ns/apps/sa/web-sa" {
		t.Fatalf("records %+v", recs)
	}
	snap, err := cniproto.ReadSnapshot(filepath.Join(h.dir, "enrollment-snapshot.json"))
	if err != nil || snap.Verdict("apps") != cniproto.MayEnroll || snap.Verdict("legacy") != cniproto.NotEnrolled || snap.Verdict("kube-system") != cniproto.Excluded {
		t.Fatalf("snapshot %+v %v", snap, err)
	}
	// Not enrolled namespace: skip.
	other := newNetns(t, "10.62.1.2/24")
	if resp, err := h.call(cniproto.OpAdd, "legacy", "old", "cid-old", other, "10.62.1.2/24"); err != nil || resp.Decision != cniproto.Skip {
		t.Fatalf("legacy ADD: %+v %v", resp, err)
	}
	// Unknown namespace in static mode: skip, not an error.
	if resp, err := h.call(cniproto.OpAdd, "nowhere", "x", "cid-x", other); err != nil || resp.Decision != cniproto.Skip {
		t.Fatalf("unknown namespace ADD: %+v %v", resp, err)
	}
	// DEL closes the listeners.
	if resp, err := h.call(cniproto.OpDel, "apps", "web", "cid-web", nil); err != nil || resp.Error != "" {
		t.Fatalf("DEL: %+v %v", resp, err)
	}
	eventually(t, "listeners closed after DEL", func() bool { return h.tun.Live() == 0 })
	if _, ok := hr.Entries()[netip.MustParseAddr("10.62.0.2")]; ok {
		t.Fatal("host probe entry left after DEL")
	}
	if _, _, err := dialFrom(t, n, "127.0.0.1:15001"); err == nil {
		t.Fatal("listener still open after DEL")
	}
	if got := testutil.ToFloat64(h.a.m.requests.WithLabelValues("add", "enroll")); got != 2 {
		t.Fatalf("plugin requests add/enroll = %v", got)
	}
}

func TestLiveLabelFlip(t *testing.T) {
	testenv.RequireRoot(t)
	// Long enough that polling on a loaded machine cannot outlast it.
	h := startAgent(t, "", invPlain, func(o *Options) { o.Config.DrainTimeout.Duration = 10 * time.Second })
	pod, _ := newPair(t, "10.64.0.2", "10.64.0.1")
	resp, err := h.call(cniproto.OpAdd, "apps", "web", "cid-live", pod, "10.64.0.2/24")
	if err != nil || resp.Decision != cniproto.Skip {
		t.Fatalf("ADD in a plain namespace: %+v %v", resp, err)
	}
	say := func() string {
		c, line, err := dialFrom(t, pod, "10.64.0.1:8080")
		if err != nil {
			return "error: " + err.Error()
		}
		c.Close()
		return line
	}
	if got := say(); got != "plain" {
		t.Fatalf("before labelling: %q", got)
	}
	// Label the namespace: the running pod is captured.
	h.writeInventory(invAmbient)
	if err := h.inv.Reload(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "traffic captured after labelling", func() bool { return say() == "captured:15001" })
	if err := (Rules{}).Verify(context.Background(), openFile(t, pod.path), *h.podNow("apps/web").specCopy()); err != nil {
		t.Fatalf("rules after live enrollment: %v", err)
	}
	inflight, line, err := dialFrom(t, pod, "10.64.0.1:8080")
	if err != nil || line != "captured:15001" {
		t.Fatalf("in-flight connection: %q %v", line, err)
	}
	defer inflight.Close()
	inflight.SetDeadline(time.Now().Add(3 * time.Second))
	fmt.Fprintf(inflight, "ping\n")
	br := bufio.NewReader(inflight)
	if l, err := br.ReadString('\n'); err != nil || l != "ping\n" {
		t.Fatalf("in-flight connection does not echo: %q %v", l, err)
	}
	// A pod label "none" overrides the namespace: back to plaintext.
	h.writeInventory(invAmbient + "    labels: {ambit.dev/dataplane-mode: none}\n")
	if err := h.inv.Reload(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "plaintext after opting out", func() bool { return say() == "plain" })
	// Unenrollment drains rather than cuts: the established connection
	// still works after the rules are gone, and the pod's serving ends
	// when it does.
	if h.tun.Live() != 1 {
		t.Fatalf("serving closed at once (%d live), want it draining", h.tun.Live())
	}
	inflight.SetDeadline(time.Now().Add(3 * time.Second))
	fmt.Fprintf(inflight, "still there\n")
	if l, err := br.ReadString('\n'); err != nil || l != "still there\n" {
		t.Fatalf("in-flight connection cut by unenrollment: %q %v", l, err)
	}
	inflight.Close()
	eventually(t, "drain finished once the in-flight connection ended", func() bool { return h.tun.Live() == 0 })
	eventually(t, "drain guard removed after the drain", func() bool {
		out, err := exec.Command("ip", "netns", "exec", pod.name, "nft", "list", "tables").CombinedOutput()
		return err == nil && !strings.Contains(string(out), drainTable)
	})
	var left bool
	withNS(openFile(t, pod.path), func(n ns.NetNS) error {
		found, _ := redirect.Installed(context.Background(), n)
		left = len(found) > 0
		return nil
	})
	if left {
		t.Fatal("redirection left in the pod after unenrollment")
	}
}

func openFile(t testing.TB, p string) *os.File {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func (p *pod) specCopy() *redirect.Spec { s := p.spec; return &s }

func TestBadInputKeepsServing(t *testing.T) {
	testenv.RequireRoot(t)
	h := startAgent(t, "", invAmbient)
	raw := func(b []byte, oob []byte) string {
		c, err := net.Dial("unixpacket", h.sock)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, _, err := c.(*net.UnixConn).WriteMsgUnix(b, oob, nil); err != nil {
			return "write: " + err.Error()
		}
		buf := make([]byte, cniproto.MaxMessageSize)
		n, err := c.Read(buf)
		if err != nil {
			return "read: " + err.Error()
		}
		var r cniproto.Response
		json.Unmarshal(buf[:n], &r)
		return r.Error
	}
	if e := raw([]byte("garbage\x00\xff"), nil); !strings.Contains(e, "malformed request") {
		t.Fatalf("garbage: %q", e)
	}
	big := make([]byte, cniproto.MaxMessageSize+512)
	for i := range big {
		big[i] = 'x'
	}
	if e := raw(big, nil); !strings.Contains(e, "exceeds") {
		t.Fatalf("oversized: %q", e)
	}
	// A netns fd that is not a netns, for a pod that would be enrolled.
	notNS := openFile(t, "/etc/hostname")
	req, _ := json.Marshal(cniproto.Request{Version: cniproto.Version, Op: cniproto.OpAdd, Pod: cniproto.Pod{Namespace: "apps", Name: "web", ContainerID: "cid-bad"}})
	if e := raw(req, unix.UnixRights(int(notNS.Fd()))); !strings.Contains(e, "not a namespace") {
		t.Fatalf("fd that is not a netns: %q", e)
	}
	// A broken inventory is rejected with its line; the last good stays.
	h.writeInventory("namespaces:\n  - name: apps\n    labels: {ambit.dev/dataplane-mode: ambient}\nworkloads:\n  - namespace: nowhere\n    name: x\n")
	if err := h.inv.Reload(); err == nil || !strings.Contains(err.Error(), "line 5: workloads[0].namespace") {
		t.Fatalf("broken inventory: %v", err)
	}
	// Everyone else is still served.
	n := newNetns(t, "10.65.0.2/24")
	resp, err := h.call(cniproto.OpAdd, "apps", "web", "cid-good", n, "10.65.0.2/24")
	if err != nil || resp.Decision != cniproto.Enroll {
		t.Fatalf("good ADD after bad input: %+v %v", resp, err)
	}
	if got := testutil.ToFloat64(h.a.m.failures.WithLabelValues("netns")); got != 1 {
		t.Fatalf("failures{netns} = %v", got)
	}
}

func TestEnrollUnenroll1000NoLeak(t *testing.T) {
	testenv.RequireRoot(t)
	pins := &pinCounter{}
	h := startAgent(t, "", invAmbient, func(o *Options) { o.Certs = pins })
	n := newNetns(t, "10.66.0.2/24")
	cycle := func(i int) {
		cid := fmt.Sprintf("cid-%d", i)
		resp, err := h.call(cniproto.OpAdd, "apps", "web", cid, n, "10.66.0.2/24")
		if err != nil || resp.Decision != cniproto.Enroll {
			t.Fatalf("ADD %d: %+v %v", i, resp, err)
		}
		if resp, err := h.call(cniproto.OpDel, "apps", "web", cid, nil); err != nil || resp.Error != "" {
			t.Fatalf("DEL %d: %+v %v", i, resp, err)
		}
	}
	settle := func() {
		eventually(t, "drains finished", func() bool { return h.tun.Live() == 0 })
		h.a.closing.Wait()
	}
	cycle(-1)
	settle()
	runtime.GC()
	g0, fd0 := runtime.NumGoroutine(), testenv.OpenFDs(t)
	for i := range 1000 {
		cycle(i)
	}
	settle()
	var g, fd int
	eventually(t, "goroutines and fds back to baseline", func() bool {
		runtime.GC()
		g, fd = runtime.NumGoroutine(), testenv.OpenFDs(t)
		return g <= g0+2 && fd <= fd0
	})
	t.Logf("after 1000 enroll/unenroll: goroutines %d (baseline %d), fds %d (baseline %d)", g, g0, fd, fd0)
	if recs, _ := h.a.store.List(); len(recs) != 0 {
		t.Fatalf("%d records left", len(recs))
	}
	if p := pins.total(); p != 0 {
		t.Fatalf("%d certificate pins left after 1000 enroll/unenroll", p)
	}
}

func Test300SimultaneousAdds(t *testing.T) {
	testenv.RequireRoot(t)
	h := startAgent(t, "", invAmbient)
	const n = 300
	pods := make([]*testNetns, n)
	for i := range pods {
		pods[i] = newNetns(t, fmt.Sprintf("10.67.%d.%d/16", i/250, i%250+2))
	}
	var wg sync.WaitGroup
	errs := make(chan error, n)
	start := make(chan struct{})
	for i, p := range pods {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			// The plugin's own default timeout.
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			req := &cniproto.Request{Version: cniproto.Version, Op: cniproto.OpAdd, Pod: cniproto.Pod{Namespace: "apps", Name: fmt.Sprintf("web-%d", i), ContainerID: fmt.Sprintf("cid-%d", i), Netns: p.path}}
			resp, err := cniproto.Call(ctx, h.sock, req, p.file)
			if err == nil && resp.Decision != cniproto.Enroll {
				err = fmt.Errorf("pod %d: %+v", i, resp)
			}
			errs <- err
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if h.tun.Live() != n {
		t.Fatalf("%d pods served, want %d", h.tun.Live(), n)
	}
}

// enrollPods makes n pods web-0… in netns of their own, at prefix.2,
// prefix.3, … /24, and enrolls them through ADD.
func enrollPods(t testing.TB, h *harness, n int, prefix string) []*testNetns {
	t.Helper()
	pods := make([]*testNetns, n)
	for i := range pods {
		ip := fmt.Sprintf("%s.%d/24", prefix, i+2)
		pods[i] = newNetns(t, ip)
		enrollLikePlugin(t, h, fmt.Sprintf("web-%d", i), pods[i], ip)
	}
	return pods
}

// startKeeper runs a keeper in this process until the test ends and
// returns its socket.
func startKeeper(t testing.TB, dir string) (path string, stop func()) {
	t.Helper()
	path = filepath.Join(dir, "keeper.sock")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- (&keeper.Server{Log: quietLogger()}).Serve(ctx, path) }()
	var once sync.Once
	stop = func() { once.Do(func() { cancel(); <-done }) }
	t.Cleanup(stop)
	eventually(t, "keeper listening", func() bool { _, err := os.Stat(path); return err == nil })
	return path, stop
}

// enrollLikePlugin does what ambit-cni does at ADD: ask; the agent
// installs the rules before it answers enroll.
func enrollLikePlugin(t testing.TB, h *harness, name string, n *testNetns, ip string) {
	t.Helper()
	resp, err := h.call(cniproto.OpAdd, "apps", name, "cid-"+name, n, ip)
	if err != nil || resp.Decision != cniproto.Enroll {
		t.Fatalf("ADD %s: %+v %v", name, resp, err)
	}
	if err := (Rules{}).Verify(context.Background(), n.file, *resp.Redirect); err != nil {
		t.Fatalf("rules in %s after ADD: %v", name, err)
	}
}

func TestRestartReadoptsEveryPod(t *testing.T) {
	testenv.RequireRoot(t)
	dir, _ := os.MkdirTemp("", "amb-agt-")
	t.Cleanup(func() { os.RemoveAll(dir) })
	h := startAgent(t, dir, invAmbient)
	const n = 50
	pods := enrollPods(t, h, n, "10.68.0")
	h.stop()
	// Agent away: rules stay, nothing listens: refused, not plaintext.
	if _, _, err := dialFrom(t, pods[0], "127.0.0.1:15001"); err == nil {
		t.Fatal("a listener survived the agent")
	}
	if err := (Rules{}).Verify(context.Background(), pods[0].file, redirect.DefaultSpec()); err != nil && !strings.Contains(err.Error(), "ipv6") {
		// IPv4-only pods: only v4 rules are expected.
	}
	// Someone flushed one pod's rules while the agent was away.
	if err := (Rules{}).Uninstall(context.Background(), pods[7].file); err != nil {
		t.Fatal(err)
	}
	h2 := startAgent(t, dir, invAmbient)
	if got := testutil.ToFloat64(h2.a.m.adopted); got != n {
		t.Fatalf("adopted %v pods, want %d", got, n)
	}
	for i, p := range pods {
		c, line, err := dialFrom(t, p, "127.0.0.1:15001")
		if err != nil || line != "captured:15001" {
			t.Fatalf("pod %d not served after restart: %q %v", i, line, err)
		}
		c.Close()
	}
	eventually(t, "the flushed pod repaired", func() bool { return testutil.ToFloat64(h2.a.m.repairs) == 1 })
	spec := *h2.podNow("apps/web-7").specCopy()
	if err := (Rules{}).Verify(context.Background(), pods[7].file, spec); err != nil {
		t.Fatalf("flushed rules not repaired: %v", err)
	}
}

// dialAllAlong dials the outbound capture from pod in a loop until the
// returned stop is called, which says how many dials were refused (or
// not answered by the capture) and how many were served.
func dialAllAlong(t *testing.T, pod *testNetns) (stop func() (refused, ok int)) {
	t.Helper()
	done := make(chan struct{})
	var refused, ok int
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-done:
				return
			default:
			}
			c, line, err := dialFrom(t, pod, "127.0.0.1:15001")
			if err != nil || line != "captured:15001" {
				refused++
				continue
			}
			ok++
			c.Close()
		}
	}()
	return func() (int, int) {
		close(done)
		wg.Wait()
		return refused, ok
	}
}

// TestHandOver: a second agent binds beside the first, the first stops,
// and connections made all along are never refused.
func TestHandOver(t *testing.T) {
	testenv.RequireRoot(t)
	dir, _ := os.MkdirTemp("", "amb-agt-")
	t.Cleanup(func() { os.RemoveAll(dir) })
	old := startAgent(t, dir, invAmbient)
	p := newNetns(t, "10.69.0.2/24")
	enrollLikePlugin(t, old, "web", p, "10.69.0.2/24")

	stopDialling := dialAllAlong(t, p)
	neu := startAgent(t, dir, invAmbient)
	if neu.tun.Live() != 1 {
		t.Fatalf("new agent serves %d pods", neu.tun.Live())
	}
	old.stop()
	time.Sleep(100 * time.Millisecond) // keep dialling after the old one left
	refused, ok := stopDialling()
	if refused != 0 || ok == 0 {
		t.Fatalf("hand-over: %d connections refused, %d served", refused, ok)
	}
	t.Logf("hand-over: %d connections, none refused", ok)
	_ = state.Key
}

func TestUnenrollAll(t *testing.T) {
	testenv.RequireRoot(t)
	dir, _ := os.MkdirTemp("", "amb-agt-")
	t.Cleanup(func() { os.RemoveAll(dir) })
	h := startAgent(t, dir, invAmbient)
	pods := []*testNetns{newNetns(t, "10.73.0.2/24"), newNetns(t, "10.73.0.3/24")}
	for i, p := range pods {
		enrollLikePlugin(t, h, fmt.Sprintf("web-%d", i), p, fmt.Sprintf("10.73.0.%d/24", i+2))
	}
	h.stop()
	// What other nodes read: the pods' status annotation, which must go
	// with the redirection (left "enabled", their agents would keep
	// sending HBONE to port 15008, where nothing listens any more).
	api := fake.NewClientset(annotatedPod("web-0", "node-1"), annotatedPod("web-1", "node-1"), annotatedPod("elsewhere", "node-2"))
	clear := func(ctx context.Context) ([]string, error) { return kube.ClearRedirections(ctx, api, "node-1") }
	if err := UnenrollAll(context.Background(), dir, "/proc", Rules{}, clear, quietLogger()); err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]string{"web-0": "", "web-1": "", "elsewhere": "enabled"} {
		p, _ := api.CoreV1().Pods("apps").Get(context.Background(), name, metav1.GetOptions{})
		if got := p.Annotations[kube.RedirectionAnnotation]; got != want {
			t.Errorf("after uninstall, %s has %s=%q, want %q", name, kube.RedirectionAnnotation, got, want)
		}
	}
	for i, p := range pods {
		withNS(p.file, func(n ns.NetNS) error {
			if found, _ := redirect.Installed(context.Background(), n); len(found) > 0 {
				t.Errorf("pod %d still has rules: %v", i, found)
			}
			return nil
		})
	}
	recs, _ := state.Open(dir)
	list, _ := recs.List()
	for _, r := range list {
		if r.Enrolled {
			t.Fatalf("record still enrolled: %+v", r)
		}
	}
}

// TestFlushedRulesRepairedWhileRunning: someone removes an enrolled pod's
// redirection while the agent runs (no restart): the periodic check puts
// it back, and the pod's outbound traffic is captured again.
func TestFlushedRulesRepairedWhileRunning(t *testing.T) {
	testenv.RequireRoot(t)
	h := startAgent(t, "", invAmbient, func(o *Options) {
		o.Config.RuleCheckInterval = config.Duration{Duration: 200 * time.Millisecond}
	})
	pod, _ := newPair(t, "10.68.1.2", "10.68.1.1")
	enrollLikePlugin(t, h, "web", pod, "10.68.1.2/24")
	if c, line, err := dialFrom(t, pod, "10.68.1.1:9"); err != nil || line != "captured:15001" {
		t.Fatalf("outbound not captured after enrollment: %q %v", line, err)
	} else {
		c.Close()
	}
	if err := (Rules{}).Uninstall(context.Background(), pod.file); err != nil {
		t.Fatal(err)
	}
	if _, line, err := dialFrom(t, pod, "10.68.1.1:9"); err == nil && line == "captured:15001" {
		t.Fatal("still captured right after the flush: the test flushed nothing")
	}
	eventually(t, "the periodic check to repair the flushed pod", func() bool { return testutil.ToFloat64(h.a.m.repairs) == 1 })
	spec := *h.podNow("apps/web").specCopy()
	if err := (Rules{}).Verify(context.Background(), pod.file, spec); err != nil {
		t.Fatalf("rules after the repair: %v", err)
	}
	c, line, err := dialFrom(t, pod, "10.68.1.1:9")
	if err != nil || line != "captured:15001" {
		t.Fatalf("outbound not captured after the repair: %q %v", line, err)
	}
	c.Close()
	// Intact rules are left alone: no repair on later checks.
	time.Sleep(600 * time.Millisecond)
	if got := testutil.ToFloat64(h.a.m.repairs); got != 1 {
		t.Fatalf("%v repairs of intact rules", got)
	}
	// By now the checks skip the unchanged nftables rules (their
	// generation was seen twice, redirect.Recheck): a flushed chain, with
	// the routes intact, is still seen.
	if p := h.podNow("apps/web"); p == nil || !p.checked.Trusted() {
		t.Fatal("the periodic check does not skip intact rules after three passes")
	}
	inNetns(t, pod, func() error {
		if out, err := exec.Command("nft", "flush", "chain", "inet", redirect.TableName, "nat-output").CombinedOutput(); err != nil {
			return fmt.Errorf("nft flush chain: %v: %s", err, out)
		}
		return nil
	})
	eventually(t, "the periodic check to repair the pod flushed again", func() bool { return testutil.ToFloat64(h.a.m.repairs) == 2 })
	c, line, err = dialFrom(t, pod, "10.68.1.1:9")
	if err != nil || line != "captured:15001" {
		t.Fatalf("outbound not captured after the second repair: %q %v", line, err)
	}
	c.Close()
}
