// Package cniproto is the wire contract between ambit-cni and the node
// agent: one request and one response per connection over a unix
// SOCK_SEQPACKET socket, each a single length-bounded JSON datagram, with
// the pod's network namespace passed as a file descriptor (SCM_RIGHTS)
// alongside add and check requests. Both ends import this package and
// nothing else of each other.
//
// Ops: add (enroll or skip; enrolling installs the redirection in the
// netns), check (same answer, nothing changes; the rules are verified),
// del (forget the pod, remove the rules), gc (the runtime's still-valid
// attachments: since version 3 of one named network, Request.Network). Since version 2 the agent does all the netns work on the
// fd it receives, so ambit-cni links no rule code and starts fast;
// version 1 plugins (installing the rules themselves) are still served.
//
// Sizes: responses and add/del/check requests are at most MaxMessageSize
// (64 KiB); a gc request, which lists every attachment on the node, may
// reach MaxRequestSize (1 MiB, MaxAttachments entries). The agent peeks
// at each datagram's length and allocates only that; Call raises the
// socket's send buffer for a large gc, since a unix datagram must fit it
// whole.
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
