package agent

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ambit-mesh/ambit/plugin/redirect"
	"github.com/ambit-mesh/ambit/tunnel"
)

// Tunnel serves enrolled pods; *tunnel.Proxy through ProxyTunnel.
type Tunnel interface {
	Serve(pod tunnel.Pod) (Serving, error)
}

// Serving is one pod being served.
type Serving interface {
	// Close stops accepting and drains established connections until
	// ctx ends.
	Close(ctx context.Context) error
}

// Relabeler is implemented by a Serving that authorizes by the pod's
// labels (*tunnel.Serving): told when they change, so a policy selecting
// the new labels applies to the pod's new and live connections.
type Relabeler interface {
	SetLabels(labels map[string]string)
}

// IdleCloser is implemented by a Serving whose pod holds pooled
// outbound connections (*tunnel.Serving): those idle are shut down while
// the pod's network can still carry the goodbye (releaseAsync).
type IdleCloser interface {
	CloseIdleOutbound(ctx context.Context)
}

// Aborter is implemented by a Serving that can end every connection of
// its pod at once (*tunnel.Serving): for a pod whose network is going
// now, a DEL (releaseGone). Abort waits up to ctx for the pod's handlers
// to end and its sockets to close, its error saying which were left; a
// Close after it waits for the rest.
type Aborter interface {
	Abort(ctx context.Context) error
}

// ProxyTunnel adapts *tunnel.Proxy to Tunnel.
type ProxyTunnel struct{ Proxy *tunnel.Proxy }

// Serve implements Tunnel.
func (t ProxyTunnel) Serve(pod tunnel.Pod) (Serving, error) {
	s, err := t.Proxy.Serve(pod)
	if err != nil {
		return nil, err
	}
	if s == nil {
		return nil, fmt.Errorf("tunnel returned no serving handle")
	}
	return s, nil
}

// Redirector installs, verifies and removes in-pod redirection: at ADD,
// CHECK and DEL (protocol version 2 plugins), at live enrollment and at
// repair after a restart. A version 1 plugin installs its pod's rules
// itself.
//
// ctx bounds the work: a plugin request passes its deadline (less the
// time its answer needs), so a run waiting on the host's xtables lock
// ends in time for a retryable answer; the background loops pass a
// context without one, and each iptables run keeps its own bound (10 s).
// An error of work cut by ctx wraps ctx's error.
type Redirector interface {
	// Install uses backend, or the configured one when backend is empty
	// or auto. It returns by ctx's deadline, with nothing of ours left
	// behind on error (redirect.Install).
	Install(ctx context.Context, netns *os.File, backend redirect.Backend, spec redirect.Spec) (used string, err error)
	Verify(ctx context.Context, netns *os.File, spec redirect.Spec) error
	// Installed lists the backends holding rules of ours in netns.
	Installed(ctx context.Context, netns *os.File) ([]redirect.Backend, error)
	// Recheck is Verify for the periodic check of one pod: c carries what
	// the previous checks of that netns saw (redirect.Recheck).
	Recheck(ctx context.Context, netns *os.File, spec redirect.Spec, c *redirect.Checked) error
	Uninstall(ctx context.Context, netns *os.File) error
}

// Rules is the Redirector backed by plugin/redirect.
type Rules struct {
	Backend redirect.Backend
	// RunTimeout bounds each iptables run besides the caller's context
	// (redirect.WithRunTimeout); default 10 s. A run stopped there is a
	// rule failure (redirect.ErrRunTimeout), not a request's deadline.
	RunTimeout time.Duration
}

func (r Rules) ctx(ctx context.Context) context.Context {
	return redirect.WithRunTimeout(ctx, r.RunTimeout)
}

func withNS(f *os.File, fn func(ns.NetNS) error) error {
	n, err := ns.GetNS(fmt.Sprintf("/proc/self/fd/%d", f.Fd()))
	if err != nil {
		return err
	}
	defer n.Close()
	return fn(n)
}

// Install implements Redirector.
func (r Rules) Install(ctx context.Context, f *os.File, backend redirect.Backend, spec redirect.Spec) (string, error) {
	if backend == "" || backend == redirect.Auto {
		backend = r.Backend
	}
	var used redirect.Backend
	err := withNS(f, func(n ns.NetNS) error {
		b, err := redirect.Install(r.ctx(ctx), n, backend, spec)
		used = b
		return err
	})
	return string(used), err
}

// Verify implements Redirector.
func (r Rules) Verify(ctx context.Context, f *os.File, spec redirect.Spec) error {
	return withNS(f, func(n ns.NetNS) error { return redirect.Verify(r.ctx(ctx), n, spec) })
}

// Installed implements Redirector.
func (r Rules) Installed(ctx context.Context, f *os.File) ([]redirect.Backend, error) {
	var found []redirect.Backend
	err := withNS(f, func(n ns.NetNS) (err error) {
		found, err = redirect.Installed(r.ctx(ctx), n)
		return err
	})
	return found, err
}

// Recheck implements Redirector.
func (r Rules) Recheck(ctx context.Context, f *os.File, spec redirect.Spec, c *redirect.Checked) error {
	return withNS(f, func(n ns.NetNS) error { return redirect.Recheck(r.ctx(ctx), n, spec, c) })
}

// Uninstall implements Redirector.
func (r Rules) Uninstall(ctx context.Context, f *os.File) error {
	return withNS(f, func(n ns.NetNS) error { return redirect.Uninstall(r.ctx(ctx), n) })
}

// Keeper holds copies of pods' listening sockets in another process
// (*keeper.Client): Put after a pod's listeners open (replacing what an
// earlier agent kept for that sandbox), Drop before they close,
// PruneOlder once re-adoption is done, PruneAll at a stop while another
// agent serves beside (Options.Beside).
type Keeper interface {
	Put(key string, listeners ...net.Listener) error
	Drop(key string) error
	PruneOlder() error
	PruneAll() error
	// Count reports the entries kept: fewer than the pods served means
	// the keeper restarted (empty) and they are put again.
	Count() (entries, fds int, err error)
}

// Prefetcher pins a workload identity while a pod using it is enrolled
// and fetches its certificate in the background, so the first connection
// does not wait for the CA (identity.Manager). Every Prefetch is paired
// with one Forget. Optional.
type Prefetcher interface {
	Prefetch(identity string) error
	Forget(identity string)
}

// Learner is implemented by views that learn pod IPs from the CNI ADD
// (the static inventory).
type Learner interface {
	Learn(namespace, name, uid string, ips []netip.Addr)
	Forget(namespace, name, uid string)
}

// staticView marks a view that is authoritative: a pod it does not know is
// not in the mesh, rather than "not in the cache yet".
type staticView interface{ Static() bool }

// snapshotLister is implemented by views that know which namespaces may
// hold enrolled pods (both sources do).
type snapshotLister interface {
	AmbientNamespaces() []string
	OptInNamespaces() []string
}

// HostRules keeps the host's probe SNAT entries for enrolled pod IPs, keyed
// by pod UID so IP reuse is safe (hostrules.Manager). Optional.
type HostRules interface {
	Add(uid string, ips []netip.Addr) error
	// AddContext is Add ending by ctx (a plugin request's deadline); an
	// error of work ctx ended wraps ctx's error.
	AddContext(ctx context.Context, uid string, ips []netip.Addr) error
	Remove(uid string, ips []netip.Addr) error
	Sync(want map[string][]netip.Addr) error
}
