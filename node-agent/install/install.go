package install

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/ambit-mesh/ambit/node-agent/install/atomicfile"
	"github.com/ambit-mesh/ambit/node-agent/install/conflist"
)

// Run installs ambit-cni on this node and keeps it installed until ctx
// ends: it copies the binary (once cfg.Serving), waits for cfg.Ready, chains our entry last
// into the primary CNI config, and re-asserts both whenever a file event
// (or the periodic resync) shows them gone or changed.
//
// Ending ctx leaves everything in place on purpose: a restarting or
// upgrading agent must not open a window in which pods start without
// redirection. Removing Ambit from the node is Uninstall's job.
func Run(ctx context.Context, cfg Config) error {
	c, err := cfg.withDefaults()
	if err != nil {
		return err
	}
	e, err := entryOf(c.Entry)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(c.CNIConfDir, 0o755); err != nil {
		return fmt.Errorf("CNI config directory: %w", err)
	}
	if err := os.MkdirAll(c.CNIBinDir, 0o755); err != nil {
		return fmt.Errorf("CNI bin directory: %w", err)
	}
	in := &installer{cfg: c, entry: e, m: newMetrics(c.Registerer), log: c.Logger, sums: sums{}}
	in.watch()
	defer func() {
		if in.watcher != nil {
			in.watcher.Close()
		}
	}()
	if c.Serving != nil {
		select {
		case <-c.Serving:
		default:
			in.log.Info("an older agent serves the plugin socket; installing the plugin binary once this agent does")
			select {
			case <-c.Serving:
			case <-ctx.Done():
				return nil
			}
		}
	}
	if !in.yielding() {
		if changed, err := installBinary(c.PluginSource, c.CNIBinDir, in.sums); err != nil {
			return err
		} else if changed {
			in.log.Info("installed plugin binary", "path", filepath.Join(c.CNIBinDir, PluginType))
		}
	}

	if c.Ready != nil {
		in.log.Info("waiting for the agent to be ready before writing the CNI config")
		select {
		case <-c.Ready:
		case <-ctx.Done():
			return nil
		}
	}

	// One reconciliation now, then on every (debounced) event, every
	// Resync, and with backoff after a failure.
	backoff := time.Duration(0)
	timer := time.NewTimer(0)
	defer timer.Stop()
	resync := time.NewTicker(c.Resync)
	defer resync.Stop()
	poll := time.NewTicker(unwatchedPoll)
	defer poll.Stop()
	for {
		var events <-chan fsnotify.Event
		var errs <-chan error
		w := in.watcher
		if w != nil {
			events, errs = w.Events, w.Errors
		}
		select {
		case <-ctx.Done():
			return nil
		case <-poll.C:
			// Without a watch no event tells of a change: look at
			// the files now, and try the watch again. Not while a
			// failed reconcile waits for its retry: a refusal that
			// lasts was logged, and counted, at every look, its
			// backoff undone. Once watched, look at once: a change
			// made since the last look sent no event.
			if in.watcher == nil {
				if in.watch() || backoff == 0 {
					resetTimer(timer, 0)
				}
			}
		case ev, ok := <-events:
			if !ok {
				return errors.New("CNI directory watcher closed")
			}
			if strings.Contains(filepath.Base(ev.Name), atomicfile.TempMarker) {
				continue
			}
			if ev.Has(fsnotify.Remove|fsnotify.Rename) && ev.Name != c.CNIConfDir && in.watched[ev.Name] {
				// A watched directory (a link target's, a network's
				// drop-in directory) went away with its watch; one
				// made again at that path is watched anew.
				w.Remove(ev.Name)
				delete(in.watched, ev.Name)
			}
			resetTimer(timer, c.Debounce)
		case err, ok := <-errs:
			if !ok {
				return errors.New("CNI directory watcher closed")
			}
			// Typically an event queue overflow: look at everything.
			in.log.Warn("CNI directory watcher error; reconciling", "err", err)
			resetTimer(timer, c.Debounce)
		case <-resync.C:
			resetTimer(timer, 0)
		case <-timer.C:
			if in.yielding() {
				continue
			}
			if err := in.reconcile(); err != nil {
				in.m.errors.Inc()
				backoff = min(max(2*backoff, 200*time.Millisecond), 30*time.Second)
				if errors.Is(err, atomicfile.ErrChanged) || errors.Is(err, errUnsettled) {
					// Another writer was mid-change: look again soon.
					in.log.Info("CNI config is being changed by another writer; retrying", "err", err)
					backoff = max(c.Debounce, 200*time.Millisecond)
				} else {
					in.log.Error("installing the CNI config failed; retrying", "err", err, "retry_in", backoff)
				}
				resetTimer(timer, backoff)
				continue
			}
			backoff = 0
			if in.rescan {
				// That pass watched a directory for the first time,
				// after reading it: a file written there in between
				// sent no event and would wait for the next resync.
				// Now that it is watched, look once more.
				in.rescan = false
				resetTimer(timer, 0)
			}
		}
	}
}

