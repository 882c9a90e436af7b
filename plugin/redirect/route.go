package redirect

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/mdlayher/netlink"
	"github.com/mdlayher/netlink/nlenc"
	"golang.org/x/sys/unix"
)

// The policy routing half of the redirection (one ip rule and one local
// default route per family) speaks rtnetlink directly, with the netlink
// library nftables already brings. A general-purpose rtnetlink library
// decodes every attribute of every link, rule and route into objects and
// reads each answer into a fresh 64 KiB buffer; in a process that lives
// for one CNI command that was ~50 page faults (~1.5 ms on a VM) for
// four dumps and two writes.

// routeProtocol tags the ip rule and the routes we add (the "proto" of
// `ip rule`/`ip route`), so removal finds exactly ours without knowing the
// spec they were installed with, and never touches anyone else's.
const routeProtocol = 0xa7 // 167, unassigned in iproute2's rt_protos

// Attribute types of fib rules (linux/fib_rules.h); x/sys/unix lacks them.
const (
	fraDst      = 1
	fraSrc      = 2
	fraPriority = 6
	fraFwmark   = 10
	fraTable    = 15
	fraFwmask   = 16
	fraProtocol = 21

	fibRuleInvert = 0x2
	frActToTbl    = 1
)

// rtConn is an rtnetlink socket opened inside a pod netns: a library
// socket (dialRoute), or a raw one for Recheck, through exec. A function
// rather than an interface, so a binary that never rechecks (ambit-cni)
// links neither the raw socket nor every method of the library's.
type rtConn struct {
	c    *netlink.Conn
	exec func(netlink.Message) ([]netlink.Message, error)
	path string
}

func dialRoute(n ns.NetNS) (*rtConn, error) {
	c, err := netlink.Dial(unix.NETLINK_ROUTE, &netlink.Config{NetNS: int(n.Fd())})
	if err != nil {
		return nil, fmt.Errorf("opening rtnetlink in %s: %w", n.Path(), err)
	}
	return &rtConn{c: c, exec: c.Execute, path: n.Path()}, nil
}

func (r *rtConn) Close() error { return r.c.Close() }

func (r *rtConn) dump(typ netlink.HeaderType, hdr []byte) ([]netlink.Message, error) {
	return r.exec(netlink.Message{Header: netlink.Header{Type: typ, Flags: netlink.Request | netlink.Dump}, Data: hdr})
}

func (r *rtConn) do(typ netlink.HeaderType, flags netlink.HeaderFlags, data []byte) error {
	_, err := r.exec(netlink.Message{Header: netlink.Header{Type: typ, Flags: netlink.Request | netlink.Acknowledge | flags}, Data: data})
	return err
}

func nlFamily(f family) uint8 {
	if f == 6 {
		return unix.AF_INET6
	}
	return unix.AF_INET
}

// link is what we need of lo: its index and whether it is up.
type link struct {
	index int32
	up    bool
}

// linkByName asks for one link by name (RTM_GETLINK + IFLA_IFNAME) and
// reads only the fixed ifinfomsg header of the answer.
func (r *rtConn) linkByName(name string) (link, error) {
	attrs, err := netlink.MarshalAttributes([]netlink.Attribute{{Type: unix.IFLA_IFNAME, Data: nlenc.Bytes(name)}})
	if err != nil {
		return link{}, err
	}
	msgs, err := r.exec(netlink.Message{
		Header: netlink.Header{Type: unix.RTM_GETLINK, Flags: netlink.Request},
		Data:   append(make([]byte, unix.SizeofIfInfomsg), attrs...),
	})
	if err != nil {
		return link{}, err
	}
	for _, m := range msgs {
		if m.Header.Type == unix.RTM_NEWLINK && len(m.Data) >= unix.SizeofIfInfomsg {
			return link{
				index: int32(nlenc.Uint32(m.Data[4:8])),
				up:    nlenc.Uint32(m.Data[8:12])&unix.IFF_UP != 0,
			}, nil
		}
	}
	return link{}, fmt.Errorf("no link %q", name)
}

