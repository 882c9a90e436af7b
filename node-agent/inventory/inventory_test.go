package inventory

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/ambit-mesh/ambit/internal/testenv"
	"github.com/ambit-mesh/ambit/node-agent/cluster"
)

const sample = `# demo inventory
trustDomain: demo.local
namespaces:
  - name: apps
    labels: {ambit.dev/dataplane-mode: ambient}
  - name: legacy
workloads:
  - namespace: apps
    name: client
    serviceAccount: client
    labels: {app: client}
  - namespace: apps
    name: server-*
    serviceAccount: server
    labels: {app: server}
  - namespace: apps
    name: remote
    node: other-node
    labels: {app: server}
    ips: [10.9.0.7, "fd00::7"]
services:
  - namespace: apps
    name: server
    vips: [10.96.0.10]
    ports:
      - {name: http, port: 80, targetPort: 8080}
    selector: {app: server}
`

func load(t *testing.T, body string) (*Source, string) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "inventory.yaml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := Load(Options{Path: p, NodeName: "node-a", Meshed: func(p cluster.Pod, ns *cluster.Namespace) bool {
		return ns != nil && ns.Labels["ambit.dev/dataplane-mode"] == "ambient"
	}})
	if err != nil {
		t.Fatal(err)
	}
	return s, p
}

func TestViewAndDirectory(t *testing.T) {
	s, _ := load(t, sample)
	ctx := context.Background()
	if err := s.WaitSynced(ctx); err != nil {
		t.Fatal(err)
	}
	p, ok, _ := s.Pod(ctx, "apps", "server-7f9c")
	if !ok || p.ServiceAccount != "server" || p.Labels["app"] != "server" || p.NodeName != "node-a" {
		t.Fatalf("prefix workload: %+v %v", p, ok)
	}
	p, ok, _ = s.Pod(ctx, "legacy", "anything")
	if !ok || p.ServiceAccount != "default" || len(p.Labels) != 0 {
		t.Fatalf("unlisted pod in listed namespace: %+v %v", p, ok)
	}
	if _, ok, _ := s.Pod(ctx, "nowhere", "x"); ok {
		t.Fatal("pod in an unlisted namespace found")
	}
	if ns, ok := s.Namespace("apps"); !ok || ns.Labels["ambit.dev/dataplane-mode"] != "ambient" {
		t.Fatalf("namespace: %+v", ns)
	}
	// Remote workload with static IPs is in the directory, not local.
	w, ok := s.WorkloadByIP(netip.MustParseAddr("fd00::7"))
	if !ok || w.Name != "remote" || w.Identity != "spiffe://demo.local/ns/apps/sa/default" || !w.Meshed {
		t.Fatalf("remote workload: %+v %v", w, ok)
	}
	for _, lp := range s.LocalPods() {
		if lp.Name == "remote" {
			t.Fatal("remote workload listed as local")
		}
	}
	// Service has the remote endpoint with its target port.
	eps, ok := s.ServiceEndpoints(netip.MustParseAddrPort("10.96.0.10:80"))
	if !ok || len(eps) != 2 || eps[0] != netip.MustParseAddrPort("10.9.0.7:8080") {
		t.Fatalf("endpoints: %v %v", eps, ok)
	}
	if _, ok := s.ServiceEndpoints(netip.MustParseAddrPort("10.96.0.10:81")); ok {
		t.Fatal("unknown service port resolved")
	}
	// Learning a pod from CNI ADD puts it in the directory and the service.
	s.Learn("apps", "server-abc", "uid-1", []netip.Addr{netip.MustParseAddr("10.1.0.5")})
	w, ok = s.WorkloadByIP(netip.MustParseAddr("10.1.0.5"))
	if !ok || w.Name != "server-abc" || w.UID != "uid-1" || w.Identity != "spiffe://demo.local/ns/apps/sa/server" || w.Labels["app"] != "server" {
		t.Fatalf("learned workload: %+v %v", w, ok)
	}
	eps, _ = s.ServiceEndpoints(netip.MustParseAddrPort("10.96.0.10:80"))
	if len(eps) != 3 {
		t.Fatalf("learned pod not an endpoint: %v", eps)
	}
	found := false
	for _, lp := range s.LocalPods() {
		found = found || lp.Name == "server-abc"
	}
	if !found {
		t.Fatal("learned pod not local")
	}
	// A late DEL of an older pod with the same name does not forget it.
	s.Forget("apps", "server-abc", "uid-0")
	if _, ok := s.WorkloadByIP(netip.MustParseAddr("10.1.0.5")); !ok {
		t.Fatal("forgotten by a DEL for another UID")
	}
	s.Forget("apps", "server-abc", "uid-1")
	if _, ok := s.WorkloadByIP(netip.MustParseAddr("10.1.0.5")); ok {
		t.Fatal("still known after Forget")
	}
}

