package redirect

import (
	"fmt"
	"net/netip"
)

// The rule set is described once, in a backend-neutral form, and rendered
// by each backend. That keeps nftables and iptables behaviourally identical:
// a rule cannot be added to one and forgotten in the other.

// family is an IP family: 4 or 6.
type family int

func (f family) loopback() netip.Prefix {
	if f == 4 {
		return netip.MustParsePrefix("127.0.0.0/8")
	}
	return netip.MustParsePrefix("::1/128")
}

func (f family) probe(s Spec) netip.Prefix {
	if f == 4 {
		return netip.PrefixFrom(s.ProbeSNATv4, 32)
	}
	return netip.PrefixFrom(s.ProbeSNATv6, 128)
}

func families(s Spec) []family {
	var fs []family
	if s.IPv4 {
		fs = append(fs, 4)
	}
	if s.IPv6 {
		fs = append(fs, 6)
	}
	return fs
}

// hook names the place a rule runs: table (mangle or nat) and direction.
type hook int

const (
	mangleIn  hook = iota // mangle PREROUTING
	mangleOut             // mangle OUTPUT (route type: a mark change reroutes)
	natIn                 // nat PREROUTING
	natOut                // nat OUTPUT
	filterOut             // filter OUTPUT (IPv6 only: the link-local refusal)
)

var hooks = []hook{mangleIn, mangleOut, natIn, natOut, filterOut}

// hooksOf returns the hooks spec's rules use: filterOut only with IPv6,
// so an IPv4-only pod's rules stay as they were before it existed.
func hooksOf(s Spec) []hook {
	if s.IPv6 {
		return hooks
	}
	return hooks[:len(hooks)-1]
}

// linkLocal6 is IPv6's link-local unicast range.
var linkLocal6 = netip.MustParsePrefix("fe80::/10")

type condKind int

const (
	condTCP    condKind = iota // protocol is TCP
	condSaddr                  // source address in prefix
	condDaddr                  // destination address in prefix
	condDport                  // TCP destination port
	condMark                   // packet mark & mask == value
	condCtMark                 // conntrack mark & mask == value
	condOifLo                  // output interface is lo
	condCtNew                  // conntrack state NEW (a connection's first packet)
)

type cond struct {
	kind   condKind
	neg    bool
	prefix netip.Prefix
	port   uint16
	value  uint32
	mask   uint32
}

type actionKind int

const (
	actAccept      actionKind = iota
	actRedirect               // REDIRECT to port
	actSetCtMark              // ct mark = (ct mark &^ mask) | value
	actRestoreMark            // meta mark = ct mark
	actReject                 // refuse with a TCP reset
)

type action struct {
	kind  actionKind
	port  uint16
	value uint32
	mask  uint32
}

type rule struct {
	fam   family
	hook  hook
	conds []cond
	act   action
}

// ruleSet returns the rules of spec, per family, in evaluation order
// within each hook. spec must be valid.
func ruleSet(s Spec) []rule {
	var rs []rule
	mark := cond{kind: condMark, value: s.Mark, mask: s.MarkMask}
	notMark := mark
	notMark.neg = true
	tcp := cond{kind: condTCP}
	for _, f := range families(s) {
		notLoop := cond{kind: condDaddr, neg: true, prefix: f.loopback()}
		rs = append(rs,
			// The agent dialed the app with a spoofed (client) source:
			// remember that on the connection...
			rule{f, mangleIn, []cond{mark}, action{kind: actSetCtMark, value: s.ConnMark, mask: s.MarkMask}},
			// ...so the app's replies carry the mark again and the
			// policy route sends them back to the agent's socket.
			rule{f, mangleOut, []cond{{kind: condCtMark, value: s.ConnMark, mask: s.MarkMask}}, action{kind: actRestoreMark}},
			// SNATed kubelet probes go straight to the app.
			rule{f, natIn, []cond{tcp, {kind: condSaddr, prefix: f.probe(s)}}, action{kind: actAccept}},
		)
		if !s.BypassInbound {
			rs = append(rs, rule{f, natIn, []cond{tcp, notLoop, {kind: condDport, neg: true, port: s.HBONEPort}, notMark},
				action{kind: actRedirect, port: s.InboundPort}})
		}
		rs = append(rs,
			rule{f, natOut, []cond{tcp, {kind: condDaddr, prefix: f.probe(s)}}, action{kind: actAccept}},
			// Replies on connections the agent opened to the app.
			rule{f, natOut, []cond{tcp, {kind: condMark, value: s.ConnMark, mask: s.MarkMask}}, action{kind: actAccept}},
			// Traffic to the pod's own addresses leaves through lo and is
			// not captured at all: its connection is tracked (and NATed)
			// here, so nat prerouting never sees it on lo either. A
			// self-call reaches the app directly, as in Istio; it never
			// leaves the pod (TestCaptureMatrix).
			rule{f, natOut, []cond{{kind: condOifLo}, notLoop}, action{kind: actAccept}},
		)
		if f == 6 {
			// Another pod's link-local address (pods on one bridge all
			// have one). A socket connected to a scoped fe80:: address is
			// bound to its interface, so the REDIRECT to ::1 finds no
			// route: the SYN was dropped and the app's connect timed out.
			// Nor could the agent tell whether the peer is meshed. So it
			// is not redirected but refused below, at once. The filter
			// rule is installed before this one (iptables-restore
			// commits table by table: filter first), so plaintext never
			// leaves in between.
			rs = append(rs, rule{f, natOut, []cond{tcp, {kind: condDaddr, prefix: linkLocal6}}, action{kind: actAccept}})
		}
		rs = append(rs, rule{f, natOut, []cond{tcp, notLoop, notMark}, action{kind: actRedirect, port: s.OutboundPort}})
		if f == 6 {
			// New connections only: the replies of connections to the
			// pod's own link-local address (refused by the agent's
			// inbound, ip_mismatch) must still leave; and not through
			// lo: the pod's own link-local address is its inbound's.
			rs = append(rs, rule{f, filterOut, []cond{tcp, {kind: condDaddr, prefix: linkLocal6}, {kind: condOifLo, neg: true}, {kind: condCtNew}},
				action{kind: actReject}})
		}
	}
	return rs
}

// Render returns the rules backend would install for spec, as text: nft
// syntax for nftables, iptables-restore payloads for the iptables backends,
// followed by the policy routing. It needs no privileges; golden files and
// operators use it to see exactly what is installed.
func Render(backend Backend, spec Spec) (string, error) {
	if err := spec.Validate(); err != nil {
		return "", err
	}
	var out string
	switch backend {
	case Nftables:
		out = renderNft(spec)
	case IptablesLegacy, IptablesNft:
		for _, f := range families(spec) {
			out += fmt.Sprintf("# %s\n", restoreCommand(backend, f))
			out += iptablesPayload(spec, f, nil)
		}
	default:
		return "", fmt.Errorf("redirect: cannot render backend %q (want nftables, iptables-legacy or iptables-nft)", backend)
	}
	return out + renderRoutes(spec), nil
}

func renderRoutes(s Spec) string {
	var out string
	for _, f := range families(s) {
		flag, dst := "-4", "0.0.0.0/0"
		if f == 6 {
			flag, dst = "-6", "::/0"
		}
		out += fmt.Sprintf("ip %s rule add fwmark %#x/%#x lookup %d pref %d proto %d\n", flag, s.ConnMark, s.MarkMask, s.RouteTable, s.RulePriority, routeProtocol)
		out += fmt.Sprintf("ip %s route replace local %s dev lo table %d proto %d\n", flag, dst, s.RouteTable, routeProtocol)
	}
	return out
}
