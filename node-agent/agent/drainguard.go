package agent

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sync"

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
// again, it has two drains sharing one guard (holdDrainGuard).

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
// namespace open, so the inode names no other meanwhile), the drains its
// guard serves. A pod unenrolled again while an earlier unenrollment
// still drains shares that guard, and the first drain to end must not
// take it from the other's connections.
var drainGuards = struct {
	sync.Mutex
	n map[uint64]int
}{n: map[uint64]int{}}

// holdDrainGuard adds the guard for a pod whose rules were built from s,
// unless a drain of its namespace holds it already, and counts this
// drain. Each hold that succeeded is released once (releaseDrainGuard).
func holdDrainGuard(f *os.File, s redirect.Spec) error {
	ino, err := netnsfind.Inode(f)
	if err != nil {
		return err
	}
	drainGuards.Lock()
	defer drainGuards.Unlock()
	if drainGuards.n[ino] == 0 {
		if err := addDrainGuard(f, s); err != nil {
			return err
		}
	}
	drainGuards.n[ino]++
	return nil
}

// releaseDrainGuard ends a drain's hold; the last one removes the guard.
func releaseDrainGuard(f *os.File) error {
	ino, err := netnsfind.Inode(f)
	if err != nil {
		return err
	}
	drainGuards.Lock()
	defer drainGuards.Unlock()
	if drainGuards.n[ino] > 1 {
		drainGuards.n[ino]--
		return nil
	}
	delete(drainGuards.n, ino)
	return delDrainGuard(f)
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
	h, err := netlink.NewHandleAt(netns.NsHandle(int(f.Fd())), unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("opening rtnetlink in the pod: %w", err)
	}
	defer h.Close()
	var errs []error
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rules, err := h.RuleList(family)
		if err != nil {
			if !errors.Is(err, unix.EAFNOSUPPORT) {
				errs = append(errs, fmt.Errorf("listing rules: %w", err))
			}
			continue
		}
		for _, r := range rules {
			if r.Protocol != drainRouteProtocol {
				continue
			}
			if err := h.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, fmt.Errorf("removing %s: %w", r, err))
			}
		}
		routes, err := h.RouteListFiltered(family, &netlink.Route{Table: unix.RT_TABLE_UNSPEC, Protocol: drainRouteProtocol}, netlink.RT_FILTER_TABLE|netlink.RT_FILTER_PROTOCOL)
		if err != nil {
			errs = append(errs, fmt.Errorf("listing routes: %w", err))
			continue
		}
		for _, rt := range routes {
			if err := h.RouteDel(&rt); err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, fmt.Errorf("removing route %s: %w", rt, err))
			}
		}
	}
	return errors.Join(errs...)
}