func resetTimer(t *time.Timer, d time.Duration) {
	t.Stop()
	select {
	case <-t.C:
	default:
	}
	t.Reset(d)
}

func entryOf(e Entry) (conflist.Entry, error) {
	js, err := e.JSON()
	if err != nil {
		return conflist.Entry{}, err
	}
	return conflist.NewEntry(js)
}

type installer struct {
	cfg   Config
	entry conflist.Entry
	m     *metrics
	log   *slog.Logger

	// written remembers the hash of what we last wrote to each file, to
	// tell our own events from another writer's rewrite.
	written map[string][32]byte
	// sums: the plugin binary's and its source's, so a look at them
	// unchanged reads neither.
	sums sums
	// rewrites are the times another writer removed our entry, within
	// the fight window.
	rewrites []time.Time
	// lastSkipped avoids repeating the same warning every resync.
	lastSkipped string
	// lastDropIns avoids repeating the drop-in warning every resync.
	lastDropIns string
	waiting     bool
	yielded     bool

	// watcher also watches the directories of link targets (watched),
	// so a primary CNI's rewrite of a linked file is seen at once.
	watcher *fsnotify.Watcher
	watched map[string]bool
	// unwatched: the CNI directories could not be watched (logged once
	// per episode); the installer polls them.
	unwatched bool
	// rescan: watchDir added a watch during this reconcile (Run
	// reconciles again at once).
	rescan bool
}

// target is the file to edit for the config at path: path itself, or
// what it links to. The runtime reads through the link and the link's
// owner (a primary CNI keeping its file elsewhere, a distribution
// managing /etc/cni/net.d as links) rewrites the target; replacing the
// link with a file froze the primary's config at install time and lost
// the link on uninstall.
func target(path string) (string, error) {
	fi, err := os.Lstat(path)
	if err != nil {
		return "", err
	}
	if fi.Mode()&os.ModeSymlink == 0 {
		return path, nil
	}
	t, err := filepath.EvalSymlinks(path)
	if err != nil {
		return "", fmt.Errorf("%s is a link that cannot be followed: %w", path, err)
	}
	return t, nil
}

// newWatcher makes the watcher of the CNI directories (tests: one that
// fails the way an exhausted inotify limit does).
var newWatcher = fsnotify.NewWatcher

// unwatchedPoll is how often the CNI directories are looked at, and
// their watch tried again, while they cannot be watched.
var unwatchedPoll = time.Second

