// Package kubesource feeds the policy Engine from the API server: it
// watches ambit.dev/v1alpha1 AuthorizationPolicy and InboundMode (and,
// when the CRDs are served and the option is on, Istio's
// security.istio.io/v1 AuthorizationPolicy and PeerAuthentication) with
// dynamic informers, hands
// the complete set to the Engine on every change, and writes each ambit
// object's Accepted condition through the status subresource.
//
// Every node agent computes the same verdicts, so status writes are
// idempotent: an agent writes only when the condition differs from what
// is stored, and a write conflict just means another agent was first.
// Istio objects get no status write (istiod owns their status); their
// verdicts are logged.
package kubesource
