package agent

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/ambit-mesh/ambit/node-agent/netnsfind"
	"github.com/ambit-mesh/ambit/plugin/redirect"
)

// Removing a pod's redirection at a live unenrollment takes away two
// things its established connections still need while they drain:
//
//   - The NAT binding of a redirected connection (the app's outbound,
//     plaintext inbound to 15006) is applied only while connection
//     tracking and the NAT hooks are registered in the namespace, and both
//     are registered only while some rule needs them. Without them every
//     established redirected connection suddenly leaves, untranslated, for
//     its original destination, which answers with a reset (seen in
//     TestLiveLabelFlip).
//   - The agent delivers an inbound stream to the app from the client's
//     own address (a transparent socket), so the app's replies are
//     addressed to a remote IP: they reach the agent's socket only because
//     the connection's conntrack mark (ConnMark, set when the agent's
//     marked dial entered) is copied to each reply, and the ip rule on
//     that mark routes it to a local default route. Without the copy or
//     the rule the replies leave through the pod's interface for the real
//     client pod, which drops or resets them: the stream hangs
//     (TestUnenrollDrainsInboundStreams).
//
// So before the rules go, the agent adds a guard holding exactly that:
// tables "ambit-drain" (ip and ip6) with a NAT base chain whose one rule
// only loads the conntrack state (it matches, captures and changes
// nothing), a prerouting chain giving ConnMark to the connections the
// agent's marked sockets dial (a drain still dials: what the listeners
// accepted before they closed, streams sent before the last GOAWAY), and
// a route chain that copies ConnMark from the connection to its packets;
// plus, per family, "fwmark ConnMark/MarkMask lookup drainTable" and a
// local default route in that table, tagged with a protocol of their
// own. Nothing in it captures a new connection: no packet is redirected,
// and only connections the agent dials carry ConnMark. It is removed
// after the drain (afterDrain).
//
// The guard is nf_tables over netlink whatever backend wrote the pod's
// rules: conntrack marks and packet marks are the kernel's, read and
// written alike by iptables' CONNMARK and nftables' ct mark, and an
// nf_tables route chain reroutes on a changed mark as iptables' mangle
// OUTPUT does; nf_tables hooks run beside iptables-legacy's in the same
// namespace. Where the kernel lacks nf_tables the guard fails, and the
// unenrollment cuts the pod's established connections as it did before
// there was a guard.
//
// Its policy routing is apart from the redirection's (another table and
// protocol) so that neither removes, repairs or reports the other: a pod
// enrolled again while an earlier unenrollment still drains has both, and
// the end of that drain must leave the new redirection alone; unenrolled
// again, it has two drains sharing one guard (holdDrainGuard), of one
// agent or, during a surge upgrade, of two.

const drainTable = "ambit-drain"

// drainRouteProtocol tags the guard's ip rules and routes (the "proto"
// of `ip rule`/`ip route`), so its removal finds exactly them. The
// redirection's are 0xa7; both are unassigned in iproute2's rt_protos.
const drainRouteProtocol = 0xa8

// drainRouteTableFor is the guard's route table: its own, never the
// redirection's, which holds the same local default route of another
// protocol and which the redirection's install (a pod enrolled again
// during the drain) would take as its own.
func drainRouteTableFor(s redirect.Spec) int {
	const t = 0xa7d
	if s.RouteTable == t {
		return t + 1
	}
	return t
}

// drainGuards counts, per namespace (by inode: each drain holds its
// namespace open, so the inode names no other meanwhile), the drains of
// this process its guard serves. A pod unenrolled again while an earlier
// unenrollment still drains shares that guard, and the first drain to end
// must not take it from the other's connections.
//
// The count is the process's, but the guard is the namespace's: during a
// surge upgrade two agents share the node, and the old one may still be
// draining a pod the new one unenrolls again. Each process therefore
// records itself in the guard (holderChain: an empty chain named after
// its id, in the ip table), and the last holder of any process removes
// it. Adding or removing an entry and looking at the others happen under
// an flock of the namespace itself (lockNetns), which every process of
// the node opens, whatever path it came by, as the same inode.
var drainGuards = newDrainHolders()

