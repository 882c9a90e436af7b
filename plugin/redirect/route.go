package redirect

import (
	"errors"
	"fmt"
	"net"
	"strings"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// routeProtocol tags the ip rule and the routes we add (the "proto" of
// `ip rule`/`ip route`), so removal finds exactly ours without knowing the
// spec they were installed with, and never touches anyone else's.
const routeProtocol = 0xa7 // 167, unassigned in iproute2's rt_protos

// nlHandle opens rtnetlink in n. Only NETLINK_ROUTE: without a family
// list the library also opens (and enters the netns for) xfrm and
// netfilter sockets we never use.
func nlHandle(n ns.NetNS) (*netlink.Handle, error) {
	h, err := netlink.NewHandleAt(netns.NsHandle(n.Fd()), unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("opening rtnetlink in %s: %w", n.Path(), err)
	}
	return h, nil
}

func nlFamily(f family) int {
	if f == 6 {
		return unix.AF_INET6
	}
	return unix.AF_INET
}

func defaultDst(f family) *net.IPNet {
	if f == 6 {
		return &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
	}
	return &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
}

func wantRule(s Spec, f family) *netlink.Rule {
	r := netlink.NewRule()
	r.Family = nlFamily(f)
	r.Mark = s.ConnMark
	mask := s.MarkMask
	r.Mask = &mask
	r.Table = s.RouteTable
	r.Priority = s.RulePriority
	r.Protocol = routeProtocol
	return r
}

func wantRoute(s Spec, f family, lo int) *netlink.Route {
	return &netlink.Route{
		LinkIndex: lo,
		Dst:       defaultDst(f),
		Table:     s.RouteTable,
		Type:      unix.RTN_LOCAL,
		Scope:     netlink.SCOPE_HOST,
		Protocol:  routeProtocol,
		Family:    nlFamily(f),
	}
}

// effective narrows spec's families to those the netns can route: IPv6
// rules and routes need IPv6 on lo (it is absent when IPv6 is disabled in
// the pod, or in the kernel). The nftables/iptables rules for such a
// family stay (they never match), so one pod's sysctl cannot fail its
// enrollment.
func effective(h *netlink.Handle, lo netlink.Link, s Spec) Spec {
	if s.IPv6 {
		addrs, err := h.AddrList(lo, netlink.FAMILY_V6)
		if err != nil || len(addrs) == 0 {
			s.IPv6 = false
		}
	}
	return s
}

func ruleMatches(got netlink.Rule, want *netlink.Rule) bool {
	return got.Mark == want.Mark && got.Mask != nil && *got.Mask == *want.Mask &&
		got.Table == want.Table && got.Priority == want.Priority && !got.Invert && got.Src == nil && got.Dst == nil
}

// routesInstall adds the policy rule and the local default route for
// each family, idempotently, and removes ours that spec no longer wants
// (another table or priority from an older spec).
func routesInstall(n ns.NetNS, s Spec) error {
	h, err := nlHandle(n)
	if err != nil {
		return err
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("finding lo: %w", err)
	}
	// The local route needs lo up; every runtime brings it up anyway.
	if lo.Attrs().Flags&net.FlagUp == 0 {
		if err := h.LinkSetUp(lo); err != nil {
			return fmt.Errorf("bringing lo up: %w", err)
		}
	}
	s = effective(h, lo, s)
	for _, f := range []family{4, 6} {
		enabled := (f == 4 && s.IPv4) || (f == 6 && s.IPv6)
		rules, err := h.RuleList(nlFamily(f))
		if err != nil {
			if f == 6 && !enabled && errors.Is(err, unix.EAFNOSUPPORT) {
				continue // kernel without IPv6
			}
			return fmt.Errorf("listing IPv%d rules: %w", f, err)
		}
		want := wantRule(s, f)
		have := false
		for _, r := range rules {
			if r.Protocol != routeProtocol {
				continue
			}
			if enabled && !have && ruleMatches(r, want) {
				have = true
				continue
			}
			r := r
			if err := h.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) {
				return fmt.Errorf("removing stale IPv%d rule %s: %w", f, r, err)
			}
		}
		if enabled && !have {
			if err := h.RuleAdd(want); err != nil && !errors.Is(err, unix.EEXIST) {
				return fmt.Errorf("adding ip -%d rule fwmark %#x/%#x lookup %d: %w", f, s.ConnMark, s.MarkMask, s.RouteTable, err)
			}
		}
		if err := removeOurRoutes(h, f, func(r netlink.Route) bool { return enabled && r.Table == s.RouteTable }); err != nil {
			return err
		}
		if enabled {
			if err := h.RouteReplace(wantRoute(s, f, lo.Attrs().Index)); err != nil {
				return fmt.Errorf("adding local default IPv%d route to table %d: %w (is IPv6 disabled in the pod?)", f, s.RouteTable, err)
			}
		}
	}
	return nil
}

