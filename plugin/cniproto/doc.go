// Package cniproto is the wire contract between ambit-cni and the node
// agent: one request and one response per connection over a unix
// SOCK_SEQPACKET socket, each a single length-bounded JSON datagram, with
// the pod's network namespace passed as a file descriptor (SCM_RIGHTS)
// alongside the request. Both ends import this package and nothing else of
// each other.
//
// Every read and write has a deadline, every message is versioned and
// validated, and every failure is an error that says what was wrong.
package cniproto