func TestParseErrorsNameLineAndField(t *testing.T) {
	cases := []struct{ body, want string }{
		{"namespaces:\n  - name: a\n    lables: {}\n", "line 3: namespaces[0].lables: unknown field"},
		{"namespaces:\n  - name: Bad_Name\n", "line 2: namespaces[0].name"},
		{"namespaces:\n  - name: a\nworkloads:\n  - namespace: b\n    name: x\n", "line 4: workloads[0].namespace: namespace \"b\" is not listed"},
		{"namespaces:\n  - name: a\nworkloads:\n  - namespace: a\n", "line 4: workloads[0].name: required"},
		{"namespaces:\n  - name: a\nworkloads:\n  - namespace: a\n    name: x\n    ips: [10.0.0.300]\n", "line 6: workloads[0].ips[0]"},
		{"namespaces:\n  - name: a\nworkloads:\n  - namespace: a\n    name: x\n    ips: [10.0.0.1]\n  - namespace: a\n    name: y\n    ips: [10.0.0.1]\n", "workloads[1].ips[0]: 10.0.0.1 already belongs to a/x"},
		{"namespaces:\n  - name: a\nworkloads:\n  - namespace: a\n    name: x-*\n    ips: [10.0.0.1]\n", "cannot list IPs"},
		{"namespaces:\n  - name: a\nworkloads:\n  - namespace: a\n    name: x*y\n", "workloads[0].name"},
		{"namespaces:\n  - name: a\nworkloads:\n  - namespace: a\n    name: x\n    labels: {'bad key': v}\n", "line 6: workloads[0].labels.bad key"},
		{"namespaces:\n  - name: a\nservices:\n  - namespace: a\n    name: s\n    vips: [10.96.0.1]\n    ports: [{port: 99999}]\n    selector: {app: a}\n", "services[0].ports[0].port"},
		{"namespaces:\n  - name: a\nservices:\n  - namespace: a\n    name: s\n    vips: [10.96.0.1]\n    ports: [{port: 80}]\n", "services[0].selector: a selector is required"},
		{"namespaces:\n  - name: a\nservices:\n  - namespace: a\n    name: s\n    vips: [10.96.0.1]\n    ports: [{port: 80, protocol: UDP}]\n    selector: {app: a}\n", "only TCP"},
		{"namespaces: {a: b}\n", "line 1: namespaces: want a list"},
		{"- just\n- a list\n", "inventory: want a mapping"},
		{"trustDomain: 'x/y'\n", "trustDomain"},
		{"namespaces:\n  - name: a\n  - name: a\n", "line 3: namespaces[1].name: namespace \"a\" listed twice"},
		{"namespaces: [\n", "yaml"},
	}
	for _, c := range cases {
		_, err := Parse([]byte(c.body))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q:\n got  %v\n want …%s…", c.body, err, c.want)
		}
	}
	// JSON is accepted too.
	if _, err := Parse([]byte(`{"namespaces":[{"name":"a","labels":{"x":"y"}}],"workloads":[{"namespace":"a","name":"p","ips":["10.0.0.1"]}]}`)); err != nil {
		t.Fatalf("json: %v", err)
	}
}

func TestLoadRejectsBrokenFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "inv.yaml")
	os.WriteFile(p, []byte("namespaces:\n  - name: a\n    bogus: 1\n"), 0o600)
	_, err := Load(Options{Path: p, NodeName: "n"})
	if err == nil || !strings.Contains(err.Error(), p) || !strings.Contains(err.Error(), "line 3") {
		t.Fatalf("err = %v", err)
	}
}

func TestWatchReloadsAndKeepsLastGood(t *testing.T) {
	s, path := load(t, sample)
	var mu sync.Mutex
	var events []cluster.Event
	s.Subscribe(func(e cluster.Event) { mu.Lock(); events = append(events, e); mu.Unlock() })
	reloads := make(chan error, 10)
	s.opts.OnReload = func(err error) { reloads <- err }
	startWatch(t, s)

	waitReload := func() error {
		select {
		case err := <-reloads:
			return err
		case <-time.After(10 * time.Second):
			t.Fatal("no reload within 10s")
			return nil
		}
	}
	// Broken edit: reported, last good stays. Written at once, whether or
	// not the watch is in place yet (the test used to sleep 50 ms for
	// that, and missed the edit when the goroutine started later).
	os.WriteFile(path, []byte("namespaces:\n  - nam: apps\n"), 0o600)
	if err := waitReload(); err == nil || !strings.Contains(err.Error(), "line 2") {
		t.Fatalf("broken reload: %v", err)
	}
	if ns, ok := s.Namespace("apps"); !ok || ns.Labels["ambit.dev/dataplane-mode"] != "ambient" {
		t.Fatal("last good inventory lost")
	}
	// Unlabel the namespace via atomic rename: a namespace event.
	next := strings.Replace(sample, "labels: {ambit.dev/dataplane-mode: ambient}", "labels: {}", 1)
	tmp := path + ".tmp"
	os.WriteFile(tmp, []byte(next), 0o600)
	os.Rename(tmp, path)
	if err := waitReload(); err != nil {
		t.Fatal(err)
	}
	if s.LastError() != nil {
		t.Fatal("error kept after a good reload")
	}
	mu.Lock()
	defer mu.Unlock()
	var nsEvent, resync bool
	for _, e := range events {
		nsEvent = nsEvent || e.Kind == cluster.NamespaceChanged && e.Namespace == "apps"
		resync = resync || e.Kind == cluster.Resynced
	}
	if !nsEvent || !resync {
		t.Fatalf("events %+v", events)
	}
	if w, _ := s.WorkloadByIP(netip.MustParseAddr("10.9.0.7")); w.Meshed {
		t.Fatal("directory not rebuilt after reload")
	}
}

