// Package cniproto is the wire contract between ambit-cni and the node
// agent: one request and one response per connection over a unix
// SOCK_SEQPACKET socket, each a single length-bounded JSON datagram, with
// the pod's network namespace passed as a file descriptor (SCM_RIGHTS)
// alongside add and check requests. Both ends import this package and
// nothing else of each other.
//
// Ops: add (enroll or skip; the answer carries the redirect.Spec to
// install), check (same answer, nothing changes; the plugin verifies the
// rules), del (forget the pod), gc (the runtime's still-valid attachments).
//
// Every read and write has a deadline, every message is versioned and
// validated, and every failure is an error that says what was wrong.
// ErrAgentUnavailable marks "nobody is listening", which the plugin treats
// differently from an agent that answered badly.
//
// The package also defines the enrollment snapshot (snapshot.go): a small
// node-local file the agent keeps current and the plugin reads only when
// the agent is unreachable, to tell pods that may need the agent (fail
// closed) from pods that can start unenrolled.
package cniproto