func (r *rtConn) linkSetUp(l link) error {
	msg := make([]byte, unix.SizeofIfInfomsg)
	binary.NativeEndian.PutUint32(msg[4:8], uint32(l.index))
	binary.NativeEndian.PutUint32(msg[8:12], unix.IFF_UP)  // flags
	binary.NativeEndian.PutUint32(msg[12:16], unix.IFF_UP) // change
	return r.do(unix.RTM_NEWLINK, 0, msg)
}

// hasAddr6 reports whether link l holds any IPv6 address.
func (r *rtConn) hasAddr6(l link) (bool, error) {
	hdr := make([]byte, unix.SizeofIfAddrmsg)
	hdr[0] = unix.AF_INET6
	msgs, err := r.dump(unix.RTM_GETADDR, hdr)
	if err != nil {
		return false, err
	}
	for _, m := range msgs {
		if m.Header.Type == unix.RTM_NEWADDR && len(m.Data) >= unix.SizeofIfAddrmsg &&
			int32(nlenc.Uint32(m.Data[4:8])) == l.index {
			return true, nil
		}
	}
	return false, nil
}

// fibRule is a dumped ip rule: the fields we compare, and the raw message
// body, which is sent back as is to delete exactly that rule (what
// `ip rule flush` does).
type fibRule struct {
	family         uint8
	invert         bool
	srcSet, dstSet bool
	priority       int
	mark           uint32
	mask           *uint32
	table          int
	protocol       uint8
	raw            []byte
}

func (r fibRule) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "pref %d", r.priority)
	if r.invert {
		b.WriteString(" not")
	}
	if r.srcSet {
		b.WriteString(" from <prefix>")
	}
	if r.dstSet {
		b.WriteString(" to <prefix>")
	}
	if r.mask != nil {
		fmt.Fprintf(&b, " fwmark %#x/%#x", r.mark, *r.mask)
	} else if r.mark != 0 {
		fmt.Fprintf(&b, " fwmark %#x", r.mark)
	}
	fmt.Fprintf(&b, " lookup %d proto %d", r.table, r.protocol)
	return b.String()
}

func (r *rtConn) rules(f family) ([]fibRule, error) {
	hdr := make([]byte, 12) // struct fib_rule_hdr
	hdr[0] = nlFamily(f)
	msgs, err := r.dump(unix.RTM_GETRULE, hdr)
	if err != nil {
		return nil, err
	}
	var out []fibRule
	for _, m := range msgs {
		if m.Header.Type != unix.RTM_NEWRULE || len(m.Data) < 12 {
			continue
		}
		d := m.Data
		fr := fibRule{family: d[0], table: int(d[4]), invert: nlenc.Uint32(d[8:12])&fibRuleInvert != 0, raw: d}
		attrs, err := netlink.UnmarshalAttributes(d[12:])
		if err != nil {
			return nil, fmt.Errorf("decoding an IPv%d rule: %w", f, err)
		}
		for _, a := range attrs {
			switch a.Type {
			case fraSrc:
				fr.srcSet = true
			case fraDst:
				fr.dstSet = true
			case fraPriority:
				fr.priority = int(nlenc.Uint32(a.Data))
			case fraFwmark:
				fr.mark = nlenc.Uint32(a.Data)
			case fraFwmask:
				m := nlenc.Uint32(a.Data)
				fr.mask = &m
			case fraTable:
				fr.table = int(nlenc.Uint32(a.Data))
			case fraProtocol:
				if len(a.Data) > 0 {
					fr.protocol = a.Data[0]
				}
			}
		}
		out = append(out, fr)
	}
	return out, nil
}

func (r *rtConn) ruleDel(fr fibRule) error {
	return r.do(unix.RTM_DELRULE, 0, fr.raw)
}

