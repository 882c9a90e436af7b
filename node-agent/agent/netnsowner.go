package agent

import (
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"syscall"

	"github.com/ambit-mesh/ambit/node-agent/cluster"
	"github.com/ambit-mesh/ambit/node-agent/state"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

// A pod must never be served in another pod's network namespace: its
// listeners would take that pod's traffic, its SPIFFE identity would be
// presented for it, and its host probe entry would take the other's
// over. The ADD and CHECK bring the runtime's own netns fd, which is the
// pod's. Live enrollment and re-adoption find a namespace by the pod's
// IPs, which may be stale (an API status still naming a previous
// sandbox's IP, given since to another pod on the node); so a namespace
// found that way is refused, the pod left unserved with the reason in
// its status, when
//   - another pod is served in it (claimNetns, under a.mu, so two passes
//     cannot both take it), or recorded there by a record whose netns
//     path still opens it (netnsTaken);
//   - its processes run in the kubelet cgroup of another pod UID
//     (netnsfind.ErrOtherPod).
// The next pass tries again: the view is fresh by then.

// netnsClaim is one pod served in a namespace, from serve until the
// release of its listeners.
type netnsClaim struct {
	ino                           uint64
	namespace, name, uid, sandbox string
}

func (c *netnsClaim) who() string {
	return fmt.Sprintf("pod %s/%s (UID %s, sandbox %s)", c.namespace, c.name, orDash(c.uid), c.sandbox)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// podKey names the pod a namespace is looked for.
type podKey struct{ namespace, name, uid string }

// other tells whether a pod of namespace/name/uid is another pod than k:
// another name, or the same name with another UID (a pod deleted and
// made again, a StatefulSet's). An unknown UID on either side leaves the
// name to decide.
func (k podKey) other(namespace, name, uid string) bool {
	if namespace != k.namespace || name != k.name {
		return true
	}
	return k.uid != "" && uid != "" && k.uid != uid
}

// claimNetns records p as served in its namespace; with check (the
// namespace was found by the pod's IPs, not handed over by the runtime)
// it first refuses one another pod is served in. It returns the claims
// of other pods in the namespace it took anyway (an ADD's: the runtime's
// word beats a scan's), and of the pod's own sandbox found there by the
// scan (an ADD's or CHECK's, which names the sandbox and takes over).
func (a *Agent) claimNetns(p *pod, f *os.File, check bool) ([]*netnsClaim, error) {
	ino := p.rec.NetnsInode
	if ino == 0 {
		var st syscall.Stat_t
		if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
			return nil, &failure{"netns", err}
		}
		ino = st.Ino
	}
	if ino == a.ownNetnsIno {
		// Whatever led here (a runtime's CNI_NETNS_OVERRIDE, a view
		// wrong about hostNetwork, a recycled /proc path), capture
		// rules in the node's namespace would take the node's own TCP.
		return nil, &failure{"netns", fmt.Errorf("network namespace %s (inode %d) is the agent's own network namespace, the node's: a hostNetwork pod is never enrolled", p.rec.Netns, ino)}
	}
	k := podKey{p.rec.Namespace, p.rec.Name, p.rec.UID}
	a.mu.Lock()
	defer a.mu.Unlock()
	var others, found []*netnsClaim
	for _, c := range a.claims[ino] {
		switch {
		case k.other(c.namespace, c.name, c.uid):
			others = append(others, c)
		case strings.HasPrefix(c.sandbox, foundPrefix) && c.sandbox != p.rec.ContainerID:
			// The pod itself, found there by the scan before its ADD
			// (or CHECK) named the sandbox: one serving of the pod
			// is enough, and the found one would outlive the DEL
			// (matched by container ID, GC skipping found:),
			// holding the namespace, its listeners and claim.
			found = append(found, c)
		}
	}
	if check && len(others) > 0 {
		return nil, &failure{reasonNetnsOwner, fmt.Errorf("network namespace %s (inode %d) holding %v is %s's, served here; not taken for pod %s/%s: the IPs it was looked for by are stale (a previous sandbox's, given since to that pod)",
			p.rec.Netns, ino, p.rec.IPs, others[0].who(), k.namespace, k.name)}
	}
	c := &netnsClaim{ino: ino, namespace: k.namespace, name: k.name, uid: k.uid, sandbox: p.rec.ContainerID}
	if a.claims == nil {
		a.claims = map[uint64][]*netnsClaim{}
	}
	a.claims[ino] = append(a.claims[ino], c)
	p.claim = c
	if check {
		return nil, nil
	}
	return append(others, found...), nil
}

// unclaimNetns drops p's claim (its listeners are released). p.claim is
// read and written under a.mu: evictFromNetns reads it, and a release at
// shutdown runs without the pod's lock.
func (a *Agent) unclaimNetns(p *pod) {
	a.mu.Lock()
	defer a.mu.Unlock()
	c := p.claim
	if c == nil {
		return
	}
	p.claim = nil
	a.claims[c.ino] = slices.DeleteFunc(a.claims[c.ino], func(x *netnsClaim) bool { return x == c })
	if len(a.claims[c.ino]) == 0 {
		delete(a.claims, c.ino)
	}
}

// netnsTaken refuses namespace ino, found by pod k's IPs, when another
// pod is served in it (so far as the pods this agent knows say; serve
// checks again under a.mu) or recorded there: a record of this agent's
// or of another agent of the node (a surge upgrade), not adopted yet or
// not served. A record counts only while its netns path still opens ino:
// a bind mount keeps its namespace, inode and all, alive, while the
// inode of a namespace gone since may have been given to a new one.
func (a *Agent) netnsTaken(ino uint64, k podKey, ips []netip.Addr) error {
	a.mu.Lock()
	for _, c := range a.claims[ino] {
		if k.other(c.namespace, c.name, c.uid) {
			a.mu.Unlock()
			return &failure{reasonNetnsOwner, fmt.Errorf("the network namespace (inode %d) holding %v is %s's, served here; not taken for pod %s/%s: the IPs it was looked for by are stale (a previous sandbox's, given since to that pod)",
				ino, ips, c.who(), k.namespace, k.name)}
		}
	}
	var recs []state.Pod
	for _, p := range a.byCID {
		recs = append(recs, p.rec)
	}
	a.mu.Unlock()
	stored, _ := a.store.List()
	return recordedIn(append(recs, stored...), ino, k, ips)
}

// recordedIn refuses namespace ino for pod k when one of recs, another
// pod's, names it and its netns path still opens it.
func recordedIn(recs []state.Pod, ino uint64, k podKey, ips []netip.Addr) error {
	for _, r := range recs {
		if r.NetnsInode != ino || r.Netns == "" || !k.other(r.Namespace, r.Name, r.UID) {
			continue
		}
		var st syscall.Stat_t
		if syscall.Stat(r.Netns, &st) != nil || st.Ino != ino {
			continue
		}
		return &failure{reasonNetnsOwner, fmt.Errorf("the network namespace %s (inode %d) holding %v is recorded for pod %s/%s (UID %s, sandbox %s); not taken for pod %s/%s: the IPs it was looked for by are stale (a previous sandbox's, given since to that pod)",
			r.Netns, ino, ips, r.Namespace, r.Name, orDash(r.UID), r.ContainerID, k.namespace, k.name)}
	}
	return nil
}

// evictFromNetns lets go of the pods an ADD found served in the
// namespace the runtime gave it: found there by their IPs, before the
// ADD's pod was enrolled (the /proc scan saw the IP between the IPAM
// plugin's work and our plugin's ADD, with no pod cgroup to tell). They
// are forgotten as by a DEL, under their own locks, in the background:
// the ADD holds its own pod's. Their rules are left, the ADD's pod's
// now; the next pass looks for them again.
//
// A claim of by itself (its sandbox found by the scan, now named by its
// ADD) is let go only once the ADD's sandbox serves the pod: the
// forget then finds that sandbox the pod's latest and keeps what both
// hold (host entries of the same IPs, the learned IPs, the status), and
// an ADD that failed after serve leaves the found one serving as
// before.
func (a *Agent) evictFromNetns(claims []*netnsClaim, by podKey) {
	byName := by.namespace + "/" + by.name
	for _, c := range claims {
		own := !by.other(c.namespace, c.name, c.uid)
		a.closing.Add(1)
		go func() {
			defer a.closing.Done()
			unlock := a.lock(c.namespace, c.name)
			defer unlock()
			a.mu.Lock()
			q := a.byCID[c.sandbox]
			ours := q != nil && q.claim == c
			// heir (the ADD's pod) is read only for a claim of that pod
			// itself (own): then the lock held here, c's, is heir's, which
			// guards its serving and record. For another pod's claim the
			// read raced with heir's unenrollment, which clears heir's
			// serving under heir's lock alone (found by go test -race);
			// heir's lock cannot be taken here, as no pod's lock is taken
			// while another's is held.
			var heir *pod
			taken := false
			if own {
				heir = a.byName[byName]
				taken = heir != nil && heir != q && heir.enrolled() && heir.rec.NetnsInode == c.ino
			}
			a.mu.Unlock()
			if !ours || (own && !taken) {
				return // released meanwhile, or the ADD did not take over
			}
			req := &cniproto.Request{Op: cniproto.OpDel, Pod: cniproto.Pod{Namespace: c.namespace, Name: c.name, UID: c.uid, ContainerID: c.sandbox}}
			if own {
				a.log.Info("the pod's sandbox found by live enrollment is the one its ADD named; served by the ADD's from now on", "pod", byName, "sandbox", heir.rec.ContainerID, "netnsInode", c.ino)
				a.forgetLocked(req, true)
				return
			}
			msg := fmt.Sprintf("served in the network namespace (inode %d) the runtime gave pod %s at its ADD: found there by IPs that were stale; released", c.ino, byName)
			a.log.Warn("a pod was served in another pod's network namespace; releasing it", "pod", c.namespace+"/"+c.name, "sandbox", c.sandbox, "netnsInode", c.ino, "addOf", byName)
			a.forgetLocked(req, true)
			a.m.failures.WithLabelValues(reasonNetnsOwner).Inc()
			if c.namespace+"/"+c.name == byName {
				// A previous pod of the ADD's name (another UID):
				// gone from the API, and the name's status is the
				// ADD's pod's now. Set, "failed" for the old UID would
				// replace the "enabled" the ADD asked for (one wanted
				// state per name), and its write, refused for the
				// UID, would drop both: the new pod never annotated.
				return
			}
			a.setStatus(cluster.Pod{Namespace: c.namespace, Name: c.name, UID: c.uid}, "failed", eventNetnsOwner, msg)
		}()
	}
}
