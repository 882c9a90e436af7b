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
// (adoptLocked), and a record that disappears while this agent serves its
// pod, if another agent ran on the node (Options.Peers) while it did,
// was removed by that agent's DEL or GC, and the pod is released. The
// same serves a rollback: the older agent learns the pods the newer one
// enrolled before it is stopped.
//
// "While it disappeared", not "when the pass runs": the other agent may
// serve a DEL and exit within the settle (its last exchange as it
// stops), and the pod must still be released here, or its netns is held
// for as long as this agent runs. So whether another agent runs is asked
// right after each listing: a record listed at one and gone at the next
// went in between, and it counts as another agent's removal if one ran
// right after either listing. Alone, a record removed by hand (an
// operator's mistake) leaves its pod served: releasing it would leave
// the pod's redirection pointing at no listener, refusing its
// connections. To keep "another agent ran" from outliving that agent,
// the follower asks each recordPeerCheck while it thinks one runs, and
// once none does, looks at the records one last time on that agent's
// account: a record removed by hand within that second is taken for the
// other agent's removal.
//
// This agent's own ADD and DEL write and remove records under the pod's
// lock and change byCID with them, so they are never taken for another
// agent's; and a release leaves the record alone: its removal was the
// other agent's, which may have written it anew since.

// recordSettle coalesces the events of a burst of record writes into
// one look at the directory.
const recordSettle = 20 * time.Millisecond

// Timings of the follower, read once when it starts (tests shorten them).
var (
	// recordRewatch is how often the records directory is looked for
	// again after it was removed or moved away.
	recordRewatch = time.Second
	// recordPeerCheck is how often the follower asks whether the other
	// agent it last saw still runs.
	recordPeerCheck = time.Second
	// recordPoll is how often the records are looked at while the
	// directory cannot be watched (no inotify instance or watch left:
	// fs.inotify.max_user_instances/max_user_watches reached): following
	// degrades to polling rather than stopping.
	recordPoll = 10 * time.Second
	// recordWatchRetry is the first wait before the watch is tried again,
	// doubled after each failure up to recordWatchRetryMax.
	recordWatchRetry    = time.Second
	recordWatchRetryMax = time.Minute
)

// newRecordWatcher makes the records directory's watcher (tests: one
// that fails as an exhausted inotify instance limit does; lowering the
// real, machine-wide limit broke the watches of tests running beside).
var newRecordWatcher = fsnotify.NewWatcher

// releaseChecked, if set, runs in releaseDeleted once the record was
// found gone (tests: the other agent writing it again there).
var releaseChecked func()

// recordsLooked, if set, gets the record names of every look at the
// directory (tests: wait until a record has been seen).
var recordsLooked func(now map[string]bool)

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

// otherAgents says whether another agent runs on the node now.
func (a *Agent) otherAgents() bool { return a.peers != nil && a.peers() }

// follower is the state of followRecords (its goroutine only).
type follower struct {
	a   *Agent
	dir string
	// w watches dir; nil while no watch could be created (polling).
	w *fsnotify.Watcher
	// watched is the inode of the directory followed.
	watched uint64
	// prev are the record names at the last look; peerSeen: another
	// agent ran right after that look.
	prev     map[string]bool
	peerSeen bool
	// failed: the last attempt to watch failed (logged once per
	// episode); wait is the wait before the next.
	failed bool
	wait   time.Duration

	rewatchEvery, peerCheck, poll, retryMin, retryMax time.Duration
}

// followRecords follows the records directory until ctx ends, starting
// from prev (the names seen last); ready is closed once the directory is
// watched, or polled if it cannot be, and the records written before
// have been looked at.
func (a *Agent) followRecords(ctx context.Context, prev map[string]bool, ready chan<- struct{}) {
	f := &follower{a: a, dir: a.store.Dir(), prev: prev,
		rewatchEvery: recordRewatch, peerCheck: recordPeerCheck, poll: recordPoll, retryMin: recordWatchRetry, retryMax: recordWatchRetryMax}
	f.run(ctx, ready)
}