// watch sets up the watch of the CNI config and bin directories,
// reporting whether it is in place. It may not be: inotify instances
// and watches are limited per user on the node
// (fs.inotify.max_user_instances, default 128, and max_user_watches),
// and other daemons exhaust them. Stopping the installer then would
// leave a new node without our entry, never ready, and a primary CNI's
// rewrite of its config unanswered; so the installer polls instead,
// every unwatchedPoll, until a watch can be made.
func (in *installer) watch() bool {
	c := in.cfg
	w, err := newWatcher()
	if err == nil {
		for _, d := range []string{c.CNIConfDir, c.CNIBinDir} {
			if err = w.Add(d); err != nil {
				err = fmt.Errorf("%s: %w", d, err)
				w.Close()
				break
			}
		}
	}
	if err != nil {
		if !in.unwatched {
			in.unwatched = true
			in.m.watching.Set(0)
			in.log.Warn("cannot watch the CNI directories (raise fs.inotify.max_user_instances or max_user_watches); checking them every "+unwatchedPoll.String()+" instead", "err", err)
		}
		return false
	}
	if in.unwatched {
		in.log.Info("watching the CNI directories again")
	}
	in.unwatched = false
	in.m.watching.Set(1)
	// Link targets' and drop-in directories are watched anew by the
	// next reconcile, which the caller runs.
	in.watcher, in.watched = w, map[string]bool{c.CNIConfDir: true}
	return true
}

// beforeWatch, when set (tests), runs in watchDir before a directory is
// first watched: after reconcile has read it, where a change sends no
// event.
var beforeWatch func(dir string)

// watchDir adds a directory (a link target's, the network's drop-in
// directory) to the watcher, once.
func (in *installer) watchDir(dir string) {
	if in.watcher == nil || in.watched[dir] {
		return
	}
	if beforeWatch != nil {
		beforeWatch(dir)
	}
	if err := in.watcher.Add(dir); err != nil {
		in.log.Warn("cannot watch the directory of a linked CNI config; changes there are seen at the next resync", "dir", dir, "err", err, "resync", in.cfg.Resync)
		return
	}
	in.watched[dir] = true
	in.rescan = true
}

// yielding asks Config.Yield, logging each change of answer once.
func (in *installer) yielding() bool {
	y := in.cfg.Yield != nil && in.cfg.Yield()
	if y != in.yielded {
		if y {
			in.log.Info("a newer agent runs on this node; leaving the plugin binary and CNI config to it")
		} else {
			in.log.Info("no newer agent on this node any more; maintaining the plugin binary and CNI config again")
		}
		in.yielded = y
	}
	return y
}

// reconcile makes the node's state what it should be, once.
func (in *installer) reconcile() error {
	c := in.cfg
	if changed, err := installBinary(c.PluginSource, c.CNIBinDir, in.sums); err != nil {
		return err
	} else if changed {
		in.log.Warn("plugin binary was missing or changed; reinstalled", "path", filepath.Join(c.CNIBinDir, PluginType))
	}
	p, skipped, err := conflist.FindPrimary(c.CNIConfDir)
	for _, s := range skipped {
		if fi, serr := os.Stat(s.Path); serr == nil && time.Since(fi.ModTime()) < c.Settle {
			// Possibly mid-write: wait for it rather than act on the
			// next file.
			return fmt.Errorf("%w: %s is invalid and was modified %v ago", errUnsettled, s.Path, time.Since(fi.ModTime()).Round(time.Millisecond))
		}
	}
	in.warnSkipped(skipped)
	if errors.Is(err, conflist.ErrNoPrimary) {
		in.state(false, "")
		if !in.waiting {
			in.log.Info("no primary CNI config yet; waiting for the primary CNI to write one", "dir", c.CNIConfDir)
			in.waiting = true
		}
		return nil
	}
	if err != nil {
		return err
	}
	in.waiting = false
	if q := in.rewrittenOriginal(p); q != nil {
		p = q
	}
	if dir, ok := in.dropInDir(p); ok {
		// Its files' appearance or removal must be seen at once, not
		// at the next resync.
		in.watchDir(dir)
	}
	if !slices.Contains(pluginVersions, p.CNIVersion) {
		in.state(false, "")
		return in.refuseVersion(p)
	}
	if len(p.DropIns) > 0 && !hasOtherThan(p.Inline, PluginType) {
		in.state(false, "")
		return in.refuseDropIns(p)
	}
	var path string
	if p.IsList {
		path, err = in.ensureList(p)
	} else {
		path, err = in.convert(p)
	}
	if err != nil {
		in.state(false, "")
		return err
	}
	in.warnDropIns(p)
	in.state(true, path)
	return nil
}