// drainHolders is one process's holds (a test makes more, as other
// processes would).
type drainHolders struct {
	sync.Mutex
	// id names this process in the guards it holds: random, as no
	// process of another agent can tell from it whether this one is
	// alive (that is the sweep's part: sweepDrainGuard).
	id string
	n  map[uint64]int
	// left are the namespaces (by inode) met while another agent ran,
	// swept once none runs (sweepLeftDrainGuards).
	left map[uint64]leftGuard
}

func newDrainHolders() *drainHolders {
	var b [8]byte
	rand.Read(b[:])
	return &drainHolders{id: hex.EncodeToString(b[:]), n: map[uint64]int{}, left: map[uint64]leftGuard{}}
}

// leftGuard is where to open a namespace of drainGuards.left again.
type leftGuard struct{ path, pod string }

// drainGuardFailures counts the holds that failed: unenrollments whose
// established connections were cut. Counted here, where every caller's
// failure passes, and process-wide as the guards are (drainGuards); each
// agent's registry reports it (ambit_agent_drain_guard_failures_total).
var drainGuardFailures atomic.Uint64

// holdDrainGuard adds the guard for a pod whose rules were built from s,
// unless a drain (of any process) holds it already, and counts this
// drain. Each hold that succeeded is released once (releaseDrainGuard).
func holdDrainGuard(f *os.File, s redirect.Spec) (err error) {
	defer func() {
		if err != nil {
			drainGuardFailures.Add(1)
		}
	}()
	return drainGuards.hold(f, s)
}

// releaseDrainGuard ends a drain's hold; the last one of the last
// process holding the guard removes it.
func releaseDrainGuard(f *os.File) error { return drainGuards.release(f) }

func (d *drainHolders) hold(f *os.File, s redirect.Spec) error {
	ino, err := netnsfind.Inode(f)
	if err != nil {
		return err
	}
	d.Lock()
	defer d.Unlock()
	if d.n[ino] == 0 {
		unlock, err := lockNetns(f)
		if err != nil {
			return err
		}
		defer unlock()
		holders, err := drainHolderIDs(f)
		if err != nil {
			return err
		}
		// Another process's guard is in use: added anew on top of it,
		// its rules would only be doubled, and a failure would take it
		// away (addDrainGuard cleans up after itself). One without
		// holders is an agent's that died or predates them, added on
		// top as before.
		added := len(holders) == 0
		if added {
			if err := addDrainGuard(f, s); err != nil {
				return err
			}
		}
		if err := addHolder(f, d.id); err != nil {
			if added {
				err = errors.Join(err, delDrainGuard(f))
			}
			return err
		}
	}
	d.n[ino]++
	return nil
}

func (d *drainHolders) release(f *os.File) error {
	ino, err := netnsfind.Inode(f)
	if err != nil {
		return err
	}
	d.Lock()
	defer d.Unlock()
	if d.n[ino] > 1 {
		d.n[ino]--
		return nil
	}
	delete(d.n, ino)
	unlock, err := lockNetns(f)
	if err != nil {
		d.leave(ino, f)
		return err
	}
	defer unlock()
	rest, err := delHolder(f, d.id)
	if err != nil {
		// Whether another process still drains through it is
		// unknown: kept, for the sweep once no other agent runs.
		d.leave(ino, f)
		return err
	}
	if len(rest) > 0 {
		// The entries left may be an agent's that died mid-drain,
		// which no release will remove: only the sweep can, once no
		// other agent runs, and it looks only at the namespaces it
		// remembers (a pod this agent enrolled itself was never met
		// by adoption).
		d.leave(ino, f)
		return nil
	}
	if err := delDrainGuard(f); err != nil {
		d.leave(ino, f)
		return err
	}
	return nil
}

// leave remembers the namespace f, whose guard a release left, for the
// sweep (sweepLeftDrainGuards); one remembered already keeps the path
// and pod it was met with. The caller holds d.
func (d *drainHolders) leave(ino uint64, f *os.File) {
	if _, ok := d.left[ino]; !ok {
		d.left[ino] = leftGuard{path: f.Name(), pod: "netns " + f.Name()}
	}
}