// watch sets a watch up on the directory at the path (dropping one on
// a directory replaced there) and reports whether it is in place.
func (f *follower) watch() bool {
	if f.w == nil {
		w, err := newRecordWatcher()
		if err != nil {
			f.watchFailed(err)
			return false
		}
		f.w = w
	}
	f.w.Remove(f.dir) // the old directory's watch, where fsnotify kept it
	ino := dirInode(f.dir)
	if ino == 0 {
		f.watchFailed(errors.New("no directory at the path"))
		return false
	}
	if err := f.w.Add(f.dir); err != nil {
		f.watchFailed(err)
		return false
	}
	if f.failed {
		f.a.log.Info("following the pod records again", "dir", f.dir)
	}
	f.failed, f.wait = false, 0
	f.watched = ino
	f.a.watching.Store(true)
	return true
}

// watchFailed logs the first failure of an episode and sets the wait
// before the next attempt: doubling from retryMin to retryMax for a
// missing watch (an inotify limit lasts), rewatchEvery for a missing
// directory (it is made again any moment).
func (f *follower) watchFailed(err error) {
	f.a.watching.Store(false)
	if dirInode(f.dir) == 0 {
		f.wait = f.rewatchEvery // its removal was logged
		return
	} else if f.wait < f.retryMin {
		f.wait = f.retryMin
	} else {
		f.wait = min(2*f.wait, f.retryMax)
	}
	if !f.failed {
		f.failed = true
		f.a.log.Warn("cannot watch the pod records other agents of the node write; looking at them every "+f.poll.String()+" meanwhile, trying again", "dir", f.dir, "err", err)
	}
}

// pass looks at the records (lookAtRecords) against those seen last,
// all new if fresh (another directory).
func (f *follower) pass(ctx context.Context, fresh bool) {
	prev := f.prev
	if fresh {
		prev = nil
	}
	f.prev, f.peerSeen = f.a.lookAtRecords(ctx, prev, f.peerSeen)
}

func (f *follower) run(ctx context.Context, ready chan<- struct{}) {
	readyOnce := sync.OnceFunc(func() { close(ready) })
	defer readyOnce()
	defer func() {
		if f.w != nil {
			f.w.Close()
		}
	}()
	f.peerSeen = f.a.otherAgents() // after the caller's look
	f.watched = dirInode(f.dir)
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	defer retry.Stop()
	if !f.watch() {
		retry.Reset(f.wait)
	}
	// What was written between the caller's look and the watch.
	f.pass(ctx, false)
	readyOnce()
	poll := time.NewTicker(f.poll)
	defer poll.Stop()
	peerTick := time.NewTicker(f.peerCheck)
	defer peerTick.Stop()
	settle := time.NewTimer(0)
	<-settle.C
	pending := false
	// The directory may be removed or moved away and a new one made at
	// its path (by hand, a state volume recreated): the watch stays with
	// the old one, so nothing written to the new one was looked at, and
	// a pass listing the new one must not take the records left in the
	// old one for deleted (releasing every pod while another agent runs).
	// The watch then moves to the new directory, whose every record is
	// looked at once (those of pods this agent has are skipped):
	// replaced says the next pass is such a look.
	replaced := false
	rewatch := func() {
		old := f.watched
		if f.watch() {
			retry.Stop()
			f.pass(ctx, replaced || f.watched != old)
			replaced = false
			return
		}
		retry.Reset(f.wait)
	}
	for {
		// No watcher: its channels are nil, never ready.
		var events <-chan fsnotify.Event
		var errs <-chan error
		if f.w != nil {
			events, errs = f.w.Events, f.w.Errors
		}
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-events:
			if !ok {
				return
			}
			if ev.Name == f.dir && ev.Has(fsnotify.Remove|fsnotify.Rename) {
				f.a.log.Warn("the pod records directory was removed or moved; following the one made at its path", "dir", f.dir)
				pending = false
				settle.Stop()
				replaced = true
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
		case <-poll.C:
			if f.a.watching.Load() {
				continue
			}
			// Not watched: look as a pass after an event would,
			// at whichever directory is at the path.
			if ino := dirInode(f.dir); ino != 0 && ino != f.watched {
				f.watched = ino
				f.pass(ctx, true)
			} else if ino != 0 {
				f.pass(ctx, false)
			}
		case <-peerTick.C:
			// The other agent seen at the last look has gone: the
			// records it removed before it went are looked at on its
			// account now, not after whatever an operator does next.
			if f.peerSeen && !pending && dirInode(f.dir) == f.watched && !f.a.otherAgents() {
				f.pass(ctx, false)
			}
		case err, ok := <-errs:
			if !ok {
				return
			}
			// An overflow lost events: look now.
			f.a.log.Debug("following pod records", "err", err)
			if !pending {
				pending = true
				settle.Reset(0)
			}
		case <-settle.C:
			pending = false
			if dirInode(f.dir) != f.watched {
				replaced = true
				rewatch()
				continue
			}
			f.pass(ctx, false)
		}
	}
}