// ruleAdd adds "pref RulePriority fwmark ConnMark/MarkMask lookup
// RouteTable proto ours" for family f; the message is the one iproute2
// (and the library this replaced) sends for that rule.
func (r *rtConn) ruleAdd(s Spec, f family) error {
	hdr := make([]byte, 12)
	hdr[0] = nlFamily(f)
	if s.RouteTable < 256 {
		hdr[4] = uint8(s.RouteTable)
	}
	hdr[7] = frActToTbl
	attrs := []netlink.Attribute{
		{Type: fraPriority, Data: nlenc.Uint32Bytes(uint32(s.RulePriority))},
		{Type: fraFwmark, Data: nlenc.Uint32Bytes(s.ConnMark)},
		{Type: fraFwmask, Data: nlenc.Uint32Bytes(s.MarkMask)},
	}
	if s.RouteTable >= 256 {
		attrs = append(attrs, netlink.Attribute{Type: fraTable, Data: nlenc.Uint32Bytes(uint32(s.RouteTable))})
	}
	attrs = append(attrs, netlink.Attribute{Type: fraProtocol, Data: []byte{routeProtocol}})
	b, err := netlink.MarshalAttributes(attrs)
	if err != nil {
		return err
	}
	return r.do(unix.RTM_NEWRULE, netlink.Create|netlink.Excl, append(hdr, b...))
}

func ruleMatches(got fibRule, s Spec) bool {
	return got.mark == s.ConnMark && got.mask != nil && *got.mask == s.MarkMask &&
		got.table == s.RouteTable && got.priority == s.RulePriority && !got.invert && !got.srcSet && !got.dstSet
}

// route is a dumped route of ours (protocol routeProtocol), with its raw
// body for deletion (what `ip route flush` does).
type route struct {
	table  int
	typ    uint8
	dstLen uint8
	dst    []byte
	raw    []byte
}

func (rt route) String() string {
	dst := "default"
	if a, ok := netip.AddrFromSlice(rt.dst); ok && (rt.dstLen != 0 || !a.IsUnspecified()) {
		dst = netip.PrefixFrom(a, int(rt.dstLen)).String()
	}
	return fmt.Sprintf("type %d %s table %d proto %d", rt.typ, dst, rt.table, routeProtocol)
}

// ourRoutes dumps family f's routes in every table and keeps ours, as
// iproute2's "ip route show table all proto 167" would (cloned cache
// entries excluded).
func (r *rtConn) ourRoutes(f family) ([]route, error) {
	hdr := make([]byte, unix.SizeofRtMsg)
	hdr[0] = nlFamily(f)
	msgs, err := r.dump(unix.RTM_GETROUTE, hdr)
	if err != nil {
		return nil, err
	}
	var out []route
	for _, m := range msgs {
		d := m.Data
		if m.Header.Type != unix.RTM_NEWROUTE || len(d) < unix.SizeofRtMsg || d[0] != nlFamily(f) || d[5] != routeProtocol ||
			nlenc.Uint32(d[8:12])&unix.RTM_F_CLONED != 0 {
			continue
		}
		rt := route{table: int(d[4]), typ: d[7], dstLen: d[1], raw: d}
		attrs, err := netlink.UnmarshalAttributes(d[unix.SizeofRtMsg:])
		if err != nil {
			return nil, fmt.Errorf("decoding an IPv%d route: %w", f, err)
		}
		for _, a := range attrs {
			switch a.Type {
			case unix.RTA_TABLE:
				rt.table = int(nlenc.Uint32(a.Data))
			case unix.RTA_DST:
				rt.dst = a.Data
			}
		}
		out = append(out, rt)
	}
	return out, nil
}

func (r *rtConn) routeDel(rt route) error {
	return r.do(unix.RTM_DELROUTE, 0, rt.raw)
}