// holderPrefix names the chains recording the guard's holders.
const holderPrefix = "holder-"

// addHolder records the process id in the guard of the namespace f: an
// empty chain of no hook, which no packet passes.
func addHolder(f *os.File, id string) error {
	c, err := nftables.New(nftables.WithNetNSFd(int(f.Fd())))
	if err != nil {
		return err
	}
	t := c.AddTable(&nftables.Table{Family: nftables.TableFamilyIPv4, Name: drainTable})
	c.AddChain(&nftables.Chain{Name: holderPrefix + id, Table: t})
	if err := c.Flush(); err != nil {
		return fmt.Errorf("recording this agent as a holder of the drain guard: %w", err)
	}
	return nil
}

// delHolder removes the process id from the guard of the namespace f
// and says which holders remain.
func delHolder(f *os.File, id string) ([]string, error) {
	c, err := nftables.New(nftables.WithNetNSFd(int(f.Fd())))
	if err != nil {
		return nil, err
	}
	c.DelChain(&nftables.Chain{Name: holderPrefix + id, Table: &nftables.Table{Family: nftables.TableFamilyIPv4, Name: drainTable}})
	if err := c.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
		return nil, fmt.Errorf("removing this agent as a holder of the drain guard: %w", err)
	}
	return drainHolderIDs(f)
}

// drainHolderIDs lists the processes recorded as holding the guard of
// the namespace f (none without the guard).
func drainHolderIDs(f *os.File) ([]string, error) {
	c, err := nftables.New(nftables.WithNetNSFd(int(f.Fd())))
	if err != nil {
		return nil, err
	}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyIPv4)
	if err != nil {
		return nil, fmt.Errorf("listing the drain guard's holders: %w", err)
	}
	var ids []string
	for _, ch := range chains {
		if ch.Table != nil && ch.Table.Name == drainTable && strings.HasPrefix(ch.Name, holderPrefix) {
			ids = append(ids, strings.TrimPrefix(ch.Name, holderPrefix))
		}
	}
	return ids, nil
}

// lockNetns takes an exclusive flock of the namespace f for the node:
// the lock is the inode's, and every process opening the namespace, by
// /proc or a bind mount, in whatever mount namespace, opens that inode.
// A fresh open file description is locked, so that the caller's f, which
// others of this process may share, carries no lock; the process's own
// callers are serialized by drainHolders' mutex. The kernel drops the
// lock of a process that dies.
func lockNetns(f *os.File) (unlock func(), err error) {
	l, err := os.Open(fmt.Sprintf("/proc/self/fd/%d", f.Fd()))
	if err != nil {
		return nil, fmt.Errorf("opening the pod's namespace to lock it: %w", err)
	}
	for {
		err = unix.Flock(int(l.Fd()), unix.LOCK_EX)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		l.Close()
		return nil, fmt.Errorf("locking the pod's namespace: %w", err)
	}
	return func() { l.Close() }, nil
}

