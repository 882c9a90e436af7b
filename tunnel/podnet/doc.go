// Package podnet opens sockets inside a pod's network namespace.
//
// The node agent runs in the host network but serves every enrolled pod
// from inside that pod's namespace: its listeners (15001, 15006, 15008)
// and the connections it opens (to the app, to other pods, passthrough)
// must be sockets of the pod's netns, so traffic keeps the pod's own IPs
// and the pod's primary CNI and NetworkPolicy still apply.
//
// A socket belongs to the netns of the thread that created it, for its
// whole life. So only socket() runs on a thread switched into the pod
// (runtime.LockOSThread, setns, socket, setns back): everything after it,
// binding, listening and especially connecting, runs on any thread and
// waits in Go's poller, so a thousand concurrent dials never pin a
// thousand OS threads. The sockets are made by net's own Dialer and
// ListenConfig, whose Control hook (called right after socket()) switches
// the thread back, so a connection is a *net.TCPConn from the start: no
// os.NewFile/net.FileConn round (dup, fcntl, address lookups again, a
// second poller registration), which cost a dozen system calls per
// connection. If switching back fails the thread is left locked and its
// goroutine exits, so the Go runtime throws the tainted thread away
// instead of reusing it in the wrong namespace.
//
// Keepalive: Dial and listeners keep Go's default TCP keepalive for remote
// peers; DialLocal and ListenOptions.KeepAlive < 0 turn it off for peers
// inside the pod (the app), where probes find nothing and cost four
// setsockopt calls per connection.
//
// Listeners are the agent's alone. They are plain TCP (Go's default
// MPTCP listener falls back to a second socket() on failure, which here
// would be made outside the pod), owned by ListenerUID (the thread's
// fsuid at socket()), so that the kernel lets only the next agent join
// their SO_REUSEPORT group, never an application of the pod; and a port
// a socket of the pod already listens on, without the agent's mark, is a
// *PortInUseError (sock_diag names the socket), never a shared group.
//
// Every socket carries the agent's SO_MARK (default 0x539), which the
// in-pod redirection skips, so the agent's own traffic is never captured
// again.
package podnet