// warnDropIns reports the network's drop-in plugins (libcni v1.3.0+ runs
// <conf dir>/<network name>/*.conf after the list's own plugins), which
// run after ambit-cni: it cannot be last in such a network. It stays
// chained anyway: an ambient pod must never start without its
// redirection, and the plugins usually found there (tuning, portmap,
// bandwidth) leave the pod's nftables alone; one that flushed them would
// have them put back by the agent's periodic rule check. The fix is the
// operator's: move them into the list's "plugins", or set
// "loadOnlyInlinedPlugins": true.
func (in *installer) warnDropIns(p *conflist.Primary) {
	in.m.after.Set(float64(len(p.DropIns)))
	key := strings.Join(p.DropIns, "\x00")
	if key == in.lastDropIns {
		return
	}
	in.lastDropIns = key
	if len(p.DropIns) == 0 {
		return
	}
	in.log.Warn("plugins in the network's drop-in directory run after ambit-cni on runtimes built with containernetworking/cni v1.3.0 or later; ambit-cni stays chained (an ambient pod never starts unredirected), but to make it last move them into the list's \"plugins\" or set \"loadOnlyInlinedPlugins\": true",
		"path", p.Path, "drop_ins", strings.Join(p.DropIns, ", "))
}

func (in *installer) state(installed bool, primary string) {
	if installed {
		in.m.installed.Set(1)
	} else {
		in.m.installed.Set(0)
		// Not chained (refused, no primary, an error): ambit-cni does
		// not run, so nothing runs after it. The count from when it was
		// chained would describe a chain that no longer exists;
		// installed 0 is the alert. warnDropIns sets it once chained.
		in.m.after.Set(0)
	}
	if in.cfg.OnState != nil {
		in.cfg.OnState(installed, primary)
	}
	if installed && in.cfg.OnInstalled != nil {
		in.cfg.OnInstalled(primary)
	}
}

// errNotLast: the runtime would run plugins after ambit-cni.
var errNotLast = errors.New("ambit-cni would not run last")

// dropInDir is the directory a libcni v1.3.0+ runtime reads the
// primary's extra plugins from (conflist.DropIns), when it exists.
func (in *installer) dropInDir(p *conflist.Primary) (string, bool) {
	if p.Name == "" {
		return "", false
	}
	dir := filepath.Join(filepath.Dir(p.Path), p.Name)
	fi, err := os.Stat(dir)
	return dir, err == nil && fi.IsDir()
}

// hasOtherThan says whether types holds a type other than t.
func hasOtherThan(types []string, t string) bool {
	for _, x := range types {
		if x != t {
			return true
		}
	}
	return false
}

// refuseDropIns declines a primary list that has no plugins of its own
// (ours aside),
// all of them coming from <conf dir>/<network name>/ (libcni v1.3.0+):
// an entry in its "plugins" would run first, before the primary CNI has
// made the pod's interface. Our entry comes out of the list if it is
// there. Pods then start unenrolled and the agent enrolls ambient ones
// live; the error, repeated with backoff, tells the operator the fix.
func (in *installer) refuseDropIns(p *conflist.Primary) error {
	if err := in.takeOut(p, "its plugins all come from the network's directory, so ambit-cni would run first"); err != nil {
		return err
	}
	return fmt.Errorf("%w: %s (the primary CNI config) has no plugins of its own; runtimes built with containernetworking/cni v1.3.0 or later take them all from %s, after any in the list, so ambit-cni cannot be chained after them there. Not chaining ambit-cni (pods start unenrolled and the agent enrolls ambient pods live): move them into the list's \"plugins\"",
		errNotLast, p.Path, strings.Join(p.DropIns, ", "))
}

