// Package agent is the node agent's orchestration: it serves the plugin
// socket, decides enrollment, opens each enrolled pod's listeners inside
// its network namespace and hands them to the tunnel, follows label changes
// of running pods (live enrollment), persists what it did and re-adopts
// every enrolled pod after a restart, and hands over to a newer agent
// without refusing connections.
//
// Lifecycle of an enrolled pod:
//
//	ADD (plugin) ──► decide ──► prefetch certificate ──► podnet.Open(fd)
//	   ──► listen 15001/15006/15008 (SO_REUSEPORT, marked, transparent)
//	   ──► tunnel.Serve ──► persist record ──► reply Enroll + redirect.Spec
//	   (the plugin then installs the rules; the app starts already captured)
//	label removed ──► redirect.Uninstall (new connections go straight to the
//	   app) ──► Serving.Close drains established ones up to drainTimeout
//	DEL ──► Serving.Abort (every connection reset before the answer: the
//	   pod's interface goes right after it) ──► forget
//	agent restart ──► records ──► netns by path, verified by inode and pod IP
//	   (else /proc scan) ──► listeners again ──► redirect.Verify, repair
//	   ──► ready
//
// Listeners are opened before rules are installed and rules are removed
// before listeners are closed, so a running pod never sees a window where
// its traffic is redirected to nothing (refused) or leaves in plaintext
// while it should be captured. While the agent is away entirely, the rules
// stay and the ports have no listener: connections are refused, never
// sent in plaintext.
//
// Hand-over: every listener uses SO_REUSEPORT and every enrolled pod gets
// net.ipv4.tcp_migrate_req=1, so when the old agent closes its listeners
// after the new one bound its own, connections still queued on the old
// listener migrate to the new one instead of being reset.
package agent
