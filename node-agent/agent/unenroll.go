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
// serves the node any more. Pods whose netns is gone are skipped; the
// first error is returned after trying every pod.
func UnenrollAll(ctx context.Context, stateDir, procRoot string, rules Redirector, log *slog.Logger) error {
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
		f, rec, err := locateNetns(procRoot, rec, rec.IPs, rec.UID, &scan)
		if err != nil {
			if errors.Is(err, errNotRunning) {
				st.Delete(rec.ContainerID)
				continue
			}
			failed = append(failed, fmt.Errorf("%s: %w", name, err))
			continue
		}
		err = rules.Uninstall(f)
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
	return errors.Join(failed...)
}
