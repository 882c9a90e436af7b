// Package admin is how an operator asks a node agent what it serves:
// which pods, in what state, with which certificate, with how many
// connections (`ambit-agent status`, the counterpart of istioctl
// ztunnel-config workloads|certificates|connections).
//
// Why a unix socket. Every agent serves one read-only endpoint,
// GET /v1/status, on <stateDir>/admin/<instance>.sock: the directory is
// 0700 and the socket 0600 (root only), and the server also checks the
// peer's credentials (SO_PEERCRED: root or the agent's own user). No TCP
// port is opened: the agent runs in the host network, where even a
// localhost port would be open to every host-network pod of the node.
// The state directory is a host volume the agent's container mounts, so
// the same command works through `kubectl exec` into the agent's container and on
// a machine without Kubernetes. Each agent names its socket after its
// entry in the node's agent registry (node-agent/instance): during a
// surge upgrade the old and the new agent both answer, and the client
// finds the live ones through the registry, not by guessing.
//
// What it may show. Public facts only: pod names, IPs, states and
// errors, rule checks, certificate serials, validity and issuers, trust
// bundle fingerprints, connection counts. Never a private key, a token
// or a payload; the tests look for "PRIVATE KEY", the workload key's
// bytes, the local CA's files and "token" in every answer.
//
// What it costs. Nothing on the data path: the agent reads what it keeps
// anyway (pod records, the tunnel's per-pod counts, the live inbound
// connections, the certificate manager's entries) under their own locks,
// once per request, one request at a time.
//
// The JSON model (model.go) is the stable form: Version changes whenever
// a field is renamed, removed or changes meaning; the client refuses a
// document of another version or with a field it does not know, rather
// than show a picture missing a part. docs/agent.md "Asking an agent"
// documents the fields.
package admin
