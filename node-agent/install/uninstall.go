package install

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/ambit-mesh/ambit/node-agent/install/atomicfile"
	"github.com/ambit-mesh/ambit/node-agent/install/conflist"
)

// Uninstall removes Ambit from this node: our entry from every conflist in
// the config directory (a converted .conf is put back byte for byte), then
// the plugin binary, then — when cfg.UnenrollAll is set — redirection
// from every enrolled running pod. Files we never touched are not
// rewritten. It is safe to run more than once.
//
// The entry goes first so no new pod is enrolled while the rest is taken
// apart. A pod created with our entry is deleted by the runtime with the
// config of the time of deletion (containerd, CRI-O), so removing the
// binary does not strand it.
func Uninstall(ctx context.Context, cfg Config) error {
	c, err := cfg.withDefaults()
	if err != nil {
		return err
	}
	log := c.Logger
	files, err := conflist.Candidates(c.CNIConfDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("listing %s: %w", c.CNIConfDir, err)
	}
	var errs []error
	for _, f := range files {
		changed, err := removeFrom(c.CNIConfDir, f)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", f, err))
			continue
		}
		if changed {
			log.Info("removed ambit-cni from CNI config", "path", f)
		}
	}
	if err := errors.Join(errs...); err != nil {
		// Keep the binary while some config still names it.
		return err
	}
	// Backups whose list is gone (the primary deleted it): nothing to
	// restore into; drop them.
	os.RemoveAll(filepath.Join(c.CNIConfDir, BackupDir))
	if removed, err := removeBinary(c.CNIBinDir); err != nil {
		return fmt.Errorf("removing plugin binary: %w", err)
	} else if removed {
		log.Info("removed plugin binary", "path", filepath.Join(c.CNIBinDir, PluginType))
	}
	if c.UnenrollAll != nil {
		if err := c.UnenrollAll(ctx); err != nil {
			return fmt.Errorf("unenrolling the node's pods: %w", err)
		}
		log.Info("removed redirection from every enrolled pod and cleared their status")
	}
	return nil
}

// removeFrom takes our entry out of one file, restoring the original
// .conf when the list is one we converted and holds nothing else.
func removeFrom(confDir, path string) (bool, error) {
	b, fi, err := conflist.ReadFile(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return false, nil
		}
		return false, err
	}
	if !conflist.Has(b, PluginType) {
		return false, nil
	}
	out, _, err := conflist.Remove(b, PluginType)
	if err != nil {
		return false, err
	}
	if restored, err := restoreConverted(confDir, path, out); err != nil || restored {
		return restored, err
	}
	// A linked config was edited in its target; the link stays.
	dst, err := target(path)
	if err != nil {
		return false, err
	}
	return true, atomicfile.Replace(dst, b, out, atomicfile.Attrs(fi))
}

// restoreConverted puts back the .conf/.json that path was converted
// from, if there is a backup and the list without our entry is exactly the
// conversion of it (nobody added to it since).
//
// When a file of the original's name is there again, the primary CNI wrote
// it after the conversion (with no installer running to convert it, or a
// crash between writing the list and removing the original): it is the
// primary's current config, so it stays and only our list and the backup go.
func restoreConverted(confDir, path string, withoutUs []byte) (bool, error) {
	orig, backup, bb, bfi, ok := convertedFrom(confDir, path, withoutUs)
	if !ok {
		return false, nil
	}
	if _, err := os.Lstat(filepath.Join(confDir, orig)); errors.Is(err, os.ErrNotExist) {
		if err := atomicfile.Write(filepath.Join(confDir, orig), bb, atomicfile.Attrs(bfi)); err != nil {
			return false, err
		}
	} else if err != nil {
		return false, err
	}
	if err := atomicfile.Remove(path); err != nil {
		return false, err
	}
	return true, atomicfile.Remove(backup)
}

// convertedFrom finds the .conf/.json in the backup directory that the
// list at path (withoutUs: its bytes without our entry) is the
// conversion of, by this agent or an older one (conflist.IsConversion),
// and returns its file name, backup path, bytes and info. With a backup
// there, the file of that name beside the list counts too (its bytes and
// info are returned then).
func convertedFrom(confDir, path string, withoutUs []byte) (orig, backup string, b []byte, fi os.FileInfo, ok bool) {
	base := filepath.Base(path)
	for _, ext := range []string{".conf", ".json"} {
		orig = base[:len(base)-len(filepath.Ext(base))] + ext
		backup = filepath.Join(confDir, BackupDir, orig)
		bb, bfi, err := conflist.ReadFile(backup)
		if err != nil {
			continue
		}
		if conflist.IsConversion(withoutUs, bb) {
			return orig, backup, bb, bfi, true
		}
		// A conversion again of the file the primary CNI wrote anew,
		// stopped between writing the list and its backup (convert).
		if cb, cfi, err := conflist.ReadFile(filepath.Join(confDir, orig)); err == nil && conflist.IsConversion(withoutUs, cb) {
			return orig, backup, cb, cfi, true
		}
	}
	return "", "", nil, nil, false
}
