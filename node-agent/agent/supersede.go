package agent

import (
	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

// supersedeFound lets go of the sandbox of p's pod name found by live
// enrollment in another namespace than p's, once p, the sandbox the
// runtime named at ADD (or CHECK), is registered. A pod has one sandbox
// on a node at a time: the kubelet stops the old one before it makes
// the new one, and the runtime's DEL of the old one names a container
// ID the agent never knew, which releases the found sandbox only when it
// shows it is that one (isSandbox: its netns fd or path). Without this a
// DEL that could not show it (the netns gone, another path spelling)
// left the found one served beside the new one, and after the new one's
// DEL too: its listeners, netns (held open by the agent), claim and
// record kept until a restart. A found sandbox of another UID under the
// name is an older pod's, gone as well. The same namespace is
// claimNetns' (evictFromNetns).
//
// Its rules are removed first, as at an unenroll: should anything still
// run in the old namespace, its connections then go to the app rather
// than to listeners about to close. The work is done in the background,
// under the pod's lock, which the ADD holds until it answers.
func (a *Agent) supersedeFound(p *pod) {
	// Read now, under p's lock: a live enrollment may rewrite p's
	// record before the work below takes the lock again.
	namespace, name := p.rec.Namespace, p.rec.Name
	key := namespace + "/" + name
	a.mu.Lock()
	q := a.byCID[foundPrefix+key]
	a.mu.Unlock()
	if q == nil || q == p || q.rec.NetnsInode == p.rec.NetnsInode {
		return
	}
	a.closing.Add(1)
	go func() {
		defer a.closing.Done()
		unlock := a.lock(namespace, name)
		defer unlock()
		a.mu.Lock()
		cur := a.byCID[q.rec.ContainerID]
		heir := a.byName[key]
		a.mu.Unlock()
		if cur != q || heir == nil || heir == q || heir.rec.NetnsInode == q.rec.NetnsInode {
			return // released meanwhile, or the ADD's sandbox is gone again
		}
		if q.enrolled() {
			if err := a.rules.Uninstall(loopCtx, q.netns); err != nil {
				a.log.Warn("removing the redirection of a pod's sandbox found by live enrollment, superseded by the one its ADD named", "pod", key, "err", err)
			}
		}
		a.log.Info("the pod's sandbox found by live enrollment is not the one its ADD named, in another network namespace; released", "pod", key, "foundNetnsInode", q.rec.NetnsInode, "foundUID", q.rec.UID, "sandbox", heir.rec.ContainerID, "netnsInode", heir.rec.NetnsInode)
		a.forgetLocked(&cniproto.Request{Op: cniproto.OpDel, Pod: cniproto.Pod{Namespace: q.rec.Namespace, Name: q.rec.Name, UID: q.rec.UID, ContainerID: q.rec.ContainerID}}, true)
	}()
}
