package agent

import (
	"context"
	"errors"
	"os"
	"slices"
	"strings"
	"syscall"

	"github.com/ambit-mesh/ambit/node-agent/cluster"
	"github.com/ambit-mesh/ambit/node-agent/state"
)

// Records adoption keeps without serving them: their namespace refused
// as another pod's (the record's own bind mount gone, its IPs another
// pod's now) or not found for another reason. Nothing registers them, so
// neither a reconcile nor a GC looked at them again, and a record of a
// pod deleted since stayed on disk for good: tried at every restart,
// each time refused again, its Warning Event and failed status repeated
// for a pod that no longer exists. A kept record is removed once it has
// outlived its sandbox: its netns path no longer opens the recorded
// namespace and either the pod is gone from the view (or the view has
// another pod, another UID, under its name) or this agent serves the pod
// in another namespace. A kept record of a pod that still exists and is
// not served stays, with its refusal, as before.

// keepLocked notes rec, left on disk unserved by adoption (under its
// pod's lock).
func (a *Agent) keepLocked(rec state.Pod) {
	key := rec.Namespace + "/" + rec.Name
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.kept == nil {
		a.kept = map[string]map[string]bool{}
	}
	if a.kept[key] == nil {
		a.kept[key] = map[string]bool{}
	}
	a.kept[key][rec.ContainerID] = true
}

func (a *Agent) unkeep(key, cid string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	delete(a.kept[key], cid)
	if len(a.kept[key]) == 0 {
		delete(a.kept, key)
	}
}

// outlived tells whether rec no longer has a sandbox: its netns is gone
// and its pod with it (cp, found: the view's pod of its name) or served
// here in another namespace (served: the pod's registered sandbox, nil
// if none).
func outlived(rec state.Pod, cp cluster.Pod, found bool, served *pod) bool {
	if !netnsGone(rec) {
		return false
	}
	if !found || (podKey{rec.Namespace, rec.Name, rec.UID}).other(cp.Namespace, cp.Name, cp.UID) {
		return true
	}
	return served != nil && served.enrolled() && served.rec.NetnsInode != 0 && served.rec.NetnsInode != rec.NetnsInode
}

// netnsGone tells whether rec's netns path no longer opens the namespace
// it recorded: the runtime removed the sandbox's bind mount (or the
// process a found sandbox was reached through ended). Any other error
// (permissions) says nothing.
func netnsGone(rec state.Pod) bool {
	if rec.Netns == "" {
		return true
	}
	var st syscall.Stat_t
	if err := syscall.Stat(rec.Netns, &st); err != nil {
		return errors.Is(err, os.ErrNotExist)
	}
	return rec.NetnsInode != 0 && st.Ino != rec.NetnsInode
}

// dropKeptLocked removes the kept records of namespace/name that
// outlived their sandbox (cp, found: the view's pod of that name), under
// the pod's lock. One removed while the pod is served here has the
// pod's status said again: the kept record's refusal, at adoption, may
// have said "failed" after the served sandbox said "enabled".
func (a *Agent) dropKeptLocked(namespace, name string, cp cluster.Pod, found bool) {
	key := namespace + "/" + name
	a.mu.Lock()
	var cids []string
	for cid := range a.kept[key] {
		cids = append(cids, cid)
	}
	// The pod's own sandbox, read past a.mu below (outlived): the
	// pod's lock, held by the caller, guards its serving and record.
	served := a.byName[key]
	a.mu.Unlock()
	servedHere := false
	for _, cid := range cids {
		rec, err := a.store.Read(state.FileName(cid))
		if errors.Is(err, os.ErrNotExist) {
			a.unkeep(key, cid) // removed: a DEL, a GC, another agent
			continue
		}
		if err != nil {
			continue
		}
		a.mu.Lock()
		_, known := a.byCID[cid]
		a.mu.Unlock()
		if known {
			a.unkeep(key, cid) // adopted since (another agent wrote it again)
			continue
		}
		if !outlived(rec, cp, found, served) {
			continue
		}
		if err := a.store.Delete(cid); err != nil {
			a.log.Warn("removing a pod record that outlived its sandbox", "pod", key, "err", err)
			continue
		}
		a.unkeep(key, cid)
		a.log.Info("pod record outlived its sandbox (netns gone, pod gone or served in another netns); removed", "pod", key, "containerID", cid, "netns", rec.Netns, "uid", rec.UID)
		if found && served != nil && served.enrolled() && !(podKey{namespace, name, cp.UID}).other(served.rec.Namespace, served.rec.Name, served.rec.UID) {
			servedHere = true
		}
	}
	if servedHere {
		a.setStatus(cp, "enabled", "", "")
	}
}

