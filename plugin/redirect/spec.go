package redirect

import "github.com/ambit-mesh/ambit/plugin/redirectspec"

// Spec is everything needed to build the in-pod redirection
// (redirectspec.Spec, which the protocol names without linking this
// package).
type Spec = redirectspec.Spec

// Well-known values shared by the plugin, the agent and the tunnel.
const (
	DefaultOutboundPort = redirectspec.DefaultOutboundPort
	DefaultInboundPort  = redirectspec.DefaultInboundPort
	DefaultHBONEPort    = redirectspec.DefaultHBONEPort
	DefaultMark         = redirectspec.DefaultMark
	DefaultMarkMask     = redirectspec.DefaultMarkMask
	DefaultConnMark     = redirectspec.DefaultConnMark
	DefaultRouteTable   = redirectspec.DefaultRouteTable
	DefaultRulePriority = redirectspec.DefaultRulePriority
)

// Default probe SNAT sources (redirectspec).
var (
	DefaultProbeSNATv4 = redirectspec.DefaultProbeSNATv4
	DefaultProbeSNATv6 = redirectspec.DefaultProbeSNATv6
)

// DefaultSpec returns the standard dual-stack redirection.
func DefaultSpec() Spec { return redirectspec.Default() }

// Backend names the rule engine (redirectspec.Backend).
type Backend = redirectspec.Backend

// The backends.
const (
	Auto           = redirectspec.Auto
	Nftables       = redirectspec.Nftables
	Iptables       = redirectspec.Iptables
	IptablesLegacy = redirectspec.IptablesLegacy
	IptablesNft    = redirectspec.IptablesNft
)

// ParseBackend accepts the backend names ("" means auto).
func ParseBackend(s string) (Backend, error) { return redirectspec.ParseBackend(s) }
