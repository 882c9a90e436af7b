package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/ambit-mesh/ambit/node-agent/state"
)

// UnenrollAll removes the redirection from every pod recorded as enrolled
// under stateDir and marks the records unenrolled: `ambit-agent uninstall
// --unenroll-all`, when Ambit leaves the node while its pods keep running
// (they then talk plaintext, as before Ambit). Run it only once no agent
// serves the node any more. Pods whose netns is gone are skipped.
//
// Then clearStatus (nil without a cluster API: a static inventory) takes
// Ambit's status off the node's pods (kube.ClearRedirections). It runs
// after the local part and whatever that part's outcome: an annotation
// left "enabled" makes other nodes' agents send HBONE to a pod nothing
// terminates it for any more, so a pod must not keep it because another
// pod's rules could not be removed. When it fails (the API server
// unreachable) the error says so: the uninstaller exits non-zero, and
// its restart, which finds the local part done, tries again.
//
// Every failure is returned, joined, after trying everything.
func UnenrollAll(ctx context.Context, stateDir, procRoot string, rules Redirector, clearStatus func(context.Context) ([]string, error), log *slog.Logger) error {
	if log == nil {
		log = slog.Default()
	}
	st, err := state.Open(stateDir)
	if err != nil {
		return err
	}
	recs, errs := st.List()
	for _, err := range errs {
		log.Warn("pod record unreadable", "err", err)
	}
	var scan lazyScan
	var failed []error
	n := 0
	for _, rec := range recs {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if !rec.Enrolled {
			continue
		}
		name := rec.Namespace + "/" + rec.Name
		// A namespace found by the IPs that another record names is
		// that pod's, left to its own record.
		k := podKey{rec.Namespace, rec.Name, rec.UID}
		f, rec, err := locateNetns(procRoot, rec, rec.IPs, rec.UID, &scan, func(ino uint64) error { return recordedIn(recs, ino, k, rec.IPs) })
		if err != nil {
			if errors.Is(err, errNotRunning) {
				st.Delete(rec.ContainerID)
				continue
			}
			failed = append(failed, fmt.Errorf("%s: %w", name, err))
			continue
		}
		// ctx ends the loop between pods, never a removal under way:
		// cut (a SIGTERM while a restore waits for the xtables lock),
		// it would leave the pod's capture rules with nothing
		// listening. Each iptables run keeps its own bound (10 s).
		err = rules.Uninstall(context.WithoutCancel(ctx), f)
		f.Close()
		if err != nil {
			failed = append(failed, fmt.Errorf("%s: %w", name, err))
			continue
		}
		rec.Enrolled, rec.Backend = false, ""
		st.Put(rec)
		n++
		log.Info("pod unenrolled", "pod", name)
	}
	log.Info("unenrolled every recorded pod", "pods", n, "failed", len(failed))
	if clearStatus != nil {
		cleared, err := clearStatus(ctx)
		for _, p := range cleared {
			log.Info("cleared the pod's redirection status", "pod", p)
		}
		if err != nil {
			log.Error("the pods' redirection status was not cleared; other nodes take them for meshed until it is: run the uninstall again once the API server answers", "cleared", len(cleared), "err", err)
			failed = append(failed, fmt.Errorf("redirection removed from the pods, but their status annotation (which other nodes read as \"meshed\") was not cleared: %w", err))
		} else {
			log.Info("cleared the redirection status of the node's pods", "pods", len(cleared))
		}
	}
	return errors.Join(failed...)
}