// keepOrDropLocked keeps rec, which adoption leaves on disk unserved,
// unless it outlived its sandbox already (the pod deleted while no agent
// ran): then it is removed. It tells whether rec was kept.
func (a *Agent) keepOrDropLocked(ctx context.Context, rec state.Pod) bool {
	a.keepLocked(rec)
	cctx, cancel := context.WithTimeout(ctx, a.cfg.RequestTimeout.Duration)
	defer cancel()
	cp, found, err := a.view.Pod(cctx, rec.Namespace, rec.Name)
	if err != nil {
		return true
	}
	a.dropKeptLocked(rec.Namespace, rec.Name, cp, found)
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.kept[rec.Namespace+"/"+rec.Name][rec.ContainerID]
}

// gcKept removes the kept records whose container ID the runtime no
// longer lists (CNI GC: valid), as gc forgets registered sandboxes. A
// found: record has no container ID the runtime could list.
func (a *Agent) gcKept(valid map[string]bool) int {
	type kept struct{ namespace, name, cid string }
	var gone []kept
	a.mu.Lock()
	for key, cids := range a.kept {
		for cid := range cids {
			if !valid[cid] && !strings.HasPrefix(cid, foundPrefix) {
				ns, name, _ := strings.Cut(key, "/")
				gone = append(gone, kept{ns, name, cid})
			}
		}
	}
	a.mu.Unlock()
	for _, k := range gone {
		unlock := a.lock(k.namespace, k.name)
		if err := a.store.Delete(k.cid); err != nil {
			a.log.Warn("removing pod record", "pod", k.namespace+"/"+k.name, "err", err)
		} else {
			a.unkeep(k.namespace+"/"+k.name, k.cid)
		}
		unlock()
	}
	return len(gone)
}

// gcKeptNetwork is gcKept for the GC of network n: apply gives a kept
// record's networks after it, and whether it is gone (then removed).
func (a *Agent) gcKeptNetwork(n string, apply func(state.Pod) ([]string, bool)) int {
	type kept struct{ key, cid string }
	var all []kept
	a.mu.Lock()
	for key, cids := range a.kept {
		for cid := range cids {
			if !strings.HasPrefix(cid, foundPrefix) {
				all = append(all, kept{key, cid})
			}
		}
	}
	a.mu.Unlock()
	removed := 0
	for _, k := range all {
		ns, name, _ := strings.Cut(k.key, "/")
		unlock := a.lock(ns, name)
		rec, err := a.store.Read(state.FileName(k.cid))
		switch {
		case errors.Is(err, os.ErrNotExist):
			a.unkeep(k.key, k.cid)
		case err != nil:
			a.log.Warn("reading pod record", "pod", k.key, "err", err)
		default:
			nets, gone := apply(rec)
			if gone {
				if err := a.store.Delete(k.cid); err != nil {
					a.log.Warn("removing pod record", "pod", k.key, "err", err)
				} else {
					a.unkeep(k.key, k.cid)
					removed++
				}
			} else if !slices.Equal(nets, rec.Networks) {
				rec.Networks = nets
				a.rewrite(rec)
			}
		}
		unlock()
	}
	return removed
}