// removeOurRoutes deletes our routes in any table, except those keep
// accepts.
func removeOurRoutes(h *netlink.Handle, f family, keep func(netlink.Route) bool) error {
	routes, err := h.RouteListFiltered(nlFamily(f), &netlink.Route{Table: unix.RT_TABLE_UNSPEC, Protocol: routeProtocol}, netlink.RT_FILTER_TABLE|netlink.RT_FILTER_PROTOCOL)
	if err != nil {
		return fmt.Errorf("listing IPv%d routes: %w", f, err)
	}
	for _, r := range routes {
		if keep(r) {
			continue
		}
		r := r
		if err := h.RouteDel(&r); err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("removing IPv%d route %s: %w", f, r, err)
		}
	}
	return nil
}

func routesUninstall(n ns.NetNS) error {
	h, err := nlHandle(n)
	if err != nil {
		return err
	}
	defer h.Close()
	for _, f := range []family{4, 6} {
		rules, err := h.RuleList(nlFamily(f))
		if err != nil {
			if f == 6 && errors.Is(err, unix.EAFNOSUPPORT) {
				continue
			}
			return fmt.Errorf("listing IPv%d rules: %w", f, err)
		}
		for _, r := range rules {
			if r.Protocol != routeProtocol {
				continue
			}
			r := r
			if err := h.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) {
				return fmt.Errorf("removing IPv%d rule %s: %w", f, r, err)
			}
		}
		if err := removeOurRoutes(h, f, func(netlink.Route) bool { return false }); err != nil {
			return err
		}
	}
	return nil
}

func routesVerify(n ns.NetNS, s Spec) []string {
	h, err := nlHandle(n)
	if err != nil {
		return []string{err.Error()}
	}
	defer h.Close()
	var problems []string
	if lo, err := h.LinkByName("lo"); err == nil {
		s = effective(h, lo, s)
	}
	for _, f := range []family{4, 6} {
		enabled := (f == 4 && s.IPv4) || (f == 6 && s.IPv6)
		rules, err := h.RuleList(nlFamily(f))
		if err != nil {
			if f == 6 && !enabled && errors.Is(err, unix.EAFNOSUPPORT) {
				continue
			}
			problems = append(problems, fmt.Sprintf("listing IPv%d rules: %v", f, err))
			continue
		}
		n := 0
		for _, r := range rules {
			if r.Protocol == routeProtocol {
				n++
				if !enabled || !ruleMatches(r, wantRule(s, f)) {
					problems = append(problems, fmt.Sprintf("unexpected IPv%d rule %s", f, strings.TrimSpace(r.String())))
				}
			}
		}
		if enabled && n == 0 {
			problems = append(problems, fmt.Sprintf("IPv%d rule fwmark %#x/%#x lookup %d pref %d missing", f, s.ConnMark, s.MarkMask, s.RouteTable, s.RulePriority))
		}
		routes, err := h.RouteListFiltered(nlFamily(f), &netlink.Route{Table: unix.RT_TABLE_UNSPEC, Protocol: routeProtocol}, netlink.RT_FILTER_TABLE|netlink.RT_FILTER_PROTOCOL)
		if err != nil {
			problems = append(problems, fmt.Sprintf("listing IPv%d routes: %v", f, err))
			continue
		}
		found := false
		for _, r := range routes {
			ok := enabled && r.Table == s.RouteTable && r.Type == unix.RTN_LOCAL
			if ok && r.Dst != nil { // older netlink reports the default as nil
				ones, _ := r.Dst.Mask.Size()
				ok = ones == 0
			}
			if ok && !found {
				found = true
				continue
			}
			problems = append(problems, fmt.Sprintf("unexpected IPv%d route %s", f, r))
		}
		if enabled && !found {
			problems = append(problems, fmt.Sprintf("IPv%d route local default dev lo table %d missing", f, s.RouteTable))
		}
	}
	return problems
}