// TestWatchSeesEditBeforeWatchStarted: an edit made after Load but
// before Watch has its watch in place (the agent loads, then starts
// watching) is applied, not lost until the next edit.
func TestWatchSeesEditBeforeWatchStarted(t *testing.T) {
	s, path := load(t, sample)
	reloads := make(chan error, 10)
	s.opts.OnReload = func(err error) { reloads <- err }
	next := strings.Replace(sample, "labels: {ambit.dev/dataplane-mode: ambient}", "labels: {}", 1)
	if next == sample {
		t.Fatal("sample has no label to remove")
	}
	if err := os.WriteFile(path, []byte(next), 0o600); err != nil {
		t.Fatal(err)
	}
	startWatch(t, s)
	select {
	case err := <-reloads:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("edit made before the watch started not applied within 10s")
	}
	if ns, ok := s.Namespace("apps"); !ok || len(ns.Labels) != 0 {
		t.Fatalf("apps after the reload: %+v", ns)
	}
	// An unchanged file is not reloaded for nothing at start.
	startWatch(t, s)
	select {
	case err := <-reloads:
		t.Fatalf("reload of an unchanged file: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(sample))
	f.Add([]byte(`{"namespaces":[{"name":"a"}]}`))
	f.Add([]byte("workloads: [{namespace: a, name: '*'}]"))
	f.Add([]byte("&a [*a]"))
	f.Add([]byte("namespaces: [{name: a}]\nworkloads: [{namespace: a, name: p, ips: ['::ffff:10.0.0.1']}, {namespace: a, name: q, ips: [10.0.0.1]}]"))
	f.Add([]byte("namespaces: [{name: a}]\nservices: [{namespace: a, name: s, vips: [10.96.0.1], ports: [{port: 0x50}], selector: {app: x}}]"))
	f.Add([]byte("namespaces: [&n {name: a}, *n]"))
	f.Fuzz(func(t *testing.T, b []byte) {
		inv, err := Parse(b)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("error without a message")
			}
			return
		}
		// What is accepted is what the agent relies on without checking
		// again: every reference resolves, no address is claimed twice.
		owners := map[netip.Addr]bool{}
		for _, w := range inv.Workloads {
			if _, ok := inv.Namespaces[w.Namespace]; !ok || w.Name == "" {
				t.Fatalf("workload %s/%q accepted", w.Namespace, w.Name)
			}
			if _, prefix := w.Prefix(); prefix && len(w.IPs) > 0 {
				t.Fatalf("prefix workload %s with IPs", w.Name)
			}
			for _, ip := range w.IPs {
				if !ip.IsValid() || ip.Zone() != "" || ip.Is4In6() || ip.IsUnspecified() || ip.IsMulticast() || owners[ip] {
					t.Fatalf("workload %s/%s: address %v accepted", w.Namespace, w.Name, ip)
				}
				owners[ip] = true
			}
		}
		fronts := map[netip.AddrPort]bool{}
		for _, s := range inv.Services {
			if _, ok := inv.Namespaces[s.Namespace]; !ok || len(s.VIPs) == 0 || len(s.Ports) == 0 || len(s.Selector) == 0 {
				t.Fatalf("service %+v accepted", s)
			}
			for _, p := range s.Ports {
				if p.Port == 0 || p.TargetPort == 0 {
					t.Fatalf("service %s/%s: port %+v accepted", s.Namespace, s.Name, p)
				}
				for _, v := range s.VIPs {
					ap := netip.AddrPortFrom(v, p.Port)
					if v.Is4In6() || fronts[ap] {
						t.Fatalf("service %s/%s: %v accepted", s.Namespace, s.Name, ap)
					}
					fronts[ap] = true
				}
			}
		}
	})
}