// routeReplace installs "local default dev lo table RouteTable proto ours"
// for family f (ip route replace).
func (r *rtConn) routeReplace(s Spec, f family, lo link) error {
	hdr := make([]byte, unix.SizeofRtMsg)
	hdr[0] = nlFamily(f)
	hdr[5] = routeProtocol
	hdr[6] = unix.RT_SCOPE_HOST
	hdr[7] = unix.RTN_LOCAL
	var attrs []netlink.Attribute
	if s.RouteTable < 256 {
		hdr[4] = uint8(s.RouteTable)
	} else {
		attrs = append(attrs, netlink.Attribute{Type: unix.RTA_TABLE, Data: nlenc.Uint32Bytes(uint32(s.RouteTable))})
	}
	zero := make([]byte, 4)
	if f == 6 {
		zero = make([]byte, 16)
	}
	attrs = append(attrs,
		netlink.Attribute{Type: unix.RTA_DST, Data: zero},
		netlink.Attribute{Type: unix.RTA_OIF, Data: nlenc.Uint32Bytes(uint32(lo.index))})
	b, err := netlink.MarshalAttributes(attrs)
	if err != nil {
		return err
	}
	return r.do(unix.RTM_NEWROUTE, netlink.Create|netlink.Replace, append(hdr, b...))
}

// effective narrows spec's families to those the netns can route: IPv6
// rules and routes need IPv6 on lo (it is absent when IPv6 is disabled in
// the pod, or in the kernel). The nftables/iptables rules for such a
// family stay (they never match), so one pod's sysctl cannot fail its
// enrollment.
func effective(r *rtConn, lo link, s Spec) Spec {
	if s.IPv6 {
		if ok, err := r.hasAddr6(lo); err != nil || !ok {
			s.IPv6 = false
		}
	}
	return s
}

// routesInstall adds the policy rule and the local default route for
// each family, idempotently, and removes ours that spec no longer wants
// (another table or priority from an older spec).
func routesInstall(n ns.NetNS, s Spec) error {
	r, err := dialRoute(n)
	if err != nil {
		return err
	}
	defer r.Close()
	lo, err := r.linkByName("lo")
	if err != nil {
		return fmt.Errorf("finding lo: %w", err)
	}
	// The local route needs lo up; every runtime brings it up anyway.
	if !lo.up {
		if err := r.linkSetUp(lo); err != nil {
			return fmt.Errorf("bringing lo up: %w", err)
		}
	}
	s = effective(r, lo, s)
	for _, f := range []family{4, 6} {
		enabled := (f == 4 && s.IPv4) || (f == 6 && s.IPv6)
		rules, err := r.rules(f)
		if err != nil {
			if f == 6 && !enabled && errors.Is(err, unix.EAFNOSUPPORT) {
				continue // kernel without IPv6
			}
			return fmt.Errorf("listing IPv%d rules: %w", f, err)
		}
		have := false
		for _, fr := range rules {
			if fr.protocol != routeProtocol {
				continue
			}
			if enabled && !have && ruleMatches(fr, s) {
				have = true
				continue
			}
			if err := r.ruleDel(fr); err != nil && !errors.Is(err, unix.ENOENT) {
				return fmt.Errorf("removing stale IPv%d rule %s: %w", f, fr, err)
			}
		}
		if enabled && !have {
			if err := r.ruleAdd(s, f); err != nil && !errors.Is(err, unix.EEXIST) {
				return fmt.Errorf("adding ip -%d rule fwmark %#x/%#x lookup %d: %w", f, s.ConnMark, s.MarkMask, s.RouteTable, err)
			}
		}
		if err := removeOurRoutes(r, f, func(rt route) bool { return enabled && rt.table == s.RouteTable }); err != nil {
			return err
		}
		if enabled {
			if err := r.routeReplace(s, f, lo); err != nil {
				return fmt.Errorf("adding local default IPv%d route to table %d: %w (is IPv6 disabled in the pod?)", f, s.RouteTable, err)
			}
		}
	}
	return nil
}