// takeOut removes our entry from the primary list p, if it is there,
// because of why.
func (in *installer) takeOut(p *conflist.Primary, why string) error {
	if !p.IsList || !conflist.Has(p.Data, PluginType) {
		return nil
	}
	out, _, err := conflist.Remove(p.Data, PluginType)
	if err != nil {
		return fmt.Errorf("%s: %w", p.Path, err)
	}
	dst, err := target(p.Path)
	if err != nil {
		return err
	}
	if err := atomicfile.Replace(dst, p.Data, out, atomicfile.Attrs(p.Info)); err != nil {
		return err
	}
	delete(in.written, p.Path)
	in.log.Warn("took ambit-cni out of the primary CNI config: "+why, "path", p.Path, "file", dst)
	return nil
}

// unconvert undoes our conversion of the network p refused (p our list,
// or the .conf/.json the primary CNI wrote again beside it), as uninstall
// does: the original goes back unless the primary wrote it again, our list
// and the backup go. Only taking our entry out would leave the node on our
// list: the operator without the file to fix, uninstall without a list to
// restore from, and a .json the primary rewrote (it sorts after the list)
// never read by the runtime.
func (in *installer) unconvert(p *conflist.Primary) (bool, error) {
	list := p.Path
	if !p.IsList {
		list = conflist.ListName(p.Path)
	}
	b, _, err := conflist.ReadFile(list)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	} else if err != nil {
		return false, err
	}
	withoutUs := b
	if conflist.Has(b, PluginType) {
		if withoutUs, _, err = conflist.Remove(b, PluginType); err != nil {
			return false, fmt.Errorf("%s: %w", list, err)
		}
	}
	restored, err := restoreConverted(in.cfg.CNIConfDir, list, withoutUs)
	if err != nil || !restored {
		return false, err
	}
	delete(in.written, list)
	in.log.Warn("undid the conversion of the primary CNI config: its cniVersion is not one ambit-cni supports", "list", list, "config", p.Path)
	return true, nil
}

// errVersion: the runtime would give ambit-cni a cniVersion it refuses.
var errVersion = errors.New("ambit-cni does not support the network's cniVersion")

// refuseVersion declines a primary whose cniVersion ambit-cni refuses:
// our entry takes the network's version, and the plugin fails ADD and DEL
// under any other, so chained it would keep every pod of the node from
// starting, and from being deleted, on containerd, meshed or not (CRI-O
// drops the whole network instead). Pods then start unenrolled and the
// agent enrolls ambient ones live; the error names the fix.
func (in *installer) refuseVersion(p *conflist.Primary) error {
	restored, err := in.unconvert(p)
	if err != nil {
		return err
	}
	if !restored {
		if err := in.takeOut(p, "its cniVersion is not one ambit-cni supports"); err != nil {
			return err
		}
	}
	v := p.CNIVersion
	if v == "" {
		v = "none"
	}
	return fmt.Errorf("%w: %s (the primary CNI config) has cniVersion %s, ambit-cni supports %s; not chaining ambit-cni (pods start unenrolled and the agent enrolls ambient pods live): set the network's \"cniVersion\" to one of those",
		errVersion, p.Path, v, strings.Join(pluginVersions, ", "))
}

// errUnsettled: a config file that sorts first is broken but fresh; look
// again shortly.
var errUnsettled = errors.New("CNI config directory is settling")

func (in *installer) ensureList(p *conflist.Primary) (string, error) {
	base, upgraded := in.upgradeConversion(p)
	out, changed, err := conflist.Ensure(base, in.entry)
	if err != nil {
		return "", fmt.Errorf("%s: %w", p.Path, err)
	}
	changed = changed || upgraded
	dst, err := target(p.Path)
	if err != nil {
		return "", err
	}
	if dst != p.Path {
		in.watchDir(filepath.Dir(dst))
	}
	if !changed {
		in.remember(p.Path, p.Data)
		return p.Path, nil
	}
	if err := atomicfile.Replace(dst, p.Data, out, atomicfile.Attrs(p.Info)); err != nil {
		return "", err
	}
	in.noteRewrite(p.Path, p.Data)
	in.remember(p.Path, out)
	if upgraded {
		in.log.Info("the list an older agent converted from a single-plugin config now says \"loadOnlyInlinedPlugins\": true, as the .conf it came from never ran the network's drop-in plugins", "path", p.Path, "file", dst)
	} else {
		in.log.Info("chained ambit-cni into the primary CNI config", "path", p.Path, "file", dst)
	}
	return p.Path, nil
}

