package agent

import (
	"context"
	"net"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ambit-mesh/ambit/plugin/cniproto"
)

// TestSocketKeeperTakesThePathBackOnlyWhenNewest: the path replaced by a
// newer agent's socket stays that agent's while Newest is false (a
// newer agent runs: taking it would steal the socket mid-surge), and is
// taken back, the replaced socket closed, once Newest is true. A path
// that names this agent's socket is left alone either way.
func TestSocketKeeperTakesThePathBackOnlyWhenNewest(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cni.sock")
	mine, err := cniproto.OpenSocket(path)
	if err != nil {
		t.Fatal(err)
	}
	defer mine.Close()
	var newest atomic.Bool
	a := &Agent{log: quietLogger(), m: newMetrics(nil), newestFn: newest.Load}
	var served []*net.UnixListener
	k := &socketKeeper{a: a, serve: func(l *net.UnixListener) { served = append(served, l) }, cur: mine}
	ctx := context.Background()

	newest.Store(true)
	if k.check(ctx) {
		t.Fatal("replaced a path that names this agent's own socket")
	}
	newest.Store(false)
	other, err := cniproto.OpenSocket(path) // a newer agent took the path
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if k.check(ctx) {
		t.Fatal("took the path while a newer agent runs")
	}
	if ok, _ := other.Current(); !ok {
		t.Fatal("the newer agent's socket lost the path")
	}

	newest.Store(true) // the newer agent stopped or died
	if !k.check(ctx) {
		t.Fatal("did not take the path back as the newest agent")
	}
	if len(served) != 1 || k.cur == mine {
		t.Fatalf("after the take-back: %d listeners served, cur replaced %v", len(served), k.cur != mine)
	}
	if ok, _ := k.cur.Current(); !ok {
		t.Fatal("the new socket does not own the path")
	}
	if err := mine.Listener.SetDeadline(time.Now()); err == nil { // fails once closed
		t.Fatal("the replaced socket is still open")
	}
	if k.check(ctx) {
		t.Fatal("replaced its own socket again")
	}
	k.cur.Close()
}

// TestSocketKeeperWithoutNewest: Options.Newest unset (tests, RunListener
// callers) never takes a path.
func TestSocketKeeperWithoutNewest(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cni.sock")
	mine, err := cniproto.OpenSocket(path)
	if err != nil {
		t.Fatal(err)
	}
	defer mine.Close()
	other, err := cniproto.OpenSocket(path)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	k := &socketKeeper{a: &Agent{log: quietLogger(), m: newMetrics(nil)}, serve: func(*net.UnixListener) { t.Fatal("served a new socket") }, cur: mine}
	if k.check(context.Background()) {
		t.Fatal("took the path without Options.Newest")
	}
}