// removeOurRoutes deletes our routes in any table, except those keep
// accepts.
func removeOurRoutes(r *rtConn, f family, keep func(route) bool) error {
	routes, err := r.ourRoutes(f)
	if err != nil {
		return fmt.Errorf("listing IPv%d routes: %w", f, err)
	}
	for _, rt := range routes {
		if keep(rt) {
			continue
		}
		if err := r.routeDel(rt); err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("removing IPv%d route %s: %w", f, rt, err)
		}
	}
	return nil
}

func routesUninstall(n ns.NetNS) error {
	r, err := dialRoute(n)
	if err != nil {
		return err
	}
	defer r.Close()
	for _, f := range []family{4, 6} {
		rules, err := r.rules(f)
		if err != nil {
			if f == 6 && errors.Is(err, unix.EAFNOSUPPORT) {
				continue
			}
			return fmt.Errorf("listing IPv%d rules: %w", f, err)
		}
		for _, fr := range rules {
			if fr.protocol != routeProtocol {
				continue
			}
			if err := r.ruleDel(fr); err != nil && !errors.Is(err, unix.ENOENT) {
				return fmt.Errorf("removing IPv%d rule %s: %w", f, fr, err)
			}
		}
		if err := removeOurRoutes(r, f, func(route) bool { return false }); err != nil {
			return err
		}
	}
	return nil
}

func routesVerify(n ns.NetNS, s Spec) []string {
	r, err := dialRoute(n)
	if err != nil {
		return []string{err.Error()}
	}
	defer r.Close()
	return r.verify(s)
}

// verify lists what differs between the netns's policy routing and s.
func (r *rtConn) verify(s Spec) []string {
	var problems []string
	// IPv6 off in the pod (lo without ::1): its policy routing is
	// neither required nor a difference when there. The runtime applies
	// a pod's sysctls after the CNI ADD, and turning IPv6 off then takes
	// our IPv6 route away with lo's address but leaves the ip rule (tied
	// to no device), which routes nothing alone. Flagging it repaired
	// every such pod once, and failed its CNI CHECK before that
	// (TestIPv6TurnedOffAfterInstall). A rule of another spec is still
	// flagged.
	off6 := false
	if s.IPv6 {
		if lo, err := r.linkByName("lo"); err == nil {
			off6 = !effective(r, lo, s).IPv6
		}
	}
	for _, f := range []family{4, 6} {
		enabled := (f == 4 && s.IPv4) || (f == 6 && s.IPv6)
		required := enabled && !(f == 6 && off6)
		rules, err := r.rules(f)
		if err != nil {
			if f == 6 && !required && errors.Is(err, unix.EAFNOSUPPORT) {
				continue
			}
			problems = append(problems, fmt.Sprintf("listing IPv%d rules: %v", f, err))
			continue
		}
		n := 0
		for _, fr := range rules {
			if fr.protocol == routeProtocol {
				n++
				if !enabled || !ruleMatches(fr, s) {
					problems = append(problems, fmt.Sprintf("unexpected IPv%d rule %s", f, fr))
				}
			}
		}
		if required && n == 0 {
			problems = append(problems, fmt.Sprintf("IPv%d rule fwmark %#x/%#x lookup %d pref %d missing", f, s.ConnMark, s.MarkMask, s.RouteTable, s.RulePriority))
		}
		routes, err := r.ourRoutes(f)
		if err != nil {
			problems = append(problems, fmt.Sprintf("listing IPv%d routes: %v", f, err))
			continue
		}
		found := false
		for _, rt := range routes {
			ok := enabled && rt.table == s.RouteTable && rt.typ == unix.RTN_LOCAL && rt.dstLen == 0
			if ok && !found {
				found = true
				continue
			}
			problems = append(problems, fmt.Sprintf("unexpected IPv%d route %s", f, rt))
		}
		if required && !found {
			problems = append(problems, fmt.Sprintf("IPv%d route local default dev lo table %d missing", f, s.RouteTable))
		}
	}
	return problems
}