// addDrainGuard adds the guard for a pod whose rules were built from s;
// on error nothing of it is left.
func addDrainGuard(f *os.File, s redirect.Spec) error {
	if err := addDrainRoutes(f, s); err != nil {
		return errors.Join(err, delDrainGuard(f))
	}
	c, err := nftables.New(nftables.WithNetNSFd(int(f.Fd())))
	if err != nil {
		return errors.Join(err, delDrainGuard(f))
	}
	for _, fam := range []nftables.TableFamily{nftables.TableFamilyIPv4, nftables.TableFamilyIPv6} {
		t := c.AddTable(&nftables.Table{Family: fam, Name: drainTable})
		ch := c.AddChain(&nftables.Chain{Name: "hold-nat", Table: t, Type: nftables.ChainTypeNAT, Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource})
		// A conntrack expression keeps connection tracking itself
		// registered in the namespace; it only loads a register.
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{&expr.Ct{Register: 1, Key: expr.CtKeySTATE}}})
		// The redirection's own marking of the agent's dials to the app.
		// The drain still dials: a draining pod serves what its
		// listeners accepted before they closed and the streams an
		// HBONE client sent before it saw the last GOAWAY (tunnel's
		// Serving.enter). Without the mark the app's replies to such a
		// dial left for the real client and the dial timed out
		// (TestDrainGuardMarksDialsDuringTheDrain). Only the agent's
		// sockets carry Mark, so no one else's connection is taken.
		in := c.AddChain(&nftables.Chain{Name: "mark-agent", Table: t, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityMangle})
		c.AddRule(&nftables.Rule{Table: t, Chain: in, Exprs: []expr.Any{
			&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: binaryutil.NativeEndian.PutUint32(s.MarkMask), Xor: binaryutil.NativeEndian.PutUint32(0)},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(s.Mark)},
			&expr.Ct{Key: expr.CtKeyMARK, Register: 1},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: binaryutil.NativeEndian.PutUint32(^s.MarkMask), Xor: binaryutil.NativeEndian.PutUint32(s.ConnMark)},
			&expr.Ct{Key: expr.CtKeyMARK, Register: 1, SourceRegister: true},
		}})
		// The redirection's own reply rule: a route chain, so the
		// changed mark sends the packet through policy routing again.
		rt := c.AddChain(&nftables.Chain{Name: "replies", Table: t, Type: nftables.ChainTypeRoute, Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityMangle})
		c.AddRule(&nftables.Rule{Table: t, Chain: rt, Exprs: []expr.Any{
			&expr.Ct{Key: expr.CtKeyMARK, Register: 1},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: binaryutil.NativeEndian.PutUint32(s.MarkMask), Xor: binaryutil.NativeEndian.PutUint32(0)},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(s.ConnMark)},
			&expr.Ct{Key: expr.CtKeyMARK, Register: 1},
			&expr.Meta{Key: expr.MetaKeyMARK, Register: 1, SourceRegister: true},
		}})
	}
	if err := c.Flush(); err != nil {
		return errors.Join(fmt.Errorf("adding tables %s: %w", drainTable, err), delDrainGuard(f))
	}
	return nil
}

// addDrainRoutes adds the guard's rule and route for each family of s
// that lo has an address of, as the redirection does: without one the
// local route cannot be added, and the redirection had none either.
func addDrainRoutes(f *os.File, s redirect.Spec) error {
	h, err := netlink.NewHandleAt(netns.NsHandle(int(f.Fd())), unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("opening rtnetlink in the pod: %w", err)
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("finding lo: %w", err)
	}
	table := drainRouteTableFor(s)
	for _, fam := range []struct {
		on     bool
		family int
		dst    *net.IPNet
	}{
		{s.IPv4, netlink.FAMILY_V4, &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}},
		{s.IPv6, netlink.FAMILY_V6, &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}},
	} {
		if !fam.on {
			continue
		}
		if addrs, err := h.AddrList(lo, fam.family); err != nil || len(addrs) == 0 {
			continue
		}
		rt := &netlink.Route{Family: fam.family, LinkIndex: lo.Attrs().Index, Dst: fam.dst, Table: table,
			Type: unix.RTN_LOCAL, Scope: netlink.SCOPE_HOST, Protocol: drainRouteProtocol}
		if err := h.RouteReplace(rt); err != nil {
			return fmt.Errorf("adding the local default route to table %d: %w", table, err)
		}
		r := netlink.NewRule()
		r.Family, r.Priority, r.Table, r.Protocol = fam.family, s.RulePriority, table, drainRouteProtocol
		mask := s.MarkMask
		r.Mark, r.Mask = s.ConnMark, &mask
		if err := h.RuleAdd(r); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("adding rule fwmark %#x/%#x lookup %d: %w", s.ConnMark, s.MarkMask, table, err)
		}
	}
	return nil
}

