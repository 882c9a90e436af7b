package install

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/ambit-mesh/ambit/node-agent/install/atomicfile"
	"github.com/ambit-mesh/ambit/node-agent/install/conflist"
)

// reconciler is an installer for direct reconcile calls, as Run makes it.
func (n *node) reconciler(t *testing.T) *installer {
	t.Helper()
	c, err := n.config().withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	e, err := entryOf(c.Entry)
	if err != nil {
		t.Fatal(err)
	}
	return &installer{cfg: c, entry: e, m: n.m, log: n.log, sums: sums{}}
}

// convertedJSON is a node whose primary CNI config, 10-bridge.json
// (orig), was converted into list by in's first reconcile.
func convertedJSON(t *testing.T) (n *node, in *installer, orig []byte, js, list string) {
	t.Helper()
	n = newNode(t)
	orig = fixture(t, "10-bridge.conf")
	js = filepath.Join(n.conf, "10-bridge.json")
	list = filepath.Join(n.conf, "10-bridge.conflist")
	writeFile(t, js, string(orig))
	in = n.reconciler(t)
	if err := in.reconcile(); err != nil {
		t.Fatal(err)
	}
	return n, in, orig, js, list
}

func gone(t *testing.T, paths ...string) {
	t.Helper()
	for _, p := range paths {
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still exists", p)
		}
	}
}

// An agent from before the cniVersion check converted a .conf with no
// cniVersion (a version ambit-cni refuses). Taking only our entry out of
// that conversion left the node on our list and the original in the
// backup alone: the operator had no .conf left to fix, and uninstall,
// finding no entry to remove, deleted the backup and kept our list. The
// original goes back, byte for byte, as if never converted.
func TestRefusedVersionPutsConvertedOriginalBack(t *testing.T) {
	n := newNode(t)
	orig := bytes.Replace(fixture(t, "10-bridge.conf"), []byte("  \"cniVersion\": \"0.4.0\",\n"), nil, 1)
	conf := filepath.Join(n.conf, "10-bridge.conf")
	list := filepath.Join(n.conf, "10-bridge.conflist")
	writeFile(t, conf, string(orig))

	older := pluginVersions
	pluginVersions = append([]string{""}, older...)
	if err := n.reconciler(t).reconcile(); err != nil {
		t.Fatal(err)
	}
	pluginVersions = older
	if !hasEntry(list) {
		t.Fatal("the older agent's conversion is not in place")
	}

	if err := n.reconciler(t).reconcile(); !errors.Is(err, errVersion) {
		t.Fatalf("reconcile = %v, want the cniVersion refusal", err)
	}
	if got, err := os.ReadFile(conf); err != nil || !bytes.Equal(got, orig) {
		t.Fatalf("the original .conf is not back: %v\n%s", err, got)
	}
	gone(t, list, filepath.Join(n.conf, BackupDir, "10-bridge.conf"))

	if err := Uninstall(context.Background(), n.config()); err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(conf); err != nil || !bytes.Equal(got, orig) {
		t.Fatalf("after uninstall the original .conf is not there: %v\n%s", err, got)
	}
}

// The primary CNI writes its .json again, now with a cniVersion ambit-cni
// refuses. Our list of its old config sorts before it: left in place,
// with our entry, the runtime kept running ambit-cni on the old network
// while the installer said it had not chained, and the primary's new
// config never reached the runtime. Our list and backup go; the runtime
// reads the primary's .json, as without Ambit.
func TestRefusedRewrittenJSONIsNotShadowed(t *testing.T) {
	n, in, orig, js, list := convertedJSON(t)
	if !hasEntry(list) {
		t.Fatal("not converted")
	}

	newer := bytes.Replace(orig, []byte(`"0.4.0"`), []byte(`"0.2.0"`), 1)
	writeFile(t, js, string(newer))
	if err := in.reconcile(); !errors.Is(err, errVersion) {
		t.Fatalf("reconcile = %v, want the cniVersion refusal", err)
	}
	p, _, err := conflist.FindPrimary(n.conf)
	if err != nil || p.Path != js || !bytes.Equal(p.Data, newer) {
		path := ""
		if p != nil {
			path = p.Path
		}
		t.Fatalf("the runtime does not read the primary's new .json: %v, it reads %s", err, path)
	}
	gone(t, list, filepath.Join(n.conf, BackupDir, "10-bridge.json"))
}

// A re-conversion of a rewritten .json that stops between its two writes
// (a crash, a full disk) must be finished by the next pass. Writing the
// backup first left the list of the old config, the new .json and a
// backup of it: the list was no longer the conversion of the backup, so
// it was not recognised as ours, and the runtime read the old config for
// as long as Ambit stayed.
func TestReconversionStoppedHalfwayIsFinished(t *testing.T) {
	n, in, orig, js, list := convertedJSON(t)

	newer := bytes.Replace(orig, []byte("10.22.0.0/16"), []byte("10.99.0.0/16"), 1)
	writeFile(t, js, string(newer))
	writes := 0
	convertWrite = func(path string, b []byte, o atomicfile.Options) error {
		if writes++; writes == 2 {
			return errors.New("injected: stopped between the two writes")
		}
		return atomicfile.Write(path, b, o)
	}
	err := in.reconcile()
	convertWrite = atomicfile.Write
	if err == nil || writes != 2 {
		t.Fatalf("the injected stop did not happen: %v, %d writes", err, writes)
	}

	if err := in.reconcile(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(list)
	if err != nil || !bytes.Contains(b, []byte("10.99.0.0/16")) || !hasEntry(list) {
		t.Fatalf("the runtime's list is not the new config, chained: %v\n%s", err, b)
	}
	gone(t, js)
	if b, _ := os.ReadFile(filepath.Join(n.conf, BackupDir, "10-bridge.json")); !bytes.Equal(b, newer) {
		t.Fatalf("the backup is not the new .json:\n%s", b)
	}
}
