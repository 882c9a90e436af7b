package redirectspec

import (
	"fmt"
	"net/netip"
)

// Spec is everything needed to build the in-pod redirection. The agent owns
// these values and sends them to the plugin in its enrollment answer, so a
// node is configured in one place and the plugin never guesses.
type Spec struct {
	// OutboundPort receives the pod's outbound TCP (REDIRECT target).
	OutboundPort uint16 `json:"outboundPort"`
	// InboundPort receives plaintext inbound TCP to any port but HBONEPort.
	InboundPort uint16 `json:"inboundPort"`
	// HBONEPort is where the agent terminates HBONE; never redirected.
	HBONEPort uint16 `json:"hbonePort"`
	// Mark is the SO_MARK the agent puts on every socket it opens in the
	// pod; traffic carrying it is never captured. Only bits in MarkMask
	// are compared, so other users of the mark keep theirs.
	Mark     uint32 `json:"mark"`
	MarkMask uint32 `json:"markMask"`
	// ConnMark tags connections the agent opened towards the app with a
	// spoofed (client) source, so the app's replies can be routed back to
	// the agent by RouteTable.
	ConnMark uint32 `json:"connMark"`
	// RouteTable holds "local 0.0.0.0/0 dev lo" (and ::/0); RulePriority
	// is the preference of the "fwmark ConnMark/MarkMask lookup RouteTable"
	// rule.
	RouteTable   int `json:"routeTable"`
	RulePriority int `json:"rulePriority"`
	// ProbeSNATv4/v6 are the sources the host rewrites kubelet probes to;
	// inbound from them is let through to the app unredirected.
	ProbeSNATv4 netip.Addr `json:"probeSNATv4"`
	ProbeSNATv6 netip.Addr `json:"probeSNATv6"`
	// IPv4 and IPv6 select the families rules are built for.
	IPv4 bool `json:"ipv4"`
	IPv6 bool `json:"ipv6"`
	// BypassInbound leaves inbound plaintext uncaptured ("ingress mode").
	BypassInbound bool `json:"bypassInbound,omitempty"`
}

// Well-known values shared by the plugin, the agent and the tunnel.
const (
	DefaultOutboundPort = 15001
	DefaultInboundPort  = 15006
	DefaultHBONEPort    = 15008
	DefaultMark         = 0x539
	DefaultMarkMask     = 0xfff
	DefaultConnMark     = 0x111
	DefaultRouteTable   = 100
	DefaultRulePriority = 32764
)

// Default probe SNAT sources, the same as Istio's so existing
// NetworkPolicies written for Istio ambient keep working.
var (
	DefaultProbeSNATv4 = netip.MustParseAddr("169.254.7.127")
	DefaultProbeSNATv6 = netip.MustParseAddr("fd16:9254:7127:1337:ffff:ffff:ffff:ffff")
)

// Default returns the standard dual-stack redirection.
func Default() Spec {
	return Spec{
		OutboundPort: DefaultOutboundPort,
		InboundPort:  DefaultInboundPort,
		HBONEPort:    DefaultHBONEPort,
		Mark:         DefaultMark,
		MarkMask:     DefaultMarkMask,
		ConnMark:     DefaultConnMark,
		RouteTable:   DefaultRouteTable,
		RulePriority: DefaultRulePriority,
		ProbeSNATv4:  DefaultProbeSNATv4,
		ProbeSNATv6:  DefaultProbeSNATv6,
		IPv4:         true,
		IPv6:         true,
	}
}

// Validate reports the first field that cannot produce a sane rule set,
// naming it so an operator can fix the agent's configuration.
func (s Spec) Validate() error {
	ports := map[string]uint16{"outboundPort": s.OutboundPort, "inboundPort": s.InboundPort, "hbonePort": s.HBONEPort}
	seen := map[uint16]string{}
	for _, name := range []string{"outboundPort", "inboundPort", "hbonePort"} {
		p := ports[name]
		if p == 0 {
			return fmt.Errorf("redirect spec: %s must be 1-65535", name)
		}
		if other, dup := seen[p]; dup {
			return fmt.Errorf("redirect spec: %s and %s are both %d", other, name, p)
		}
		seen[p] = name
	}
	if s.MarkMask == 0 {
		return fmt.Errorf("redirect spec: markMask must not be 0")
	}
	if s.Mark == 0 || s.Mark&^s.MarkMask != 0 {
		return fmt.Errorf("redirect spec: mark %#x must be non-zero and inside markMask %#x", s.Mark, s.MarkMask)
	}
	if s.ConnMark == 0 || s.ConnMark&^s.MarkMask != 0 || s.ConnMark == s.Mark {
		return fmt.Errorf("redirect spec: connMark %#x must be non-zero, inside markMask %#x and differ from mark", s.ConnMark, s.MarkMask)
	}
	if s.RouteTable <= 0 || s.RouteTable == 253 || s.RouteTable == 254 || s.RouteTable == 255 {
		return fmt.Errorf("redirect spec: routeTable %d must be positive and not a reserved table (253-255)", s.RouteTable)
	}
	if s.RulePriority <= 0 || s.RulePriority >= 32766 {
		return fmt.Errorf("redirect spec: rulePriority %d must be between 1 and 32765 (before the main table)", s.RulePriority)
	}
	if !s.IPv4 && !s.IPv6 {
		return fmt.Errorf("redirect spec: at least one of ipv4, ipv6 must be enabled")
	}
	if s.IPv4 && !s.ProbeSNATv4.Is4() {
		return fmt.Errorf("redirect spec: probeSNATv4 %q is not an IPv4 address", s.ProbeSNATv4)
	}
	if s.IPv6 && !(s.ProbeSNATv6.Is6() && !s.ProbeSNATv6.Is4In6()) {
		return fmt.Errorf("redirect spec: probeSNATv6 %q is not an IPv6 address", s.ProbeSNATv6)
	}
	return nil
}

// Backend names a rule engine.
type Backend string

const (
	// Auto picks nftables when the kernel answers nf_tables requests in
	// the pod netns, else iptables (variant detected on the host).
	Auto Backend = "auto"
	// Nftables: native nf_tables over netlink; no exec.
	Nftables Backend = "nftables"
	// Iptables detects the variant the host uses (legacy or nft).
	Iptables       Backend = "iptables"
	IptablesLegacy Backend = "iptables-legacy"
	IptablesNft    Backend = "iptables-nft"
)

// ParseBackend accepts the names above ("" means auto).
func ParseBackend(s string) (Backend, error) {
	switch b := Backend(s); b {
	case "":
		return Auto, nil
	case Auto, Nftables, Iptables, IptablesLegacy, IptablesNft:
		return b, nil
	}
	return "", fmt.Errorf("unknown rule backend %q (want auto, nftables, iptables, iptables-legacy or iptables-nft)", s)
}