// delDrainGuard removes whatever of the guard f holds, its tables last
// (once they are gone, all of it is).
func delDrainGuard(f *os.File) error {
	errs := []error{delDrainRoutes(f)}
	c, err := nftables.New(nftables.WithNetNSFd(int(f.Fd())))
	if err != nil {
		errs = append(errs, err)
	} else {
		for _, fam := range []nftables.TableFamily{nftables.TableFamilyIPv4, nftables.TableFamilyIPv6} {
			c.DelTable(&nftables.Table{Family: fam, Name: drainTable})
			if err := c.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// delDrainRoutes removes every ip rule and route of the guard's protocol,
// in any table: whatever spec the guard was added with.
func delDrainRoutes(f *os.File) error {
	h, rules, routes, errs := drainRouting(f)
	if h == nil {
		return errors.Join(errs...)
	}
	defer h.Close()
	for _, r := range rules {
		if err := h.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("removing %s: %w", r, err))
		}
	}
	for _, rt := range routes {
		if err := h.RouteDel(&rt); err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("removing route %s: %w", rt, err))
		}
	}
	return errors.Join(errs...)
}

// drainRouting lists the guard's ip rules and routes (its protocol, any
// table, both families) in the namespace f, with the rtnetlink handle
// it used (nil if none could be opened; the caller closes it). A family
// the kernel lacks (EAFNOSUPPORT) has none.
func drainRouting(f *os.File) (h *netlink.Handle, rules []netlink.Rule, routes []netlink.Route, errs []error) {
	h, err := netlink.NewHandleAt(netns.NsHandle(int(f.Fd())), unix.NETLINK_ROUTE)
	if err != nil {
		return nil, nil, nil, []error{fmt.Errorf("opening rtnetlink in the pod: %w", err)}
	}
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rs, err := h.RuleList(family)
		if err != nil {
			if !errors.Is(err, unix.EAFNOSUPPORT) {
				errs = append(errs, fmt.Errorf("listing rules: %w", err))
			}
			continue
		}
		for _, r := range rs {
			if r.Protocol == drainRouteProtocol {
				rules = append(rules, r)
			}
		}
		rts, err := h.RouteListFiltered(family, &netlink.Route{Table: unix.RT_TABLE_UNSPEC, Protocol: drainRouteProtocol}, netlink.RT_FILTER_TABLE|netlink.RT_FILTER_PROTOCOL)
		if err != nil {
			errs = append(errs, fmt.Errorf("listing routes: %w", err))
			continue
		}
		routes = append(routes, rts...)
	}
	return h, rules, routes, errs
}

// Guards left by an agent that died mid-drain.
//
// A guard is removed by the last process whose drain it serves. One
// killed or crashed mid-drain (or stopped with its pod deleted at an
// upgrade past its grace) leaves it, or leaves its entry in it
// (holderChain), which keeps another process's release from removing it:
// conntrack and the NAT hooks registered in a pod out of the mesh,
// packets with ConnMark routed to the local table, until the pod's next
// unenrollment or deletion. The drain it served is over: its connections
// were that process's sockets, closed with it. But a holder's entry says
// nothing of whether it is alive (its id is random: the agents of a node
// share no pid namespace), and during a surge upgrade the other agent may
// be draining the pod right now (it unenrolled the pod, this one adopted
// it); removing that guard cuts the drain.
//
// So a guard met in a pod's namespace (adoption at start, and of records
// another agent wrote: adoptLocked) is an orphan, and removed, only when
//
//   - no drain of this process holds a guard there (drainGuards), and
//   - no other agent runs on the node (Options.Peers): then no live
//     process can be draining there, whatever holders the guard names.
//     Asked again under the namespace's lock (lockNetns): an agent
//     registers before it can hold a guard, so one that starts meanwhile
//     waits for the lock and adds the guard afresh.
//
// Met while another agent runs, or while a drain of this process holds
// it, the namespace is remembered, guard or not (that agent may still
// unenroll the pod and die mid-drain; this drain's end leaves the guard
// to that agent's entry), and swept once none runs and no drain of this
// process holds it (the audit loop asks each second). An agent without
// Options.Peers takes itself for alone, as its record following does.

