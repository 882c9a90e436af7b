package lab

import (
	"fmt"
	"net/netip"
)

// Wire is the "physical" network between nodes: a bridge in the host
// namespace with one veth per node, and routes so every node reaches every
// other node's pod subnet through that node (no encapsulation, no SNAT —
// what a flat L3 primary CNI gives).
type Wire struct {
	Bridge string
	CIDR   netip.Prefix
	nodes  []*Node
	addrs  map[*Node]netip.Addr
}

// NewWire creates the host bridge; name must be ≤15 bytes and unique.
func NewWire(name string, cidr netip.Prefix) (*Wire, error) {
	if err := run("ip", "link", "add", name, "type", "bridge"); err != nil {
		return nil, err
	}
	if err := run("ip", "link", "set", name, "up"); err != nil {
		run("ip", "link", "del", name)
		return nil, err
	}
	return &Wire{Bridge: name, CIDR: cidr.Masked(), addrs: map[*Node]netip.Addr{}}, nil
}

// Attach plugs node into the wire with the next free address and routes
// every attached node's pod subnet to its owner.
func (w *Wire) Attach(n *Node) (netip.Addr, error) {
	addr := w.CIDR.Addr()
	for i := 0; i <= len(w.nodes)+10; i++ {
		addr = addr.Next()
	}
	host := fmt.Sprintf("w%s", RandSuffix())
	if err := run("ip", "link", "add", host, "type", "veth", "peer", "name", "uplink", "netns", n.Opts.Name); err != nil {
		return netip.Addr{}, err
	}
	steps := [][]string{
		{"ip", "link", "set", host, "master", w.Bridge},
		{"ip", "link", "set", host, "up"},
	}
	for _, s := range steps {
		if err := run(s...); err != nil {
			return netip.Addr{}, err
		}
	}
	for _, s := range [][]string{
		{"ip", "addr", "add", netip.PrefixFrom(addr, w.CIDR.Bits()).String(), "dev", "uplink"},
		{"ip", "link", "set", "uplink", "up"},
	} {
		if err := n.Exec(s...); err != nil {
			return netip.Addr{}, err
		}
	}
	for _, other := range w.nodes {
		oa := w.addrs[other]
		if err := n.Exec("ip", "route", "add", other.Opts.PodCIDR.Masked().String(), "via", oa.String()); err != nil {
			return netip.Addr{}, err
		}
		if err := other.Exec("ip", "route", "add", n.Opts.PodCIDR.Masked().String(), "via", addr.String()); err != nil {
			return netip.Addr{}, err
		}
	}
	w.nodes = append(w.nodes, n)
	w.addrs[n] = addr
	return addr, nil
}

// Addr is the node's address on the wire.
func (w *Wire) Addr(n *Node) netip.Addr { return w.addrs[n] }

// Close removes the bridge (the veths go with the node namespaces).
func (w *Wire) Close() error { return run("ip", "link", "del", w.Bridge) }
