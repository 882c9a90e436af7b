// Package ca is Ambit's certificate authority: it issues the SPIFFE
// workload certificates (spiffe://<td>/ns/X/sa/Y) that carry identity in
// every HBONE connection, and it issues them only to the node agent of a
// node where a workload of that identity runs, so a compromised node
// cannot mint identities of workloads elsewhere.
//
// Two ways to run it:
//
//   - Kubernetes mode, `ambit-agent ca` (Run): the signing key lives in a
//     Secret (default ambit-system/ambit-ca), generated on first start or
//     supplied by the user (an intermediate from cert-manager or any PKI).
//     Replicas racing to create it converge on one key. Agents POST a CSR
//     over HTTPS (TLS 1.3) with their projected service-account token; the
//     CA checks the token with TokenReview (audience "ambit-ca"), learns
//     the caller's node from the pod the token is bound to, and signs
//     ns/X/sa/Y only when a pod of X/Y that is not terminal is scheduled on
//     that node. Refusals are logged and counted by reason; each node has a
//     token bucket. The trust bundle is served on GET /v1/roots and
//     published into a ConfigMap (default ambit-ca-root) that agents mount.
//   - Static mode (no Kubernetes): LoadOrCreateLocal keeps a CA in the
//     agent's state directory (ca.crt, ca.key 0600), created on first
//     start; the agent signs in-process through the same Authority.
//
// The wire protocol is in protocol.go; ParseCSR and
// DecodeCertificateRequest are the only parsers of untrusted input and are
// fuzzed.
//
// Usage (the `ambit-agent ca` subcommand):
//
//	err := ca.Run(ctx, ca.Config{
//		Listen:      ":15012",
//		TrustDomain: "cluster.local",
//		Namespace:   "ambit-system", // Secret ambit-ca, ConfigMap ambit-ca-root
//	})
package ca
