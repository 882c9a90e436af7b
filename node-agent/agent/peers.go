package agent

import (
	"context"
	"errors"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/ambit-mesh/ambit/node-agent/state"
	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

// Records written by another agent of the node.
//
// During a surge upgrade two agents run at once and share the pod
// records. Re-adoption reads them once, but the old agent keeps writing
// for a while: it finishes the plugin exchanges it accepted before the
// new agent took the socket (cniproto.Listen replaces the path; the old
// listener's accepted and queued connections are still the old agent's),
// and an ADD it serves after the new agent listed the records was,
// before this, never known to the new agent: no listeners of its own in
// the pod, the pod missing from its host-rule picture (its reconcile
// removed the old agent's entry as drift), and once the old agent was
// gone nothing listened in the pod, whose redirected connections were
// refused. With Kubernetes, the pod's status update usually led to a
// live enrollment; with an inventory nothing ever did.
//
// So each agent follows the records directory (fsnotify) for as long as
// it runs: a record no pod of this agent's has is adopted as at start
// (adoptLocked), and, while another agent runs on the node
// (Options.Peers), a record that disappears while this agent serves its
// pod was removed by that agent's DEL or GC, and the pod is released. The
// same serves a rollback: the older agent learns the pods the newer one
// enrolled before it is stopped.

// recordSettle coalesces the events of a burst of record writes into
// one look at the directory.
const recordSettle = 20 * time.Millisecond

// recordRewatch is how often the records directory is looked for again
// after it was removed or moved away.
var recordRewatch = time.Second

// dirInode is the inode of the directory at path, 0 if there is none.
func dirInode(path string) uint64 {
	fi, err := os.Stat(path)
	if err != nil || !fi.IsDir() {
		return 0
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Ino
	}
	return 0
}

// recordNames is the set of record file names at one look.
func recordNames(names []string) map[string]bool {
	m := make(map[string]bool, len(names))
	for _, n := range names {
		m[n] = true
	}
	return m
}

// namesOf is the record names of recs (what re-adoption read).
func namesOf(recs []state.Pod) map[string]bool {
	m := make(map[string]bool, len(recs))
	for _, r := range recs {
		m[state.FileName(r.ContainerID)] = true
	}
	return m
}

// followRecords watches the records directory until ctx ends, starting
// from prev (the names seen last); ready is closed once the watch is
// in place and the records written before it have been looked at.
func (a *Agent) followRecords(ctx context.Context, prev map[string]bool, ready chan<- struct{}) {
	readyOnce := sync.OnceFunc(func() { close(ready) })
	defer readyOnce()
	w, err := fsnotify.NewWatcher()
	if err == nil {
		err = w.Add(a.store.Dir())
	}
	if err != nil {
		a.log.Warn("not following the pod records other agents of the node write (a pod another agent enrolls during a surge upgrade is not served by this one until a restart)", "err", err)
		if w != nil {
			w.Close()
		}
		return
	}
	defer w.Close()
	// What was written between the caller's look and the watch.
	prev = a.recordPass(ctx, prev)
	readyOnce()
	settle := time.NewTimer(0)
	<-settle.C
	pending := false
	// The directory may be removed or moved away and a new one made at
	// its path (by hand, a state volume recreated): the watch stays with
	// the old one, so nothing written to the new one was looked at, and
	// a pass listing the new one must not take the records left in the
	// old one for deleted (releasing every pod while another agent runs).
	// The watch then moves to the new directory, whose every record is
	// looked at once (those of pods this agent has are skipped).
	dir := a.store.Dir()
	watched := dirInode(dir)
	retry := time.NewTicker(time.Hour)
	retry.Stop()
	defer retry.Stop()
	rewatch := func() {
		w.Remove(dir) // the old directory's watch, where fsnotify kept it
		ino := dirInode(dir)
		if ino == 0 || w.Add(dir) != nil {
			retry.Reset(recordRewatch)
			return
		}
		retry.Stop()
		watched = ino
		prev = a.recordPass(ctx, nil)
	}
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-w.Events:
			if !ok {
				return
			}
			if ev.Name == dir && ev.Has(fsnotify.Remove|fsnotify.Rename) {
				a.log.Warn("the pod records directory was removed or moved; following the one made at its path", "dir", dir)
				pending = false
				settle.Stop()
				rewatch()
				continue
			}
			if !strings.HasSuffix(ev.Name, ".json") || pending {
				continue
			}
			pending = true
			settle.Reset(recordSettle)
		case <-retry.C:
			rewatch()
		case err, ok := <-w.Errors:
			if !ok {
				return
			}
			// An overflow lost events: look now.
			a.log.Debug("following pod records", "err", err)
			if !pending {
				pending = true
				settle.Reset(0)
			}
		case <-settle.C:
			pending = false
			if dirInode(dir) != watched {
				rewatch()
				continue
			}
			prev = a.recordPass(ctx, prev)
		}
	}
}