// sweepDrainGuard removes the guard left in the namespace f (opened at
// path, the pod's) if it is an orphan, or remembers the namespace while
// another agent runs or a drain of this process holds it.
func (a *Agent) sweepDrainGuard(f *os.File, path, pod string) {
	ino, err := netnsfind.Inode(f)
	if err != nil {
		return
	}
	drainGuards.Lock()
	held := drainGuards.n[ino] > 0
	if held {
		drainGuards.left[ino] = leftGuard{path, pod}
	}
	drainGuards.Unlock()
	if held {
		return
	}
	if a.otherAgents() {
		drainGuards.Lock()
		drainGuards.left[ino] = leftGuard{path, pod}
		drainGuards.Unlock()
		return
	}
	// Looked for outside the lock, which adoption's pods would queue on;
	// only a removal must not race a drain (of any process) adding its
	// guard.
	found, err := hasDrainGuard(f)
	if err != nil {
		a.log.Debug("looking for a drain guard left by an agent", "pod", pod, "err", err)
	}
	drainGuards.Lock()
	defer drainGuards.Unlock()
	if drainGuards.n[ino] > 0 {
		// A drain of this process began meanwhile.
		drainGuards.left[ino] = leftGuard{path, pod}
		return
	}
	delete(drainGuards.left, ino)
	if !found {
		return
	}
	unlock, err := lockNetns(f)
	if err != nil {
		a.log.Warn("removing a drain guard left by an agent that stopped mid-drain", "pod", pod, "err", err)
		return
	}
	defer unlock()
	if a.otherAgents() {
		drainGuards.left[ino] = leftGuard{path, pod}
		return
	}
	if err := delDrainGuard(f); err != nil {
		a.log.Warn("removing a drain guard left by an agent that stopped mid-drain", "pod", pod, "err", err)
		return
	}
	a.m.orphanGuards.Inc()
	a.log.Info("removed a drain guard left by an agent that stopped mid-drain", "pod", pod)
}

// sweepLeftDrainGuards sweeps the namespaces met while another agent ran,
// unless one still runs. A namespace gone (or another at its path) took
// its guard with it.
func (a *Agent) sweepLeftDrainGuards() {
	if a.otherAgents() {
		return
	}
	drainGuards.Lock()
	left := make(map[uint64]leftGuard, len(drainGuards.left))
	for ino, l := range drainGuards.left {
		left[ino] = l
	}
	drainGuards.Unlock()
	for ino, l := range left {
		f, err := os.Open(l.path)
		if err == nil {
			if got, err := netnsfind.Inode(f); err == nil && got == ino {
				a.sweepDrainGuard(f, l.path, l.pod)
				f.Close()
				continue
			}
			f.Close()
		}
		drainGuards.Lock()
		delete(drainGuards.left, ino)
		drainGuards.Unlock()
	}
}

// leftDrainGuards says whether namespaces wait for sweepLeftDrainGuards.
func leftDrainGuards() bool {
	drainGuards.Lock()
	defer drainGuards.Unlock()
	return len(drainGuards.left) > 0
}

// hasDrainGuard says whether the namespace f holds any part of a guard:
// its tables, or a rule or route of its protocol. Where nf_tables cannot
// be read, no table could have been added there: its routes still count.
func hasDrainGuard(f *os.File) (bool, error) {
	var errs []error
	if c, err := nftables.New(nftables.WithNetNSFd(int(f.Fd()))); err != nil {
		errs = append(errs, err)
	} else if ts, err := c.ListTables(); err != nil {
		errs = append(errs, fmt.Errorf("listing tables: %w", err))
	} else {
		for _, t := range ts {
			if t.Name == drainTable && (t.Family == nftables.TableFamilyIPv4 || t.Family == nftables.TableFamilyIPv6) {
				return true, nil
			}
		}
	}
	h, rules, routes, rerrs := drainRouting(f)
	if h != nil {
		h.Close()
	}
	if len(rules) > 0 || len(routes) > 0 {
		return true, nil
	}
	return false, errors.Join(append(errs, rerrs...)...)
}