// recordPass looks at the records once (lookAtRecords), releasing the
// pods whose record disappeared if another agent runs now.
func (a *Agent) recordPass(ctx context.Context, prev map[string]bool) map[string]bool {
	now, _ := a.lookAtRecords(ctx, prev, false)
	return now
}

// lookAtRecords looks at the records once: adopts those that appeared
// since prev and that this agent has no pod for, and releases the pods
// whose record disappeared if another agent ran while it did: seen (one
// ran right after prev was listed) or one runs right after this listing.
// It returns the names seen and whether another agent ran right after.
func (a *Agent) lookAtRecords(ctx context.Context, prev map[string]bool, seen bool) (map[string]bool, bool) {
	names, err := a.store.Names()
	if err != nil {
		a.log.Warn("following pod records", "err", err)
		return prev, seen
	}
	peer := a.otherAgents()
	now := recordNames(names)
	if recordsLooked != nil {
		recordsLooked(now)
	}
	var scan lazyScan
	var adopted []*pod
	defer func() {
		// The rules of the pods adopted here are checked here, unless
		// verifyAdopted has yet to take those adoption found at start
		// (the agent is not ready): then with them.
		a.mu.Lock()
		later := !a.verifyTaken
		if later {
			a.toVerify = append(a.toVerify, adopted...)
		}
		a.mu.Unlock()
		if !later && len(adopted) > 0 {
			a.verifyPods(ctx, adopted, nil)
		}
	}()
	for _, n := range names {
		if ctx.Err() != nil || a.stopping.Load() {
			return now, peer
		}
		if !prev[n] {
			if p := a.adoptRecord(ctx, n, &scan); p != nil {
				adopted = append(adopted, p)
			}
		}
	}
	var gone []string
	for n := range prev {
		if !now[n] {
			gone = append(gone, n)
		}
	}
	if len(gone) > 0 && (seen || peer) {
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
	return now, peer
}

// adoptRecord adopts the record named name unless this agent has its
// pod, and returns the pod it serves then.
func (a *Agent) adoptRecord(ctx context.Context, name string, scan *lazyScan) *pod {
	rec, err := a.store.Read(name)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			a.log.Debug("following pod records", "err", err)
		}
		return nil
	}
	unlock := a.lock(rec.Namespace, rec.Name)
	defer unlock()
	// Again under the pod's lock: this agent's own ADD and DEL write and
	// remove the record under it, so what is read now is settled.
	if rec, err = a.store.Read(name); err != nil {
		return nil
	}
	a.mu.Lock()
	_, known := a.byCID[rec.ContainerID]
	// same is of rec's pod name: the lock held guards its serving and
	// record, read below past a.mu.
	same := a.byName[rec.Namespace+"/"+rec.Name]
	a.mu.Unlock()
	if known {
		return nil // ours
	}
	if same != nil && same.enrolled() && rec.NetnsInode != 0 && same.rec.NetnsInode == rec.NetnsInode {
		return nil // served already, under another record (a live enrollment)
	}
	a.log.Info("adopting a pod another agent of the node recorded after this one read the records", "pod", rec.Namespace+"/"+rec.Name, "enrolled", rec.Enrolled)
	return a.adoptLocked(ctx, rec, scan)
}

// releaseDeleted forgets p, whose record (named name) another agent
// removed: it served the pod's DEL (or its GC found the sandbox gone).
// The record is left alone: that agent owns its removal, and may have
// written it again since the look below (the pod is then adopted again
// by the next pass).
func (a *Agent) releaseDeleted(name string, p *pod) {
	unlock := a.lockOf(p)
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
	if releaseChecked != nil {
		releaseChecked()
	}
	a.log.Info("pod deleted through another agent of the node; releasing it", "pod", p.rec.Namespace+"/"+p.rec.Name)
	// Its network goes with that DEL: the connections are reset
	// (releaseGone), and the records are that agent's.
	a.forgetNetnsLocked(&cniproto.Request{Op: cniproto.OpDel, Pod: cniproto.Pod{Namespace: p.rec.Namespace, Name: p.rec.Name, UID: p.rec.UID, ContainerID: p.rec.ContainerID}}, 0, false, true)
}
