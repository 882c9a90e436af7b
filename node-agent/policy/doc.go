// Package policy is Ambit's L4 authorization: the ambit.dev/v1alpha1 API
// (AuthorizationPolicy, InboundMode), its validation, and the Engine that
// the tunnel consults at every inbound connection (it implements
// tunnel.Authorizer).
//
// Semantics are those Istio users know: for the destination workload, any
// matching DENY rule denies; if no ALLOW policy selects the workload the
// connection is allowed; otherwise some ALLOW rule must match. Policies in
// the root namespace (default "ambit-system") apply mesh-wide; Istio's
// objects, read for migrating users, are mesh-wide in Istio's root
// namespace ("istio-system") only, and in ours are that namespace's own,
// as Istio reads them. InboundMode
// decides whether plaintext (port 15006) is accepted at all: PERMISSIVE
// (the default) or STRICT.
//
// Policies come from sources (package filesource for a directory of YAML
// files, package kubesource for the CRDs) which hand the Engine complete
// sets with Update; the Engine compiles them into an immutable snapshot,
// swaps it atomically and calls the OnChange hooks, so the agent can
// re-authorize live connections. Authorize itself takes no lock on the
// common path and allocates nothing: policies are indexed by namespace and
// by selector label, rules by exact principal, namespace and port.
//
// Wiring in the agent:
//
//	eng := policy.New(policy.Options{RootNamespace: root, Registerer: reg, Logger: log})
//	proxy, _ := tunnel.New(tunnel.Config{..., Authorizer: eng})
//	eng.OnChange(proxy.Reauthorize) // live connections re-checked on change
//	// Kubernetes:
//	src, _ := kubesource.New(kubesource.Options{Client: dyn, Discovery: disc,
//		Engine: eng, WriteStatus: true, Istio: readIstio})
//	go src.Run(ctx)
//	src.WaitSynced(ctx) // before reporting ready
//	// Static inventory: a directory next to the inventory file.
//	fs := filesource.New(dir, eng, log)
//	fs.Load()     // before reporting ready
//	go fs.Run(ctx)
//
// A policy that cannot be read never widens access: an invalid ambit
// policy is enforced as deny-all for the workloads it selects (namespace
// wide when the selector itself is bad) and reported with Accepted=False.
package policy
