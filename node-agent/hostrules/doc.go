// Package hostrules keeps the host-side rule that lets kubelet probes reach
// enrolled pods: locally originated TCP from the host network namespace to
// an enrolled pod IP is SNATed to the probe source (169.254.7.127, IPv6
// fd16:9254:7127:1337:ffff:ffff:ffff:ffff), which the in-pod redirection
// lets through to the app uncaptured. Forwarded traffic (another node, a
// load balancer, a pod) is never touched, even when it carries the node's
// IP: only packets that belong to a local socket match.
//
// Two backends produce the same behaviour:
//
//   - nftables (default), over netlink, no exec: one table
//     "inet ambit-host" with sets probes-v4/probes-v6 (each element's
//     comment is the owning pod UID) and a nat postrouting chain:
//
//     meta nfproto ipv4 meta l4proto tcp ip daddr @probes-v4
//     meta skuid >= 0 counter snat ip to 169.254.7.127
//
//     "meta skuid" only evaluates for packets owned by a full local socket
//     (the rule stops otherwise), so "meta skuid >= 0" is nftables'
//     equivalent of iptables' "-m owner --socket-exists"; Config.KubeletUID
//     narrows it to one user, as Istio's nft mode does.
//
//   - iptables (fallback, legacy or nft variant detected like kube-proxy):
//     ipsets ambit-probes-v4/-v6 (hash:ip with the pod UID as comment) and
//     a chain AMBIT-POSTRT jumped to first from nat POSTROUTING:
//     -p tcp -m set --match-set ambit-probes-v4 dst -m owner --socket-exists
//     -j SNAT --to-source 169.254.7.127
//
//     The sets change over netlink; the chain through the iptables
//     binaries, whose legacy variant waits for the host's xtables lock
//     (up to 5 s a run, --wait), or by the context of AddContext (a
//     plugin request's deadline).
//
// Entries are keyed by pod UID so IP reuse is safe: Add is an upsert (the
// newest pod owns the IP), Remove deletes an IP only while the given UID
// still owns it. Run re-asserts everything every Config.Interval: a flushed
// ruleset, chain or set comes back and ambit_host_rules_repairs_total
// counts it. Uninstall removes all of it.
//
// Usage from the agent (host network namespace):
//
//	hr, err := hostrules.New(hostrules.Config{Registerer: prometheus.DefaultRegisterer})
//	if err != nil { ... }
//	go hr.Run(ctx)                               // reconcile loop
//	hr.Sync(map[string][]netip.Addr{uid: ips})  // after adopting the snapshot
//	hr.AddContext(ctx, pod.UID, pod.IPs)         // on enroll (ADD: its deadline)
//	hr.Remove(pod.UID, pod.IPs)                  // on unenroll / delete
//	hr.Uninstall()                               // on `ambit-agent uninstall`
package hostrules