// recordPass looks at the records once: adopts those that appeared since
// prev and that this agent has no pod for, and, while another agent runs
// on the node, releases the pods whose record disappeared. It returns
// the names seen.
func (a *Agent) recordPass(ctx context.Context, prev map[string]bool) map[string]bool {
	names, err := a.store.Names()
	if err != nil {
		a.log.Warn("following pod records", "err", err)
		return prev
	}
	now := recordNames(names)
	var scan lazyScan
	for _, n := range names {
		if ctx.Err() != nil || a.stopping.Load() {
			return now
		}
		if !prev[n] {
			a.adoptRecord(ctx, n, &scan)
		}
	}
	var gone []string
	for n := range prev {
		if !now[n] {
			gone = append(gone, n)
		}
	}
	if len(gone) > 0 && a.peers != nil && a.peers() {
		a.mu.Lock()
		byName := make(map[string]*pod, len(a.byCID))
		for cid, p := range a.byCID {
			byName[state.FileName(cid)] = p
		}
		a.mu.Unlock()
		for _, n := range gone {
			if p := byName[n]; p != nil {
				a.releaseDeleted(n, p)
			}
		}
	}
	// Late-adopted pods' rules are checked now (verifyAdopted has
	// taken what adoption found at start).
	select {
	case <-a.ready:
		a.mu.Lock()
		pods := a.toVerify
		a.toVerify = nil
		a.mu.Unlock()
		if len(pods) > 0 {
			a.verifyPods(ctx, pods)
		}
	default:
	}
	return now
}

// adoptRecord adopts the record named name unless this agent has its pod.
func (a *Agent) adoptRecord(ctx context.Context, name string, scan *lazyScan) {
	rec, err := a.store.Read(name)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			a.log.Debug("following pod records", "err", err)
		}
		return
	}
	unlock := a.lock(rec.Namespace, rec.Name)
	defer unlock()
	// Again under the pod's lock: this agent's own ADD and DEL write and
	// remove the record under it, so what is read now is settled.
	if rec, err = a.store.Read(name); err != nil {
		return
	}
	a.mu.Lock()
	_, known := a.byCID[rec.ContainerID]
	same := a.byName[rec.Namespace+"/"+rec.Name]
	a.mu.Unlock()
	if known {
		return // ours
	}
	if same != nil && same.enrolled() && rec.NetnsInode != 0 && same.rec.NetnsInode == rec.NetnsInode {
		return // served already, under another record (a live enrollment)
	}
	a.log.Info("adopting a pod another agent of the node recorded after this one read the records", "pod", rec.Namespace+"/"+rec.Name, "enrolled", rec.Enrolled)
	a.adoptLocked(ctx, rec, scan)
}

// releaseDeleted forgets p, whose record (named name) another agent
// removed: it served the pod's DEL (or its GC found the sandbox gone).
func (a *Agent) releaseDeleted(name string, p *pod) {
	unlock := a.lock(p.rec.Namespace, p.rec.Name)
	defer unlock()
	a.mu.Lock()
	cur := a.byCID[p.rec.ContainerID]
	a.mu.Unlock()
	if cur != p {
		return // released or replaced meanwhile
	}
	if _, err := a.store.Read(name); !errors.Is(err, os.ErrNotExist) {
		return // written again
	}
	a.log.Info("pod deleted through another agent of the node; releasing it", "pod", p.rec.Namespace+"/"+p.rec.Name)
	a.delLocked(&cniproto.Request{Op: cniproto.OpDel, Pod: cniproto.Pod{Namespace: p.rec.Namespace, Name: p.rec.Name, UID: p.rec.UID, ContainerID: p.rec.ContainerID}})
}
