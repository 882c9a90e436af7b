// Package redirect builds, installs, verifies and removes the traffic
// redirection that lives inside an enrolled pod's network namespace.
//
// It is shared by the CNI plugin (at pod creation) and the node agent (live
// enrollment, repair after restart), and links nothing else of either.
//
// Inside the pod, for each enabled family:
//
//   - outbound TCP not carrying the agent's socket mark and not to loopback
//     is redirected to Spec.OutboundPort;
//   - inbound TCP to any port but Spec.HBONEPort, not from the probe SNAT
//     source and not carrying the mark, is redirected to Spec.InboundPort;
//   - packets of the agent's marked sockets set connmark Spec.ConnMark; the
//     app's replies get that mark restored and "ip rule fwmark ConnMark
//     lookup RouteTable" + "local default dev lo" in that table route them
//     back to the agent, which dialed the app from the client's own IP.
//
// Two backends produce the same behaviour: native nftables over netlink (one
// inet table, replaced in one transaction) and iptables through restore runs
// (legacy or nft variant, detected on the host). Every backend is atomic,
// idempotent and removes only what it installed.
package redirect