// upgradeConversion: when p is a list an agent from before
// "loadOnlyInlinedPlugins" converted from a .conf (its bytes, our entry
// aside, still exactly that conversion of the original kept in the
// backup), it returns today's conversion of the original, which says the
// key: on a libcni v1.3.0+ runtime that list ran the network's drop-ins,
// which the .conf never did. Uninstall still puts the original back byte
// for byte (the new list is exactly Convert of it). Anything else, or a
// list already current, is returned as it is.
func (in *installer) upgradeConversion(p *conflist.Primary) ([]byte, bool) {
	withoutUs := p.Data
	if conflist.Has(p.Data, PluginType) {
		out, _, err := conflist.Remove(p.Data, PluginType)
		if err != nil {
			return p.Data, false
		}
		withoutUs = out
	}
	_, _, orig, _, ok := convertedFrom(in.cfg.CNIConfDir, p.Path, withoutUs)
	if !ok {
		return p.Data, false
	}
	cur, err := conflist.Convert(orig)
	if err != nil || bytes.Equal(cur, withoutUs) {
		return p.Data, false
	}
	return cur, true
}

// rewrittenOriginal: when p is a list we converted and the file it was
// converted from is there again, valid (the primary CNI wrote it anew), it
// returns that file as the primary, to be converted again. A .conf sorts
// before its .conflist and is picked anyway; a .json sorts after it, so
// the runtime would go on reading our list of the old config and the
// primary's change would never reach it.
func (in *installer) rewrittenOriginal(p *conflist.Primary) *conflist.Primary {
	if !p.IsList {
		return nil
	}
	withoutUs := p.Data
	if conflist.Has(p.Data, PluginType) {
		out, _, err := conflist.Remove(p.Data, PluginType)
		if err != nil {
			return nil
		}
		withoutUs = out
	}
	orig, _, _, _, ok := convertedFrom(in.cfg.CNIConfDir, p.Path, withoutUs)
	if !ok {
		return nil
	}
	path := filepath.Join(filepath.Dir(p.Path), orig)
	b, fi, err := conflist.ReadFile(path)
	if err != nil || conflist.Loads(path, b) != nil {
		return nil
	}
	c, err := conflist.ParseConf(b)
	if err != nil {
		return nil
	}
	return &conflist.Primary{Path: path, Data: b, Info: fi, Name: c.Name, CNIVersion: c.CNIVersion}
}

// convertWrite writes convert's files (tests: one that stops between
// them).
var convertWrite = atomicfile.Write

