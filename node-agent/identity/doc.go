// Package identity is the node agent's certificate manager: one workload
// certificate per SPIFFE identity of the pods on the node, keys (ECDSA
// P-256) generated in memory and never written to disk, fetched ahead when
// a pod is enrolled, rotated at half life with jitter, retried with
// exponential backoff, and kept while still valid when the CA is down. It
// also keeps the trust bundle current (from every CA answer and a periodic
// GET /v1/roots); during a root rotation the bundle holds old and new roots
// side by side and Roots returns both.
//
// *Manager implements tunnel.Certificates. It talks to a CA through the
// Signer interface: RemoteSigner (the CA service over HTTPS, Kubernetes
// mode) or LocalSigner (an in-process CA in the state directory, static
// mode).
//
// Usage in the agent:
//
//	mgr, err := identity.NewManager(identity.Config{
//		TrustDomain: "cluster.local",
//		Remote: &identity.RemoteConfig{
//			URL:       "https://ambit-ca.ambit-system.svc:15012",
//			TokenFile: "/var/run/secrets/tokens/ambit-ca", // projected, audience ambit-ca
//			RootsFile: "/var/run/ambit/ca-root/root-cert.pem", // ConfigMap ambit-ca-root
//		},
//		// or, without Kubernetes: LocalCADir: "/var/lib/ambit/ca",
//	})
//	go mgr.Run(ctx)                      // rotation and trust bundle refresh
//	id, _ := mgr.IdentityFor(pod.Namespace, pod.ServiceAccount)
//	mgr.Prefetch(id)                     // when the pod is enrolled
//	defer mgr.Forget(id)                 // when it leaves the node
//	proxy, _ := tunnel.New(tunnel.Config{Certificates: mgr, ...})
package identity