func TestSnapshotLists(t *testing.T) {
	s, _ := load(t, sample+`  - namespace: apps
    name: unused
    selector: {app: nothing}
    vips: [10.96.0.11]
    ports: [{port: 80}]
`)
	if got := s.AmbientNamespaces(); len(got) != 1 || got[0] != "apps" {
		t.Fatalf("ambient = %v", got)
	}
	s2, _ := load(t, `namespaces: [{name: legacy}, {name: other}]
workloads:
  - {namespace: legacy, name: x, labels: {ambit.dev/dataplane-mode: ambient}, node: elsewhere}
  - {namespace: other, name: y}
`)
	if got := s2.OptInNamespaces(); len(got) != 1 || got[0] != "legacy" {
		t.Fatalf("opt-in = %v", got)
	}
}

// startWatch runs s.Watch until the test ends.
func startWatch(t *testing.T, s *Source) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.Watch(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
}

// TestWatchWithoutInotify: the file's directory cannot be watched (the
// node's inotify instances, or watches, are exhausted by other daemons).
// Watch used to return at once, an error the agent dropped: no edit was
// applied again until a restart. It now reads the file by polling,
// reloads only when it changed, and watches again once it can.
func TestWatchWithoutInotify(t *testing.T) {
	for _, c := range []struct {
		name   string
		refuse func() (*fsnotify.Watcher, error)
	}{
		{"no instance", func() (*fsnotify.Watcher, error) {
			return nil, fmt.Errorf("couldn't initialize inotify: %w", syscall.EMFILE)
		}},
		{"no watch", func() (*fsnotify.Watcher, error) {
			// A closed watcher fails every Add, as one does when
			// max_user_watches is reached.
			w, err := fsnotify.NewWatcher()
			if err != nil {
				return nil, err
			}
			w.Close()
			return w, nil
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			var refuse atomic.Bool
			refuse.Store(true)
			var tries atomic.Int32
			// Restored after Watch has stopped (cleanups run last first).
			t.Cleanup(func(f func() (*fsnotify.Watcher, error), p time.Duration) func() {
				return func() { newWatcher, unwatchedPoll = f, p }
			}(newWatcher, unwatchedPoll))
			newWatcher = func() (*fsnotify.Watcher, error) {
				tries.Add(1)
				if refuse.Load() {
					return c.refuse()
				}
				return fsnotify.NewWatcher()
			}
			unwatchedPoll = 20 * time.Millisecond

			path := filepath.Join(t.TempDir(), "inventory.yaml")
			if err := os.WriteFile(path, []byte(sample), 0o600); err != nil {
				t.Fatal(err)
			}
			logs := &testenv.Buffer{}
			s, err := Load(Options{Path: path, NodeName: "node-a", Logger: slog.New(slog.NewTextHandler(logs, nil))})
			if err != nil {
				t.Fatal(err)
			}
			reloads := make(chan error, 100)
			s.SetReloadHook(func(err error) { reloads <- err })
			startWatch(t, s)
			waitReload := func(what string) {
				t.Helper()
				select {
				case err := <-reloads:
					if err != nil {
						t.Fatalf("%s: %v", what, err)
					}
				case <-time.After(10 * time.Second):
					t.Fatalf("%s: no reload within 10s", what)
				}
			}
			labelled := func() bool {
				ns, _ := s.Namespace("apps")
				return ns.Labels["ambit.dev/dataplane-mode"] == "ambient"
			}
			unlabelled := strings.Replace(sample, "labels: {ambit.dev/dataplane-mode: ambient}", "labels: {}", 1)

			const warned, again = "cannot watch the inventory file", "watching the inventory file again"
			testenv.Eventually(t, "the watch to be given up", func() bool { return strings.Count(logs.String(), warned) == 1 })
			replace(t, path, unlabelled)
			waitReload("edit by polling")
			if labelled() {
				t.Fatal("edit not applied")
			}
			// Five more looks (each tries the watch again) change
			// nothing: no reload of an unchanged file, one warning for
			// the episode.
			n := tries.Load()
			testenv.Eventually(t, "five more looks", func() bool { return tries.Load() >= n+5 })
			if len(reloads) != 0 {
				t.Errorf("%d reloads of an unchanged file:\n%s", len(reloads), logs)
			}
			if got := strings.Count(logs.String(), warned); got != 1 {
				t.Errorf("%d warnings in one episode", got)
			}

			refuse.Store(false)
			testenv.Eventually(t, "watching again", func() bool { return strings.Count(logs.String(), again) == 1 })
			n = tries.Load()
			replace(t, path, sample)
			waitReload("edit once watching")
			if !labelled() {
				t.Fatal("edit not applied once watching")
			}
			if got := tries.Load(); got != n {
				t.Errorf("the watch was tried %d more times while in place", got-n)
			}
		})
	}
}

// replace writes the file by rename, as editors do.
func replace(t *testing.T, path, body string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}
