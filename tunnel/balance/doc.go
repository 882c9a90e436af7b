// Package balance chooses a Service endpoint for a new connection the
// way kube-proxy does, so pods keep the behaviour they relied on when
// they become ambient:
//
//   - without session affinity, uniformly at random per connection
//     (kube-proxy's "numgen random" / iptables "statistic random");
//   - with sessionAffinity ClientIP, the endpoint this client IP last
//     used for this Service port, as long as it is still one of the
//     Service's usable endpoints and the client came back within the
//     timeout, counted from its last connection (kube-proxy's per-endpoint
//     "recent" lists, refreshed on every connection). The client is the
//     source IP without its port, and the Service port is shared by all
//     its addresses (clusterIP, externalIPs, ingress IPs), as in
//     kube-proxy.
//
// The affinity table lives in the agent's memory: it is bounded (expired
// entries are reaped as new ones come, and past a cap the least recently
// used entry is dropped, that client then choosing afresh), and it is
// lost when the agent restarts, where kube-proxy's lives in the kernel.
// The choice without affinity never takes the table's lock.
package balance