// convert turns the primary .conf/.json into a .conflist with our entry,
// keeps the original bytes under BackupDir for uninstall, and removes the
// original so the runtime picks the list.
func (in *installer) convert(p *conflist.Primary) (string, error) {
	listPath := conflist.ListName(p.Path)
	backupDir := filepath.Join(in.cfg.CNIConfDir, BackupDir)
	backup := filepath.Join(backupDir, filepath.Base(p.Path))
	reconverting := false
	if _, err := os.Stat(listPath); err == nil {
		// A list of that name that we did not make is someone
		// else's; we will not overwrite it.
		if _, err := os.Stat(backup); err != nil {
			return "", fmt.Errorf("cannot convert %s: %s exists and was not written by ambit", p.Path, listPath)
		}
		reconverting = true
	}
	lst, err := conflist.Convert(p.Data)
	if err != nil {
		return "", fmt.Errorf("%s: %w", p.Path, err)
	}
	out, _, err := conflist.Ensure(lst, in.entry)
	if err != nil {
		return "", fmt.Errorf("%s: %w", p.Path, err)
	}
	if err := os.MkdirAll(backupDir, 0o700); err != nil {
		return "", err
	}
	attrs := atomicfile.Attrs(p.Info)
	writeBackup := func() error {
		if err := convertWrite(backup, p.Data, attrs); err != nil {
			return fmt.Errorf("keeping the original %s: %w", p.Path, err)
		}
		return nil
	}
	writeList := func() error { return convertWrite(listPath, out, attrs) }
	steps := []func() error{writeBackup, writeList}
	if reconverting {
		// Stopped in between, the list must be the conversion of the
		// backup or of the file there now (convertedFrom), or it is
		// not known as ours. A first conversion has no backup to
		// match, so the backup goes first; a list of the old config
		// with a backup of the new one matched neither.
		steps = []func() error{writeList, writeBackup}
	}
	for _, step := range steps {
		if err := step(); err != nil {
			return "", err
		}
	}
	// Remove the .conf only if it is still what we converted; if the
	// primary CNI rewrote it meanwhile, the next pass converts that.
	cur, err := os.ReadFile(p.Path)
	if err != nil || !bytes.Equal(cur, p.Data) {
		return "", fmt.Errorf("%w: %s", atomicfile.ErrChanged, p.Path)
	}
	if err := atomicfile.Remove(p.Path); err != nil {
		return "", err
	}
	in.noteRewrite(listPath, nil)
	in.remember(listPath, out)
	in.log.Info("converted the primary CNI config to a list and chained ambit-cni", "from", p.Path, "to", listPath, "original_kept_in", backup)
	// The list must now be what the runtime picks.
	np, _, err := conflist.FindPrimary(in.cfg.CNIConfDir)
	if err != nil {
		return "", err
	}
	if np.Path != listPath {
		return "", fmt.Errorf("after converting %s the runtime would pick %s, not %s; rename the files so the primary network sorts first", p.Path, np.Path, listPath)
	}
	return listPath, nil
}

func (in *installer) remember(path string, b []byte) {
	if in.written == nil {
		in.written = map[string][32]byte{}
	}
	in.written[path] = sha256.Sum256(b)
}

// noteRewrite is called when we are about to (re)write path whose current
// content was old (nil: a converted .conf reappeared). If we had already
// installed into that file, someone else took our entry out: count it,
// and warn when it keeps happening.
func (in *installer) noteRewrite(path string, old []byte) {
	if _, ours := in.written[path]; !ours {
		return
	}
	in.m.reasserts.Inc()
	now := time.Now()
	keep := in.rewrites[:0]
	for _, t := range in.rewrites {
		if now.Sub(t) < in.cfg.FightWindow {
			keep = append(keep, t)
		}
	}
	in.rewrites = append(keep, now)
	in.log.Info("another writer rewrote the primary CNI config without ambit-cni; re-asserted", "path", path)
	if len(in.rewrites) >= in.cfg.FightThreshold {
		in.m.fights.Inc()
		in.log.Warn("fighting another writer over the primary CNI config: it keeps removing ambit-cni. "+
			"Pods created between its write and ours are not enrolled at creation (the agent enrolls them live). "+
			"Configure the other writer not to own the file exclusively (e.g. Cilium cni.exclusive=false)",
			"path", path, "rewrites", len(in.rewrites), "window", in.cfg.FightWindow)
		in.rewrites = in.rewrites[:0]
	}
}

func (in *installer) warnSkipped(skipped []conflist.Skipped) {
	var sb strings.Builder
	for _, s := range skipped {
		fmt.Fprintf(&sb, "%s: %v; ", s.Path, s.Reason)
	}
	if sb.String() == in.lastSkipped {
		return
	}
	in.lastSkipped = sb.String()
	for _, s := range skipped {
		in.log.Warn("invalid CNI config sorts before the primary; CRI-O skips it but containerd fails on it", "path", s.Path, "err", s.Reason)
	}
}
